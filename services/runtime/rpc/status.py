"""The edge of every RPC: decode, rate-limit and validate the request, then map domain errors
to gRPC statuses with google.rpc details; never a traceback to a client.

Installed as a server interceptor (after auth, so nothing is decoded for a caller without a
valid key), so servicers just raise services.runtime.errors.*:

- a body that does not parse as the method's request message -> INVALID_ARGUMENT;
- Start* / Generate / Score beyond the client's rate -> RESOURCE_EXHAUSTED (+ RetryInfo);
- a request that breaks its schema's rules (services.runtime.specs.check_request: enums,
  finite numbers, string / list / nesting sizes) -> INVALID_ARGUMENT with field violations;
- a full disk -> RESOURCE_EXHAUSTED, a busy or unreadable database -> UNAVAILABLE, each with
  a google.rpc.ErrorInfo reason;
- a method the servicer does not implement (the generated base raised) -> UNIMPLEMENTED;
- anything else unexpected -> INTERNAL with an incident id (the traceback goes to the log).

Messages and details are bounded (``MAX_MESSAGE`` characters, ``MAX_VIOLATIONS``), so a huge
input can never make the status itself too large for the transport.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

from services.runtime import errors, logs, specs
from services.runtime.rpc.limits import RateLimiter, client_id, group_of
from services.runtime.settings import Limits

_CODES: dict[type[errors.ServiceError], tuple[grpc.StatusCode, int]] = {
    errors.InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT),
    errors.NotFound: (grpc.StatusCode.NOT_FOUND, code_pb2.NOT_FOUND),
    errors.FailedPrecondition: (grpc.StatusCode.FAILED_PRECONDITION, code_pb2.FAILED_PRECONDITION),
    errors.Unavailable: (grpc.StatusCode.UNAVAILABLE, code_pb2.UNAVAILABLE),
    errors.ResourceExhausted: (grpc.StatusCode.RESOURCE_EXHAUSTED, code_pb2.RESOURCE_EXHAUSTED),
    errors.DeadlineExceeded: (grpc.StatusCode.DEADLINE_EXCEEDED, code_pb2.DEADLINE_EXCEEDED),
}
MAX_MESSAGE = 1024
MAX_FIELD = 256
MAX_DESCRIPTION = 512
MAX_VIOLATIONS = 32
DOMAIN = "mlxu"
# What grpcio-tools' generated base servicers raise for a method nobody implemented.
GENERATED_UNIMPLEMENTED = "Method not implemented!"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pack(status: status_pb2.Status, detail: Message) -> None:
    a = any_pb2.Any()
    a.Pack(detail)
    status.details.append(a)


def _answer(exc: errors.ServiceError, code: int) -> grpc.Status:
    status = status_pb2.Status(
        code=code, message=_clip(str(exc) or type(exc).__name__, MAX_MESSAGE)
    )
    if isinstance(exc, errors.InvalidArgument):
        shown = exc.violations[:MAX_VIOLATIONS]
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=_clip(v.field, MAX_FIELD),
                    description=_clip(v.description, MAX_DESCRIPTION),
                )
                for v in shown
            ]
        )
        _pack(status, bad)
        if len(exc.violations) > len(shown):
            status.message = _clip(
                f"{status.message} (and {len(exc.violations) - len(shown)} more)", MAX_MESSAGE
            )
    reason = getattr(exc, "reason", "")
    if reason:
        _pack(status, error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    wait = getattr(exc, "retry_after_s", None)
    if wait is not None:
        d = duration_pb2.Duration()
        d.FromMilliseconds(max(int(wait * 1000), 1))
        _pack(status, error_details_pb2.RetryInfo(retry_delay=d))
    return rpc_status.to_status(status)


def to_status(exc: BaseException) -> grpc.Status:
    """A grpc.Status for an exception; unknown exceptions become INTERNAL with an incident id."""
    mapped = errors.storage_error(exc)
    if mapped is None and isinstance(exc, MemoryError):
        mapped = errors.ResourceExhausted("the service ran out of memory", reason="OUT_OF_MEMORY")
    if mapped is not None:
        logs.get().warning("storage_error", error=str(mapped), cause=repr(exc)[:500])
        exc = mapped
    for cls, (_, code) in _CODES.items():
        if isinstance(exc, cls):
            return _answer(exc, code)  # type: ignore[arg-type]
    if isinstance(exc, NotImplementedError) and str(exc) == GENERATED_UNIMPLEMENTED:
        # A method the servicer does not override (the generated base raised): the answer
        # gRPC itself gives for it, not a server fault.
        return rpc_status.to_status(
            status_pb2.Status(code=code_pb2.UNIMPLEMENTED, message="method not implemented")
        )
    incident = uuid.uuid4().hex[:12]
    logs.get().error("internal_error", incident=incident, exc_info=exc)
    return rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.INTERNAL, message=f"internal error (incident {incident}; see server log)"
        )
    )


class Undecodable:
    """What a request body that does not parse as its message becomes (see ``_decoder``)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _decoder(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - answered as INVALID_ARGUMENT by the handler
            return Undecodable(exc)

    return decode


class _Edge:
    """What runs before a servicer method: decode check, rate limit, schema check."""

    def __init__(self, limits: Limits, limiter: RateLimiter | None) -> None:
        self.limits = limits
        self.limiter = limiter

    def admit(self, method: str, request: Any, context: aio.ServicerContext) -> None:
        if isinstance(request, Undecodable):
            raise errors.InvalidArgument.one(
                "request", f"the body is not a valid request message for {method}"
            )
        group = group_of(method)
        if group is not None and self.limiter is not None:
            key = next(
                (str(v) for k, v in (context.invocation_metadata() or ()) if k == "x-api-key"),
                None,
            )
            self.limiter.take(group, client_id(key, context.peer() or ""))
        if isinstance(request, Message):
            specs.check_request(request, self.limits)


def _wrap_unary(fn: Callable[..., Awaitable[Any]], edge: _Edge, method: str) -> Callable:
    @functools.wraps(fn)
    async def wrapper(request: Any, context: aio.ServicerContext) -> Any:
        try:
            edge.admit(method, request, context)
            return await fn(request, context)
        except aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            await context.abort_with_status(to_status(exc))

    return wrapper


def _wrap_stream(fn: Callable[..., AsyncIterator[Any]], edge: _Edge, method: str) -> Callable:
    @functools.wraps(fn)
    async def wrapper(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            edge.admit(method, request, context)
            async for item in fn(request, context):
                yield item
        except aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await context.abort_with_status(to_status(exc))

    return wrapper


class ErrorInterceptor(aio.ServerInterceptor):
    def __init__(self, limits: Limits | None = None, rate_limit: bool = True) -> None:
        limits = limits or Limits()
        self.edge = _Edge(limits, RateLimiter(limits) if rate_limit else None)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        kw = {
            "request_deserializer": _decoder(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, self.edge, details.method), **kw
            )
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary, self.edge, details.method), **kw
        )
