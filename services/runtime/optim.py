"""Optimizer settings and builders, plus the small dict <-> frozen-dataclass helper that every
trainer config uses.

A trainer's config arrives as a plain dict (the resolved config stored on the job). Each part
is a frozen dataclass built with ``from_dict``: missing keys and ``None`` take the default,
fields marked ``zero_default`` also treat 0 / "" / [] as "use the default" (the proto3
convention of the request), unknown keys and wrong types are ``InvalidArgument`` naming the
field. ``to_dict`` gives back the fully resolved dict that is saved in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import mlx.core as mx
import mlx.optimizers as optim

from services.runtime.errors import InvalidArgument, Violations
from services.runtime.specs import MAX_LEARNING_RATE

T = TypeVar("T", bound="DictConfig")


def zero_default(value: Any) -> Any:
    """A dataclass field whose zero value (proto3 "unset") means the default."""
    if isinstance(value, list | dict | tuple):
        return field(default_factory=lambda: type(value)(value), metadata={"zero": True})
    return field(default=value, metadata={"zero": True})


def _is_zero(v: Any) -> bool:
    return v in (0, "") or (isinstance(v, list | tuple | dict) and not v)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if isinstance(hint, type) and issubclass(hint, DictConfig):
        if not isinstance(value, dict):
            raise InvalidArgument.one(name, f"must be an object, got {type(value).__name__}")
        return hint.from_dict(value, prefix=name)
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
        if isinstance(value, list | tuple) and all(isinstance(x, str) for x in value):
            return tuple(value)
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        return value
    raise InvalidArgument.one(name, f"expected {getattr(hint, '__name__', hint)}, got {value!r}")


class DictConfig:
    """Mixin for frozen dataclasses built from (and saved as) plain dicts."""

    @classmethod
    def from_dict(cls: type[T], data: dict | None = None, *, prefix: str = "") -> T:
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise InvalidArgument.one(
                f"{prefix}.{unknown[0]}" if prefix else unknown[0],
                f"unknown field (known: {', '.join(sorted(fields))})",
            )
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            if name not in data or data[name] is None:
                continue
            value = data[name]
            if f.metadata.get("zero") and _is_zero(value):
                continue
            kwargs[name] = _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
        obj = cls(**kwargs)
        obj = obj.resolve()
        v = Violations()
        obj.validate(v, prefix)
        v.raise_if_any()
        return obj

    def resolve(self: T) -> T:
        """Fill defaults that depend on other fields (override)."""
        return self

    def validate(self, v: Violations, prefix: str) -> None:
        """Add a violation per bad field (override)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, DictConfig):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out


def _f(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "lion", "muon")
SCHEDULES = ("constant", "cosine", "linear")

# Per-optimizer defaults for the fields whose "unset" depends on the optimizer.
_DEFAULTS = {
    "adamw": {"weight_decay": 0.01, "beta1": 0.9, "beta2": 0.999},
    "adam": {"weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999},
    "sgd": {"weight_decay": 0.0, "momentum": 0.0},
    "adafactor": {"weight_decay": 0.0},
    "lion": {"weight_decay": 0.0, "beta1": 0.9, "beta2": 0.99},
    "muon": {"weight_decay": 0.01, "momentum": 0.95, "beta1": 0.9, "beta2": 0.999},
}


@dataclass(frozen=True)
class OptimizerSettings(DictConfig):
    """Mirrors OptimizerConfig. ``learning_rate`` 0 means the trainer's default (SFT: 1e-5 full,
    1e-4 adapters); the other zeros resolve per optimizer (see ``_DEFAULTS``)."""

    name: str = zero_default("adamw")
    learning_rate: float = zero_default(1e-4)
    weight_decay: float | None = None  # proto `optional`: 0 is a real value
    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = zero_default(1e-8)
    momentum: float = 0.0  # SGD / Muon
    schedule: str = zero_default("cosine")
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # final lr = learning_rate * min_lr_ratio
    grad_clip_norm: float = 0.0  # 0 = no clipping
    # Adam/AdamW (and Muon's AdamW half) as torch.optim: bias-corrected moments. MLX's and
    # mlx-lm's own default is False, which makes the first updates 3-6x larger.
    bias_correction: bool = True

    def resolve(self) -> OptimizerSettings:
        defaults = _DEFAULTS.get(self.name.lower(), {})
        changes: dict[str, Any] = {"name": self.name.lower(), "schedule": self.schedule.lower()}
        if self.weight_decay is None:
            changes["weight_decay"] = defaults.get("weight_decay", 0.0)
        for key in ("beta1", "beta2", "momentum"):
            if getattr(self, key) == 0.0 and key in defaults:
                changes[key] = defaults[key]
        return dataclasses.replace(self, **changes)

    def validate(self, v: Violations, prefix: str) -> None:
        v.check(self.name in OPTIMIZERS, _f(prefix, "name"), f"must be one of {OPTIMIZERS}")
        v.check(self.schedule in SCHEDULES, _f(prefix, "schedule"), f"one of {SCHEDULES}")
        top = MAX_LEARNING_RATE
        v.check(
            0 < self.learning_rate <= top, _f(prefix, "learning_rate"), f"must be in (0, {top:g}]"
        )
        v.check((self.weight_decay or 0) >= 0, _f(prefix, "weight_decay"), "must be >= 0")
        for key in ("beta1", "beta2", "momentum"):
            v.check(0 <= getattr(self, key) < 1, _f(prefix, key), "must be in [0, 1)")
        v.check(self.eps > 0, _f(prefix, "eps"), "must be > 0")
        v.check(self.warmup_steps >= 0, _f(prefix, "warmup_steps"), "must be >= 0")
        v.check(0 <= self.min_lr_ratio <= 1, _f(prefix, "min_lr_ratio"), "must be in [0, 1]")
        v.check(self.grad_clip_norm >= 0, _f(prefix, "grad_clip_norm"), "must be >= 0")


def build_lr_schedule(s: OptimizerSettings, total_steps: int):
    """The learning rate of each optimizer update, as transformers' schedulers define it.

    Update ``k`` (0-based) uses ``lr * factor(k)``: a linear warmup ``k / warmup_steps`` (so
    with warmup the first update has lr 0, as in ``get_*_schedule_with_warmup``), then
    ``constant`` 1, ``cosine`` ``0.5 * (1 + cos(pi * p))`` or ``linear`` ``1 - p`` with
    ``p = (k - warmup) / (total_steps - warmup)``, raised to ``min_lr_ratio``
    (``get_cosine_with_min_lr_schedule_with_warmup``'s ``min_lr_rate``). The decay would reach
    its floor at update ``total_steps``, which never runs: every update moves the weights.
    Returns a float (constant, no warmup) or an mlx schedule of the optimizer step."""
    lr = s.learning_rate
    warmup = min(s.warmup_steps, max(total_steps - 1, 0))
    if s.schedule == "constant" and not warmup:
        return lr
    span = float(max(total_steps - warmup, 1))
    floor = s.min_lr_ratio

    def schedule(step: mx.array) -> mx.array:
        k = mx.array(step).astype(mx.float32)
        ramp = k / max(warmup, 1)
        p = mx.clip((k - warmup) / span, 0.0, 1.0)
        if s.schedule == "constant":
            decay = mx.ones_like(p)
        elif s.schedule == "cosine":
            decay = 0.5 * (1.0 + mx.cos(math.pi * p))
        else:
            decay = 1.0 - p
        decay = decay * (1.0 - floor) + floor
        return lr * mx.where(k < warmup, ramp, decay)

    return schedule


class _Muon(optim.Muon):
    """mlx.optimizers.Muon with decoupled weight decay, as torch.optim.Muon and the Muon
    reference (Jordan et al. 2024, Moonlight) apply it: ``p <- p (1 - lr wd)`` before the
    orthogonalised update. MLX's own Muon adds ``wd * p`` to the gradient instead, which then
    passes through the momentum and the Newton-Schulz orthogonalisation."""

    def __init__(self, learning_rate, momentum: float, weight_decay: float) -> None:
        super().__init__(learning_rate=learning_rate, momentum=momentum, weight_decay=0.0)
        self.decoupled_weight_decay = weight_decay

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        if self.decoupled_weight_decay:
            lr = self.learning_rate.astype(gradient.dtype)
            parameter = parameter * (1 - lr * self.decoupled_weight_decay)
        return super().apply_single(gradient, parameter, state)


def _one_minus_pow(beta: float, step: mx.array) -> mx.array:
    """``1 - beta ** step`` as ``-expm1(step * log(beta))``: exact to float32 rounding.

    mlx's Adam evaluates ``1 - beta ** step`` in float32, where 0.999 is 0.99900001, so
    ``1 - beta2`` comes out 1.3e-5 too small and each early step ~6e-6 too large against
    torch.optim (which computes its bias corrections in float64); over 20 PPO iterations
    (80 updates) that moved the loss 1e-2 off its torch reference (bench/parity_rl.py)."""
    if beta == 0.0:
        return mx.ones_like(step)
    return -mx.expm1(step * math.log(beta))


def _adam_step(opt, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
    """mlx.optimizers.Adam.apply_single with accurate bias corrections."""
    lr = opt.learning_rate.astype(gradient.dtype)
    b1, b2 = opt.betas
    m = b1 * state["m"] + (1 - b1) * gradient
    v = b2 * state["v"] + (1 - b2) * mx.square(gradient)
    state["m"], state["v"] = m, v
    if not opt.bias_correction:
        return parameter - lr * m / (mx.sqrt(v) + opt.eps)
    t = opt.step.astype(mx.float32)
    c1 = (lr / _one_minus_pow(b1, t)).astype(gradient.dtype)
    c2 = mx.rsqrt(_one_minus_pow(b2, t)).astype(gradient.dtype)
    return parameter - c1 * m / (mx.sqrt(v) * c2 + opt.eps)


class _Adam(optim.Adam):
    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        return _adam_step(self, gradient, parameter, state)


class _AdamW(optim.AdamW):
    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        lr = self.learning_rate.astype(gradient.dtype)
        return _adam_step(self, gradient, parameter * (1 - lr * self.weight_decay), state)


def _muon_filter(path: str, weight: mx.array) -> bool:
    # Muon orthogonalises matrix updates; embeddings, the output head and vectors stay on AdamW.
    return weight.ndim >= 2 and "embed" not in path and "lm_head" not in path


def build_optimizer(s: OptimizerSettings, total_steps: int) -> optim.Optimizer:
    lr = build_lr_schedule(s, total_steps)
    wd = float(s.weight_decay or 0.0)
    betas = [s.beta1, s.beta2]
    bc = s.bias_correction
    if s.name == "adamw":
        return _AdamW(learning_rate=lr, betas=betas, eps=s.eps, weight_decay=wd, bias_correction=bc)
    if s.name == "adam":
        return _Adam(learning_rate=lr, betas=betas, eps=s.eps, bias_correction=bc)
    if s.name == "sgd":
        return optim.SGD(learning_rate=lr, momentum=s.momentum, weight_decay=wd)
    if s.name == "adafactor":
        # relative_step/scale_parameter would ignore our learning rate and schedule.
        return optim.Adafactor(
            learning_rate=lr, weight_decay=wd, relative_step=False, scale_parameter=False
        )
    if s.name == "lion":
        return optim.Lion(learning_rate=lr, betas=betas, weight_decay=wd)
    if s.name == "muon":
        muon = _Muon(learning_rate=lr, momentum=s.momentum, weight_decay=wd)
        rest = _AdamW(learning_rate=lr, betas=betas, eps=s.eps, weight_decay=wd, bias_correction=bc)
        return optim.MultiOptimizer([muon, rest], [_muon_filter])
    raise InvalidArgument.one("optimizer.name", f"unknown optimizer {s.name!r}")


def learning_rate(optimizer: optim.Optimizer) -> float:
    lr = optimizer.learning_rate
    return float(lr.item() if isinstance(lr, mx.array) else lr)
