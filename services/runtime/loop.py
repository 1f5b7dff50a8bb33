"""The training loop every trainer shares (SFT, distillation, reward models, DPO, ...).

A trainer builds the model, its data and a loss, then calls::

    result = train(model, loss_fn, train_batches, valid_batches, loop, opt, ctx, artifact)

``loss_fn(model, batch) -> (loss, weight, metrics)``: ``loss`` is a scalar mean over ``weight``
units (tokens for SFT, pairs for DPO); ``metrics`` is a dict of scalars reported as
weight-averaged means. Micro-batches and data-parallel ranks are combined weighted by
``weight``, so accumulating 2 micro-batches of 2 gives the same update as one batch of 4.

Batch sizes: ``loop.batch_size`` is the global batch (sequences per optimizer step over all
ranks and micro-batches). Each optimizer step consumes ``grad_accumulation_steps``
micro-batches from ``train_batches``, which must be built with the global micro-batch size
``loop.micro_batch_size`` (each rank holding ``micro_batch_size / world_size`` rows).
``step`` counts optimizer steps; report / eval / checkpoint intervals are in those steps.

The step is compiled once (``mx.compile`` with the model, optimizer and RNG state as inputs
and outputs); loss and state are evaluated every step so no lazy graph outlives it. Every
``steps_per_checkpoint`` steps, at the end, and when ``ctx.should_stop()`` turns true, the
model (via ``artifact.write``) and the trainer state (optimizer, step, data position, extra
state) are saved atomically; a job restarted with ``ctx.resume_from`` continues exactly
where that checkpoint left off. Dropout keys derive from (seed, step), so resumed runs draw
the same randomness as uninterrupted ones.

Around it: the config sections trainers share are in ``loop_settings``, the trainer-state
files and their restore in ``trainer_state`` (PPO / GRPO use them too), gradient
checkpointing in ``grad_checkpoint``; this module re-exports what trainers import.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from services.runtime import checkpoints, trainer_state
from services.runtime.contract import CheckpointInfo, Interrupted, JobContext, Report
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
    "sub",
    "total_steps",
    "train",
]

LossFn = Callable[[nn.Module, dict[str, mx.array]], tuple[mx.array, mx.array, dict]]


class BatchStream(Protocol):
    """What the loop needs from services.runtime.datasets.Batches."""

    steps_per_epoch: int

    def __iter__(self) -> Iterator[dict]: ...
    def state(self) -> dict: ...
    def restore(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Artifact:
    """How the trainer's model becomes an mlx-lm directory, and what its manifest says."""

    kind: str  # "adapter" | "full"
    write: Callable[[Path], None]  # writes adapters.safetensors+config or a full model dir
    base_model: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # resolved config, for manifests


@dataclass(frozen=True)
class TrainResult:
    step: int
    metrics: dict[str, float]
    checkpoint: CheckpointInfo | None  # the last checkpoint (None on non-main ranks)


class NonFiniteLoss(RuntimeError):
    pass


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
            sums = {"loss": loss * w, "weight": w, **{k: v * w for k, v in metrics.items()}}
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


def evaluate(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[dict] | None,
    num_batches: int = -1,
    *,
    compiled: Callable | None = None,
) -> float | None:
    """Weighted mean loss over ``num_batches`` (-1: all) batches, summed over ranks."""
    if batches is None:
        return None
    fn = compiled or (lambda b: loss_fn(model, b))
    model.eval()
    total, weight = mx.array(0.0), mx.array(0.0)
    try:
        for i, batch in enumerate(batches):
            if 0 <= num_batches <= i:
                break
            loss, w, _ = fn(_arrays(batch))
            w = w.astype(mx.float32)
            total, weight = total + loss.astype(mx.float32) * w, weight + w
            mx.eval(total, weight)
    finally:
        model.train()
    if mx.distributed.init().size() > 1:
        total = mx.distributed.all_sum(total, stream=mx.cpu)
        weight = mx.distributed.all_sum(weight, stream=mx.cpu)
    w = weight.item()
    return total.item() / w if w > 0 else None


# ---- the loop ----


def _window_metrics(window: dict[str, float], seconds: float, steps: int, n_proc: int) -> dict:
    """Weighted means of the summed step metrics since the last flush (over all ranks)."""
    if not window:
        return {"_tokens": 0.0}
    if n_proc > 1:
        keys = sorted(window)
        summed = mx.distributed.all_sum(mx.array([window[k] for k in keys]), stream=mx.cpu)
        window = dict(zip(keys, summed.tolist(), strict=True))
    w = max(window["weight"], 1e-12)
    out = {k: v / w for k, v in window.items() if k not in ("loss", "weight")}
    out["train_loss"] = window["loss"] / w
    out["tokens_per_second"] = window["weight"] / max(seconds, 1e-9)
    out["steps_per_second"] = steps / max(seconds, 1e-9)
    out["_tokens"] = window["weight"]
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
) -> TrainResult:
    """Train ``model`` (its trainable parameters) to ``total_steps(loop, train_batches)``."""
    from mlx_lm.utils import maybe_set_recommended_wired_limit

    maybe_set_recommended_wired_limit()
    world = mx.distributed.init()
    n_proc = world.size()
    is_main = world.rank() == 0 and ctx.is_main
    total = total_steps(loop, train_batches)
    optimizer = optimizer or build_optimizer(opt, total)
    optimizer.init(model.trainable_parameters())
    if loop.grad_checkpoint:
        enable_grad_checkpoint(model)

    progress = trainer_state.Progress()
    if ctx.resume_from is not None:
        resume = Path(ctx.resume_from)
        progress = trainer_state.restore(resume, model, optimizer, train_batches, extra_state)
        ctx.log(f"resumed from {ctx.resume_from} at step {progress.step}")

    step_fn = _Step(
        model, loss_fn, optimizer, loop.grad_accumulation_steps, opt.grad_clip_norm, world
    )
    eval_fn = mx.compile(lambda b: loss_fn(model, b), inputs=model.state)
    ckpt_root = Path(ctx.output_dir) / checkpoints.CHECKPOINTS
    last_ckpt: CheckpointInfo | None = None

    def save() -> CheckpointInfo | None:
        nonlocal last_ckpt
        if not is_main:
            return None

        def write(tmp: Path) -> None:
            artifact.write(tmp)
            trainer_state.write_trainer_state(
                tmp / checkpoints.TRAINER_STATE, optimizer, progress, train_batches, extra_state
            )

        manifest = {
            "job_id": ctx.job_id,
            "kind": artifact.kind,
            "base_model": artifact.base_model,
            "config": artifact.config,
            "metrics": progress.metrics,
        }
        last_ckpt = checkpoints.save(
            ckpt_root, progress.step, write, manifest, loop.keep_last_checkpoints
        )
        ctx.checkpoint_written(last_ckpt)
        return last_ckpt

    def validate() -> None:
        if loop.steps_per_eval == -1:
            return
        val = evaluate(model, loss_fn, valid_batches, loop.val_batches, compiled=eval_fn)
        if val is not None:
            progress.metrics["val_loss"] = val
            progress.metrics["val_ppl"] = math.exp(min(val, 700.0))

    def should_stop() -> bool:
        stop = bool(ctx.should_stop())
        if n_proc > 1:  # every rank must leave the loop at the same step
            stop = mx.distributed.all_sum(mx.array(int(stop)), stream=mx.cpu).item() > 0
        return stop

    model.train()
    batches = iter(train_batches)
    window: dict[str, float] = {}
    window_time, window_steps = 0.0, 0
    session_time, session_steps = 0.0, 0
    while progress.step < total:
        tic = time.perf_counter()
        sums, out = step_fn(batches, loop.seed, progress.step)
        step_sums = {k: v.item() for k, v in sums.items()}
        elapsed = time.perf_counter() - tic
        progress.step += 1
        progress.train_time += elapsed
        window_time, session_time = window_time + elapsed, session_time + elapsed
        window_steps, session_steps = window_steps + 1, session_steps + 1
        step_loss = step_sums["loss"] / max(step_sums["weight"], 1e-12)
        if not math.isfinite(step_loss):
            raise NonFiniteLoss(
                f"loss became {'NaN' if math.isnan(step_loss) else 'infinite'} at step "
                f"{progress.step}; lower the learning rate (now {opt.learning_rate:g})"
                + ("" if opt.grad_clip_norm else " or set optimizer.grad_clip_norm")
            )
        for k, v in step_sums.items():
            window[k] = window.get(k, 0.0) + v

        last = progress.step == total
        stop = not last and should_stop()
        report_due = last or progress.step % loop.steps_per_report == 0
        eval_due = loop.steps_per_eval > 0 and (last or progress.step % loop.steps_per_eval == 0)
        ckpt_due = (
            last
            or stop
            or (loop.steps_per_checkpoint > 0 and progress.step % loop.steps_per_checkpoint == 0)
        )
        if report_due or ckpt_due:  # checkpoints carry up-to-date metrics and token counts
            progress.metrics.update(_window_metrics(window, window_time, window_steps, n_proc))
            progress.tokens += int(round(progress.metrics.pop("_tokens")))
            progress.metrics["learning_rate"] = learning_rate(optimizer)
            progress.metrics["peak_memory_gb"] = mx.get_peak_memory() / 1e9
            if "grad_norm" in out:
                progress.metrics["grad_norm"] = out["grad_norm"].item()
            window, window_time, window_steps = {}, 0.0, 0
        if eval_due:
            validate()
        if (report_due or eval_due) and is_main:
            ctx.report(
                Report(
                    step=progress.step,
                    total_steps=total,
                    metrics=dict(progress.metrics),
                    epoch=float(getattr(train_batches, "epoch", 0.0)),
                    tokens=progress.tokens,
                    eta_seconds=(total - progress.step) * session_time / session_steps,
                )
            )
        if ckpt_due:
            save()
        if stop:
            raise Interrupted(f"stopped on request at step {progress.step}")

    if session_steps == 0:
        # Resumed from the last checkpoint: nothing left to train.
        last_ckpt = checkpoints.info(Path(ctx.resume_from)) if ctx.resume_from else save()
    final = dict(progress.metrics)
    final["tokens"] = float(progress.tokens)
    final["train_time_s"] = progress.train_time
    final["tokens_per_second"] = progress.tokens / max(progress.train_time, 1e-9)
    final["steps"] = float(progress.step)
    final.pop("steps_per_second", None)
    return TrainResult(step=progress.step, metrics=final, checkpoint=last_ckpt)
