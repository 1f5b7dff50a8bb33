"""The optimizers and learning-rate schedules the trainers build from ``OptimizerSettings``.

The settings themselves (fields, defaults, bounds) are the MLX-free schema in
``services.schema.common``; ``DictConfig`` and ``zero_default`` are re-exported from
``services.schema.base`` for the trainers' convenience.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.optimizers as optim

from services.runtime.errors import InvalidArgument
from services.schema.base import DictConfig, zero_default
from services.schema.common import OPTIMIZERS, SCHEDULES, OptimizerSettings

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "DictConfig",
    "OptimizerSettings",
    "build_lr_schedule",
    "build_optimizer",
    "learning_rate",
    "zero_default",
]


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
