"""API-key authentication: metadata ``x-api-key`` compared in constant time.

Health and reflection stay open so probes and gRPC tools work without a key. This
interceptor runs first: a refused call's body is never decoded.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc import aio

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
HEADER = "x-api-key"


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def abort(request: object, context: aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request: object, context: aio.ServicerContext):  # noqa: ANN202
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    # No request deserializer: a caller without a valid key gets UNAUTHENTICATED whatever
    # the body holds, and nothing of it is parsed (auth runs before decoding).
    kw = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)


def key_matches(candidate: str, keys: Iterable[str]) -> bool:
    # Compare against every key (no early exit) so timing reveals nothing.
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(candidate.encode(), key.encode())
    return ok


class ApiKeyInterceptor(aio.ServerInterceptor):
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(keys)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(EXEMPT_PREFIXES):
            return handler
        supplied = [v for k, v in (details.invocation_metadata or ()) if k.lower() == HEADER]
        if not supplied:
            return _deny(handler, f"missing API key (send metadata '{HEADER}')")
        if not key_matches(str(supplied[0]), self._keys):
            return _deny(handler, "invalid API key")
        return handler
