"""Domain errors. The gRPC layer maps them to status codes (services/runtime/rpc/status.py);
nothing below the servicers imports grpc."""

from __future__ import annotations

from dataclasses import dataclass, field


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


class Unavailable(ServiceError):
    pass


class Violations:
    """Collects violations while validating a whole request, so the caller hears all at once.

    v = Violations()
    v.check(lr > 0, "spec.optimizer.learning_rate", "must be > 0")
    v.raise_if_any()
    """

    def __init__(self) -> None:
        self.items: list[Violation] = []

    def add(self, field_name: str, description: str) -> None:
        self.items.append(Violation(field_name, description))

    def check(self, ok: bool, field_name: str, description: str) -> bool:
        if not ok:
            self.add(field_name, description)
        return ok

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(list(self.items))
