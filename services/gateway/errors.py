"""Errors as HTTP answers: a gRPC status (and its google.rpc details) becomes a status code
and one JSON shape, ``{"error": {"code", "message", "violations": [{"field",
"description"}]}}``; nothing else, and never a traceback, reaches a caller."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.runtime import errors, logs

C = grpc.StatusCode
HTTP_STATUS = {
    C.INVALID_ARGUMENT: 400,
    C.OUT_OF_RANGE: 400,
    C.UNAUTHENTICATED: 401,
    C.PERMISSION_DENIED: 403,
    C.NOT_FOUND: 404,
    # Wrong state (a finished run, a request_id reused with another body): a conflict.
    C.FAILED_PRECONDITION: 409,
    C.ALREADY_EXISTS: 409,
    C.ABORTED: 409,
    C.RESOURCE_EXHAUSTED: 429,
    C.CANCELLED: 499,
    C.UNIMPLEMENTED: 501,
    C.UNAVAILABLE: 503,
    C.DEADLINE_EXCEEDED: 504,
}
_LOCAL = {  # errors the gateway itself raises (dataset sniffing, path confinement)
    errors.InvalidArgument: C.INVALID_ARGUMENT,
    errors.NotFound: C.NOT_FOUND,
    errors.FailedPrecondition: C.FAILED_PRECONDITION,
    errors.Unavailable: C.UNAVAILABLE,
    errors.ResourceExhausted: C.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: C.DEADLINE_EXCEEDED,
}


@dataclass(frozen=True)
class Violation:
    field: str
    description: str


class BackendError(Exception):
    """A failed call to a service, or a refusal of the gateway's own, as a gRPC status."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        violations: Sequence[Violation] = (),
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.violations = tuple(violations)
        self.retry_after_s = retry_after_s

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError, address: str = "") -> BackendError:
        code = err.code() if hasattr(err, "code") else C.UNKNOWN
        message = (err.details() if hasattr(err, "details") else None) or str(err)
        if code == C.UNAVAILABLE and address:
            message = f"{message} (service at {address})"
        violations: list[Violation] = []
        retry: float | None = None
        try:
            status = rpc_status.from_call(err)  # type: ignore[arg-type]
        except (ValueError, AttributeError, TypeError):
            status = None
        for detail in status.details if status else ():
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [Violation(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                retry = info.retry_delay.ToMilliseconds() / 1000
        return cls(code or C.UNKNOWN, message, violations, retry)

    @classmethod
    def invalid(cls, field: str, description: str) -> BackendError:
        return cls(C.INVALID_ARGUMENT, f"{field}: {description}", [Violation(field, description)])

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def body(self) -> dict:
        err: dict = {"code": self.code.name, "message": self.message}
        if self.violations:
            err["violations"] = [
                {"field": v.field, "description": v.description} for v in self.violations
            ]
        return {"error": err}


def from_service_error(exc: errors.ServiceError) -> BackendError:
    code = next((c for cls, c in _LOCAL.items() if isinstance(exc, cls)), C.INTERNAL)
    vs = [Violation(v.field, v.description) for v in getattr(exc, "violations", [])]
    return BackendError(code, str(exc) or type(exc).__name__, vs)


def answer(exc: BackendError) -> JSONResponse:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    if exc.code == C.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "ApiKey"
    return JSONResponse(exc.body(), status_code=exc.http_status, headers=headers)


def _field(loc: Sequence[int | str]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def install(app: FastAPI) -> None:
    """Exception handlers: every error leaves as the one JSON shape above."""

    @app.exception_handler(BackendError)
    async def _backend(_r: Request, exc: BackendError) -> JSONResponse:
        return answer(exc)

    @app.exception_handler(errors.ServiceError)
    async def _service(_r: Request, exc: errors.ServiceError) -> JSONResponse:
        return answer(from_service_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_r: Request, exc: RequestValidationError) -> JSONResponse:
        vs = [Violation(_field(e.get("loc", ())), e.get("msg", "invalid")) for e in exc.errors()]
        msg = "; ".join(f"{v.field}: {v.description}" for v in vs) or "invalid request"
        return answer(BackendError(C.INVALID_ARGUMENT, msg, vs))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: C.UNAUTHENTICATED, 404: C.NOT_FOUND, 405: C.UNIMPLEMENTED}.get(
            exc.status_code, C.INVALID_ARGUMENT if exc.status_code < 500 else C.INTERNAL
        )
        body = {"error": {"code": code.name, "message": str(exc.detail)}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_r: Request, exc: Exception) -> JSONResponse:
        incident = uuid.uuid4().hex[:12]
        logs.get().error("internal_error", incident=incident, exc_info=exc)
        msg = f"internal error (incident {incident}; see the gateway's log)"
        return answer(BackendError(C.INTERNAL, msg))
