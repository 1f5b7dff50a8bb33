"""Domain errors. The gRPC layer maps them to status codes (services/runtime/rpc/status.py);
nothing below the servicers imports grpc."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Violation:
    field: str
    description: str


class ServiceError(Exception):
    """Base of errors that are answers to the caller, not bugs."""


@dataclass
class InvalidArgument(ServiceError):
    """Bad input. Carries one violation per offending field (google.rpc.BadRequest)."""

    violations: list[Violation] = field(default_factory=list)

    def __str__(self) -> str:
        return "; ".join(f"{v.field}: {v.description}" for v in self.violations)

    @classmethod
    def one(cls, field_name: str, description: str) -> InvalidArgument:
        return cls([Violation(field_name, description)])


class NotFound(ServiceError):
    pass


class FailedPrecondition(ServiceError):
    pass


class _WithReason(ServiceError):
    """An error with a machine-readable reason (google.rpc.ErrorInfo) and, optionally, how
    long to wait before retrying (google.rpc.RetryInfo)."""

    def __init__(self, message: str, reason: str = "", retry_after_s: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class Unavailable(_WithReason):
    pass


class ResourceExhausted(_WithReason):
    """A limit was hit (queue full, rate limit, disk full); the message says which."""


class DeadlineExceeded(ServiceError):
    """Work stopped because its time ran out (the service's own cap on a call)."""


def storage_error(exc: BaseException) -> ServiceError | None:
    """The answer for a storage failure (a full disk, a busy or unreadable database), or
    None when ``exc`` is not one. Used by the stores and the gRPC error mapping."""
    import errno
    import sqlite3

    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        name = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
        primary = code & 0xFF if isinstance(code, int) else None
        if primary == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc):
            return ResourceExhausted(
                "the service's disk is full: its job database cannot grow (SQLITE_FULL); "
                "free space under MLXU_HOME and retry",
                reason="DISK_FULL",
            )
        if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return Unavailable(f"the job database is busy ({name}); retry", "DATABASE_BUSY", 1.0)
        down = ("SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_CORRUPT",
                "SQLITE_NOTADB", "SQLITE_PROTOCOL")  # fmt: skip
        if primary in {getattr(sqlite3, c) for c in down if hasattr(sqlite3, c)}:
            return Unavailable(f"the job database is unavailable ({name})", "DATABASE_ERROR")
        return None  # anything else is a bug: INTERNAL with an incident id
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        what = {errno.ENOSPC: "disk is full", errno.EDQUOT: "disk quota is exhausted"}.get(
            exc.errno, "file size limit is reached"
        )
        return ResourceExhausted(
            f"the service's {what} ({errno.errorcode.get(exc.errno, exc.errno)}); "
            "free space under MLXU_HOME and retry",
            reason="DISK_FULL",
        )
    return None


# Error text is bounded: a client's 10k-character input is never echoed back whole.
MAX_SHOWN = 96


def shown(raw: object, limit: int = MAX_SHOWN) -> str:
    """repr() of a client-supplied value, cut to ``limit`` characters for error messages."""
    text = repr(raw)
    if len(text) <= limit:
        return text
    size = len(raw) if isinstance(raw, str | bytes) else len(text)
    return f"{text[: limit - 1]}...' ({size} chars)"


class Violations:
    """Collects violations while validating a whole request, so the caller hears all at once.

    v = Violations()
    v.check(lr > 0, "spec.optimizer.learning_rate", "must be > 0")
    v.raise_if_any()
    """

    def __init__(self) -> None:
        self.items: list[Violation] = []

    def add(self, field_name: str, description: str) -> None:
        v = Violation(field_name, description)
        if v not in self.items:  # two rules may find the same problem: say it once
            self.items.append(v)

    def check(self, ok: bool, field_name: str, description: str) -> bool:
        if not ok:
            self.add(field_name, description)
        return ok

    def attempt(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, or None with its InvalidArgument's violations kept here:
        one bad reference does not hide the request's other problems."""
        try:
            return fn(*args, **kwargs)
        except InvalidArgument as e:
            for v in e.violations:
                self.add(v.field, v.description)
            return None

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(list(self.items))
