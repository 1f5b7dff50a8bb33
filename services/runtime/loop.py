"""Batch training (SFT, distillation, reward models, DPO, KTO, ORPO) on the one loop.

A trainer builds the model, its data and a loss, then calls::

    result = train(model, loss_fn, train_batches, valid_batches, loop, opt, ctx, artifact)

``loss_fn(model, batch) -> (loss, weight, metrics)``: ``loss`` is a scalar mean over ``weight``
units (tokens for SFT, pairs for DPO); ``metrics`` is a dict of scalars reported as
weight-averaged means. Micro-batches and data-parallel ranks are combined weighted by
``weight``, so accumulating 2 micro-batches of 2 gives the same update as one batch of 4.
One metric is a count, not a mean: ``metrics["tokens"]`` (optional) is the tokens the batch
put through the model, for ``tokens_per_second`` when ``weight`` counts something else (DPO's
pairs); without it ``weight`` is taken to be tokens.

Names say where a number comes from: a report's ``train_loss`` and ``train_<metric>`` are
means over the training batches since the last report; ``val_loss`` and ``val_<metric>``
are the same ``loss_fn`` over the validation batches, evaluated at step 0 (the "before"
figure), every ``steps_per_eval`` steps and at the end. ``val_ppl`` is only reported for a
per-token negative log-likelihood (``train(..., perplexity=True)``: SFT).

Batch sizes: ``loop.batch_size`` is the global batch (sequences per optimizer step over all
ranks and micro-batches). Each optimizer step consumes ``grad_accumulation_steps``
micro-batches from ``train_batches``, which must be built with the global micro-batch size
``loop.micro_batch_size`` (each rank holding ``micro_batch_size / world_size`` rows).
``step`` counts optimizer steps; report / eval / checkpoint intervals are in those steps.

The step is compiled once (``mx.compile`` with the model, optimizer and RNG state as inputs
and outputs); loss and state are evaluated every step so no lazy graph outlives it. This
module is that step as a ``StepStrategy`` (``BatchStrategy``); the loop around it (reports,
evaluation cadence, checkpoints, stop, non-finite losses, exact resume) is
``services.runtime.steps.run_steps``, which PPO and GRPO drive with their own strategy.
Dropout keys derive from (seed, step), so resumed runs draw the same randomness as
uninterrupted ones.

Around it: the config sections trainers share are in ``loop_settings``, the trainer-state
files and their restore in ``trainer_state``, gradient checkpointing in ``grad_checkpoint``;
this module re-exports what trainers import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from services.runtime import trainer_state
from services.runtime.contract import CheckpointInfo, JobContext
from services.runtime.grad_checkpoint import enable_grad_checkpoint
from services.runtime.loop_settings import (
    DTYPES,
    DatasetSettings,
    LoopSettings,
    ModelSettings,
    ResourcesSettings,
    default_dtype,
    sub,
    total_steps,
)
from services.runtime.optim import OptimizerSettings, build_optimizer, learning_rate
from services.runtime.steps import Artifact, NonFiniteLoss, StepOutput, run_steps
from services.runtime.trainer_state import Stateful

# The trainer-state helpers' names from before they became services.runtime.trainer_state,
# kept so code written against them keeps working.
_Progress = trainer_state.Progress
_write_trainer_state = trainer_state.write_trainer_state
_restore = trainer_state.restore
_assign = trainer_state._assign

__all__ = [
    "DTYPES",
    "Artifact",
    "BatchStrategy",
    "BatchStream",
    "DatasetSettings",
    "LoopSettings",
    "ModelSettings",
    "NonFiniteLoss",
    "OptimizerSettings",
    "ResourcesSettings",
    "Stateful",
    "TrainResult",
    "default_dtype",
    "enable_grad_checkpoint",
    "evaluate",
    "evaluate_all",
    "sub",
    "total_steps",
    "train",
]

LossFn = Callable[[nn.Module, dict[str, mx.array]], tuple[mx.array, mx.array, dict]]

# The metric a loss_fn may return as a count (tokens through the model), summed, not averaged.
TOKENS = "tokens"


class BatchStream(Protocol):
    """What the loop needs from services.runtime.datasets.Batches."""

    steps_per_epoch: int

    def __iter__(self) -> Iterator[dict]: ...
    def state(self) -> dict: ...
    def restore(self, state: dict) -> None: ...


@dataclass(frozen=True)
class TrainResult:
    step: int
    metrics: dict[str, float]
    checkpoint: CheckpointInfo | None  # the last checkpoint (None on non-main ranks)


# _arrays and _Step are looked up in this module at call time, never bound elsewhere:
# bench/parity_common.py swaps them to record every batch a step sees and the initial weights.
def _arrays(batch: dict) -> dict[str, mx.array]:
    # Python scalars in a compiled call are constants: each new value would retrace the step.
    return {k: v for k, v in batch.items() if isinstance(v, mx.array)}


def _scale(g: mx.array, w: mx.array) -> mx.array:
    # Token-weighted sums can leave float16's range; other dtypes stay as they are.
    if g.dtype == mx.float16:
        return g.astype(mx.float32) * w
    return g * w.astype(g.dtype)


def _step_seed(seed: int, counter: int) -> int:
    return ((seed & 0xFFFFFFFF) << 32) | (counter & 0xFFFFFFFF)


class _Step:
    """The compiled pieces of one optimizer step (built once per train() call)."""

    def __init__(self, model, loss_fn, optimizer, accum: int, clip: float, world) -> None:
        self.model, self.optimizer, self.accum, self.world = model, optimizer, accum, world
        # Ranks draw different dropout masks; rank 0 draws what a one-process run draws.
        self.seed_offset = 7919 * world.rank()
        self.state = [model.state, optimizer.state, mx.random.state]
        vg = nn.value_and_grad(model, loss_fn)
        n_proc = world.size()

        def forward(batch):
            (loss, weight, metrics), grads = vg(model, batch)
            w = weight.astype(mx.float32)
            sums = {"loss": loss * w, "weight": w}
            sums.update({k: v * w for k, v in metrics.items() if k != TOKENS})
            if TOKENS in metrics:
                sums[TOKENS] = metrics[TOKENS].astype(mx.float32)
            return sums, grads, w

        def finish(grads, w_total):
            out = {}
            if n_proc > 1:
                grads = nn.average_gradients(grads)
                w_total = mx.distributed.all_sum(w_total) / n_proc
            if w_total is not None:
                grads = tree_map(lambda g: g / w_total.astype(g.dtype), grads)
            if clip > 0:
                grads, norm = optim.clip_grad_norm(grads, clip)
                out["grad_norm"] = norm
            optimizer.update(model, grads)
            return out

        def single(batch):
            sums, grads, w = forward(batch)
            if n_proc > 1:  # ranks hold different token counts: weight before averaging
                return sums, finish(tree_map(lambda g: _scale(g, w), grads), w)
            return sums, finish(grads, None)

        def first(batch):
            sums, grads, w = forward(batch)
            return sums, tree_map(lambda g: _scale(g, w), grads), w

        def middle(batch, acc, w_acc):
            sums, grads, w = forward(batch)
            return sums, tree_map(lambda a, g: a + _scale(g, w), acc, grads), w_acc + w

        def last(batch, acc, w_acc):
            sums, grads, w = forward(batch)
            acc = tree_map(lambda a, g: a + _scale(g, w), acc, grads)
            return sums, finish(acc, w_acc + w)

        compile_ = partial(mx.compile, inputs=self.state, outputs=self.state)
        self.single, self.first = compile_(single), compile_(first)
        self.middle, self.last = compile_(middle), compile_(last)

    def __call__(self, batches: Iterator[dict], seed: int, counter: int) -> tuple[dict, dict]:
        """Run one optimizer step; returns (weighted metric sums, step outputs), evaluated."""
        total: dict[str, mx.array] = {}
        acc = w_acc = None
        for i in range(self.accum):
            mx.random.seed(_step_seed(seed + self.seed_offset, counter * self.accum + i))
            batch = _arrays(next(batches))
            if self.accum == 1:
                sums, out = self.single(batch)
            elif i == 0:
                sums, acc, w_acc = self.first(batch)
            elif i < self.accum - 1:
                sums, acc, w_acc = self.middle(batch, acc, w_acc)
            else:
                sums, out = self.last(batch, acc, w_acc)
                acc = w_acc = None
            total = {k: total[k] + v for k, v in sums.items()} if total else sums
            mx.eval(self.state, total, acc, w_acc)
        return total, out


def evaluate_all(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[dict] | None,
    num_batches: int = -1,
    *,
    compiled: Callable | None = None,
) -> dict[str, float]:
    """Weighted means of the loss (``"loss"``) and of every metric of ``loss_fn`` over
    ``num_batches`` (-1: all) batches, summed over ranks (all ranks must call it); ``{}``
    when there is nothing to evaluate."""
    if batches is None:
        return {}
    fn = compiled or (lambda b: loss_fn(model, b))
    model.eval()
    sums: dict[str, mx.array] = {}
    try:
        for i, batch in enumerate(batches):
            if 0 <= num_batches <= i:
                break
            loss, w, metrics = fn(_arrays(batch))
            w = w.astype(mx.float32)
            terms = {"loss": loss, **{k: v for k, v in metrics.items() if k != TOKENS}}
            for k, v in terms.items():
                sums[k] = sums.get(k, mx.array(0.0)) + v.astype(mx.float32) * w
            sums["_weight"] = sums.get("_weight", mx.array(0.0)) + w
            mx.eval(sums)
    finally:
        model.train()
    if not sums:
        return {}
    keys = sorted(sums)
    total = mx.stack([sums[k] for k in keys])
    if mx.distributed.init().size() > 1:
        total = mx.distributed.all_sum(total, stream=mx.cpu)
    got = dict(zip(keys, total.tolist(), strict=True))
    w = got.pop("_weight")
    return {k: v / w for k, v in got.items()} if w > 0 else {}


def evaluate(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[dict] | None,
    num_batches: int = -1,
    *,
    compiled: Callable | None = None,
) -> float | None:
    """Weighted mean loss over ``num_batches`` (-1: all) batches, summed over ranks."""
    return evaluate_all(model, loss_fn, batches, num_batches, compiled=compiled).get("loss")


# ---- the supervised / preference batch strategy ----


def _window_metrics(window: dict[str, float], seconds: float, steps: int, n_proc: int) -> dict:
    """Weighted means of the summed step metrics since the last flush (over all ranks)."""
    if not window:
        return {"_tokens": 0.0}
    if n_proc > 1:
        keys = sorted(window)
        summed = mx.distributed.all_sum(mx.array([window[k] for k in keys]), stream=mx.cpu)
        window = dict(zip(keys, summed.tolist(), strict=True))
    w = max(window["weight"], 1e-12)
    tokens = window.get(TOKENS, window["weight"])
    # Means over this window's training batches: named train_* apart from the val_* figures.
    out = {f"train_{k}": v / w for k, v in window.items() if k not in ("loss", "weight", TOKENS)}
    out["train_loss"] = window["loss"] / w
    out["tokens_per_second"] = tokens / max(seconds, 1e-9)
    out["steps_per_second"] = steps / max(seconds, 1e-9)
    out["_tokens"] = tokens
    return out


class BatchStrategy:
    """One optimizer step over ``grad_accumulation_steps`` micro-batches of a batch stream
    (``loss_fn``'s weighted sums); reports weight-averaged means as ``train_loss`` and
    ``train_<metric>``, and validates to ``val_loss`` and ``val_<metric>`` (plus ``val_ppl``
    with ``perplexity``: the loss is a per-token NLL)."""

    validates = True
    report_at_checkpoints = False

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train_batches: BatchStream,
        valid_batches: Iterable[dict] | None,
        loop: LoopSettings,
        opt: OptimizerSettings,
        optimizer: optim.Optimizer,
        extra: Stateful | None = None,
        perplexity: bool = False,
    ) -> None:
        self.model, self.loss_fn, self.loop, self.opt = model, loss_fn, loop, opt
        self.perplexity = perplexity
        self.optimizer, self.data, self.valid, self.extra = (
            optimizer,
            train_batches,
            valid_batches,
            extra,
        )
        self.n_proc = mx.distributed.init().size()
        self.out: dict[str, mx.array] = {}

    def start(self) -> None:
        # After any restore: the step captures the restored state, the iterator its position.
        # _Step is looked up here at call time (bench/parity_common.py swaps it).
        world = mx.distributed.init()
        accum, clip = self.loop.grad_accumulation_steps, self.opt.grad_clip_norm
        self.step_fn = _Step(self.model, self.loss_fn, self.optimizer, accum, clip, world)
        self.eval_fn = mx.compile(lambda b: self.loss_fn(self.model, b), inputs=self.model.state)
        self.model.train()
        self.batches = iter(self.data)

    def step(self, step: int) -> StepOutput:
        sums, self.out = self.step_fn(self.batches, self.loop.seed, step)
        sums = {k: v.item() for k, v in sums.items()}
        return StepOutput(sums, {"loss": sums["loss"] / max(sums["weight"], 1e-12)})

    def summarize(self, window: dict, seconds: float, steps: int) -> tuple[dict, int]:
        metrics = _window_metrics(window, seconds, steps, self.n_proc)
        tokens = int(round(metrics.pop("_tokens")))
        metrics["learning_rate"] = learning_rate(self.optimizer)
        metrics["peak_memory_gb"] = mx.get_peak_memory() / 1e9
        if "grad_norm" in self.out:
            metrics["grad_norm"] = self.out["grad_norm"].item()
        return metrics, tokens

    def validate(self) -> dict[str, float]:
        got = evaluate_all(
            self.model, self.loss_fn, self.valid, self.loop.val_batches, compiled=self.eval_fn
        )
        out = {f"val_{k}": v for k, v in got.items()}
        if self.perplexity and "val_loss" in out:
            out["val_ppl"] = math.exp(min(out["val_loss"], 700.0))
        return out


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_batches: BatchStream,
    valid_batches: Iterable[dict] | None,
    loop: LoopSettings,
    opt: OptimizerSettings,
    ctx: JobContext,
    artifact: Artifact,
    *,
    optimizer: optim.Optimizer | None = None,
    extra_state: Stateful | None = None,
    perplexity: bool = False,
) -> TrainResult:
    """Train ``model`` (its trainable parameters) to ``total_steps(loop, train_batches)``.
    ``perplexity``: ``loss_fn`` is a per-token NLL, so ``val_ppl = exp(val_loss)`` means
    something and is reported."""
    from mlx_lm.utils import maybe_set_recommended_wired_limit

    maybe_set_recommended_wired_limit()
    total = total_steps(loop, train_batches)
    optimizer = optimizer or build_optimizer(opt, total)
    optimizer.init(model.trainable_parameters())
    if loop.grad_checkpoint:
        enable_grad_checkpoint(model)
    strategy = BatchStrategy(
        model, loss_fn, train_batches, valid_batches, loop, opt, optimizer, extra_state, perplexity
    )
    done = run_steps(
        strategy,
        model=model,
        optimizer=optimizer,
        loop=loop,
        opt=opt,
        ctx=ctx,
        artifact=artifact,
        total=total,
    )
    progress = done.progress
    final = dict(progress.metrics)
    final["tokens"] = float(progress.tokens)
    final["train_time_s"] = progress.train_time
    final["tokens_per_second"] = progress.tokens / max(progress.train_time, 1e-9)
    final["steps"] = float(progress.step)
    final.pop("steps_per_second", None)
    return TrainResult(step=progress.step, metrics=final, checkpoint=done.checkpoint)
