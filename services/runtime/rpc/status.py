"""Map domain errors to gRPC statuses with google.rpc details; never a traceback to a client.

Installed as a server interceptor, so servicers just raise services.runtime.errors.*.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

from services.runtime import errors, logs

_CODES: dict[type[errors.ServiceError], tuple[grpc.StatusCode, int]] = {
    errors.InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT),
    errors.NotFound: (grpc.StatusCode.NOT_FOUND, code_pb2.NOT_FOUND),
    errors.FailedPrecondition: (grpc.StatusCode.FAILED_PRECONDITION, code_pb2.FAILED_PRECONDITION),
    errors.Unavailable: (grpc.StatusCode.UNAVAILABLE, code_pb2.UNAVAILABLE),
}


def to_status(exc: BaseException) -> grpc.Status:
    """A grpc.Status for an exception; unknown exceptions become INTERNAL with an incident id."""
    for cls, (_, code) in _CODES.items():
        if isinstance(exc, cls):
            status = status_pb2.Status(code=code, message=str(exc) or cls.__name__)
            if isinstance(exc, errors.InvalidArgument):
                bad = error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in exc.violations
                    ]
                )
                detail = any_pb2.Any()
                detail.Pack(bad)
                status.details.append(detail)
            return rpc_status.to_status(status)
    incident = uuid.uuid4().hex[:12]
    logs.get().error("internal_error", incident=incident, exc_info=exc)
    return rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.INTERNAL, message=f"internal error (incident {incident}; see server log)"
        )
    )


def _wrap_unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def wrapper(request: Any, context: aio.ServicerContext) -> Any:
        try:
            return await fn(request, context)
        except aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            await context.abort_with_status(to_status(exc))

    return wrapper


def _wrap_stream(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(fn)
    async def wrapper(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in fn(request, context):
                yield item
        except aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await context.abort_with_status(to_status(exc))

    return wrapper


class ErrorInterceptor(aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
