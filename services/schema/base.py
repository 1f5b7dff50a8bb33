"""Config dataclasses built from plain dicts, with their rules declared on the fields.

A trainer's config arrives as a plain dict (the proto spec, set fields only). Each part is a
frozen dataclass whose fields declare their default and their bounds once::

    batch_size: int = setting(4, zero=True, ge=1, le=4096, doc="global sequences per step")

``from_dict`` is the one validation, run at the edge (the servicer's Start, the
orchestrator's pipeline check): missing keys and ``None`` take the default, ``zero=True``
fields also treat 0 / "" / [] as "use the default" (proto3's "unset"), unknown keys and wrong
types are refused, then every declared bound is checked and the class's ``check`` adds the
rules that span fields. Every violation is reported at once, named by its field path.
``to_dict`` gives back the fully resolved dict stored on the job; the worker turns it back
into the dataclass with ``rehydrate``, which fills and coerces but does not validate again.

No MLX here: clients, the orchestrator and the HTTP gateway read the same schema.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from services.runtime.errors import InvalidArgument, Violation, Violations

__all__ = ["DictConfig", "Rule", "field_path", "rule_of", "setting", "sub", "zero_default"]

T = TypeVar("T", bound="DictConfig")


@dataclass(frozen=True)
class Rule:
    """The declared bounds of one field (all optional). ``alt`` values are allowed besides
    the range (``-1`` = "all" / "keep all"); ``choices`` is a closed set."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    alt: tuple[Any, ...] = ()
    choices: tuple[Any, ...] = ()
    doc: str = ""

    def ok(self, value: Any) -> bool:
        if value is None or value in self.alt:
            return True
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float):
            return True
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def describe(self) -> str:
        """ "must be in [0, 1)", "must be >= 1, or -1", "must be one of adamw, sgd"."""
        if self.choices:
            return "must be one of " + ", ".join(str(c) for c in self.choices)
        has_lo = self.ge is not None or self.gt is not None
        has_hi = self.le is not None or self.lt is not None
        lo = f"{self.ge if self.ge is not None else self.gt:g}" if has_lo else ""
        hi = f"{self.le if self.le is not None else self.lt:g}" if has_hi else ""
        if has_lo and has_hi:
            left = "[" if self.ge is not None else "("
            right = "]" if self.le is not None else ")"
            text = f"must be in {left}{lo}, {hi}{right}"
        elif has_lo:
            text = f"must be {'>=' if self.ge is not None else '>'} {lo}"
        elif has_hi:
            text = f"must be {'<=' if self.le is not None else '<'} {hi}"
        else:
            text = "is not allowed"
        if self.alt:
            text += ", or " + " or ".join(str(a) for a in self.alt)
        return text


def setting(
    default: Any = dataclasses.MISSING,
    *,
    zero: bool = False,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    alt: tuple[Any, ...] = (),
    choices: tuple[Any, ...] = (),
    doc: str = "",
) -> Any:
    """A field with its default and its rule. ``zero``: 0 / "" / [] mean the default."""
    meta: dict[str, Any] = {"rule": Rule(ge, gt, le, lt, tuple(alt), tuple(choices), doc)}
    if zero:
        meta["zero"] = True
    if isinstance(default, list | dict | tuple):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def zero_default(value: Any) -> Any:
    """A field (no rule) whose zero value (proto3 "unset") means the default."""
    return setting(value, zero=True)


def sub(cls: type) -> Any:
    """A nested settings field whose default is the resolved default instance."""
    return field(default_factory=lambda: cls().resolve())


def rule_of(f: dataclasses.Field) -> Rule | None:
    return f.metadata.get("rule")


def _is_zero(v: Any) -> bool:
    return v in (0, "") or (isinstance(v, list | tuple | dict) and not v)


def field_path(prefix: str, name: str) -> str:
    """ "spec.loop" + "batch_size" -> "spec.loop.batch_size" ("" prefix: just the name)."""
    return f"{prefix}.{name}" if prefix else name


def _coerce(value: Any, hint: Any, name: str, validate: bool, found: list[Violation]) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name, validate, found)
    if isinstance(hint, type) and issubclass(hint, DictConfig):
        if not isinstance(value, dict):
            raise InvalidArgument.one(name, f"must be an object, got {type(value).__name__}")
        return hint._make(value, name, validate, found)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)  # protobuf's JSON mapping renders int64 as a string
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):  # NaN / Infinity never mean a setting
                raise InvalidArgument.one(name, f"must be a finite number, got {value!r}")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        item = args[0] if args else str
        if isinstance(value, list | tuple):
            if isinstance(item, type) and issubclass(item, DictConfig):
                return _sections(value, item, name, validate, found)
            if item is str and all(isinstance(x, str) for x in value):
                return tuple(value)
            if item is int:
                return tuple(
                    _coerce(x, int, f"{name}[{i}]", validate, found) for i, x in enumerate(value)
                )
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        return value
    raise InvalidArgument.one(name, f"expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _sections(
    value: list | tuple, item: type, name: str, validate: bool, found: list[Violation]
) -> tuple:
    """A repeated message: each entry built under ``name[i]``."""
    out = []
    for i, x in enumerate(value):
        if isinstance(x, dict):
            out.append(item._make(x, f"{name}[{i}]", validate, found))
        else:
            found.append(Violation(f"{name}[{i}]", "must be an object"))
    return tuple(out)


class DictConfig:
    """Mixin for frozen dataclasses built from (and saved as) plain dicts."""

    @classmethod
    def from_dict(cls: type[T], data: dict | None = None, *, prefix: str = "") -> T:
        """Build, resolve and validate (the edge). Raises InvalidArgument with every problem."""
        return cls._build(cls.prepare(dict(data or {})), prefix, validate=True)

    @classmethod
    def rehydrate(cls: type[T], data: dict | None = None) -> T:
        """Build and resolve a config that the edge already validated (the worker)."""
        return cls._build(cls.prepare(dict(data or {})), "spec", validate=False)

    @classmethod
    def prepare(cls, data: dict) -> dict:
        """Fill defaults that depend on the raw input before building (override)."""
        return data

    @classmethod
    def _build(cls: type[T], data: dict, prefix: str, validate: bool) -> T:
        found: list[Violation] = []
        obj = cls._make(data, prefix, validate, found)
        if found:
            unique = list(dict.fromkeys(found))  # two rules may find one problem: say it once
            raise InvalidArgument(unique)
        return obj

    @classmethod
    def _make(cls: type[T], data: dict, prefix: str, validate: bool, found: list[Violation]) -> T:
        """Build one section; every problem (its own and its sections') goes to ``found``,
        and a section with problems is still built, so rules across fields see it."""
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        known = ", ".join(sorted(fields))
        for key in sorted(set(data) - set(fields)):
            found.append(Violation(field_path(prefix, key), f"unknown field (known: {known})"))
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            if name not in data or data[name] is None:
                continue
            value = data[name]
            if f.metadata.get("zero") and _is_zero(value):
                continue
            try:
                kwargs[name] = _coerce(
                    value, hints[name], field_path(prefix, name), validate, found
                )
            except InvalidArgument as e:  # a wrong type: the field keeps its default
                found.extend(e.violations)
        obj = cls(**kwargs).resolve()
        if validate:
            v = Violations()
            obj.validate(v, prefix)
            found.extend(v.items)
        return obj

    def resolve(self: T) -> T:
        """Fill defaults that depend on other fields (override)."""
        return self

    def validate(self, v: Violations, prefix: str) -> None:
        """Every declared field rule, then ``check``'s rules across fields."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            rule = rule_of(f)
            if rule is None:
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple) and not rule.choices:
                bad = [x for x in value if not rule.ok(x)]
                if bad:
                    v.add(field_path(prefix, f.name), f"{bad[0]!r}: {rule.describe()}")
            elif not rule.ok(value):
                v.add(field_path(prefix, f.name), rule.describe())
        self.check(v, prefix)

    def check(self, v: Violations, prefix: str) -> None:
        """Rules that span fields (override)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, DictConfig):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = [x.to_dict() if isinstance(x, DictConfig) else x for x in value]
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out
