"""The one training loop: everything around a step, whatever one step does.

Every trainer ends in ``run_steps(strategy, ...)``. The ``StepStrategy`` says what one
optimizer step (or one RL iteration) does and returns; the loop does the rest in one place:

- resume: ``ctx.resume_from`` restores the trainable weights, the optimizer, the data
  position (``strategy.data``) and the extra state (``strategy.extra``: a KL controller, a
  rollout RNG key) through ``trainer_state.restore``, before ``strategy.start()``;
- non-finite detection: a NaN or infinite value in a step's ``watch`` fails the run
  (``NonFiniteLoss``) before anything of that step is saved;
- reports (``Report``: step, total, metrics, epoch, tokens, ETA) every ``steps_per_report``
  steps and at the end, metrics summed over the steps since the last report and turned into
  means by ``strategy.summarize``; validation before the first step (a step-0 report: the
  starting weights' figures, so every curve has its "before"), every ``steps_per_eval``
  steps and at the end. A resumed run does not validate again at its start: its step-0
  figures are in the log of the attempt that ran step 0, and validation changes no state;
- checkpoints (the model through ``artifact.write``, the trainer state, a manifest) every
  ``steps_per_checkpoint`` steps, at the end and on stop, keeping ``keep_last_checkpoints``;
- ``ctx.should_stop()`` (agreed over data-parallel ranks): save, then raise ``Interrupted``.

Two strategies exist: ``services.runtime.loop.BatchStrategy`` (a supervised or preference
batch through a compiled step: SFT, distillation, reward model, DPO, KTO, ORPO; its entry
point is ``loop.train``) and ``services.rlhf.trainers.RolloutStrategy`` (sample a rollout
batch, score it, update: PPO, GRPO).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from services.runtime import checkpoints, trainer_state
from services.runtime.contract import CheckpointInfo, Interrupted, JobContext, Report
from services.runtime.loop_settings import LoopSettings
from services.runtime.optim import OptimizerSettings
from services.runtime.trainer_state import Progress, Stateful

__all__ = [
    "Artifact",
    "NonFiniteLoss",
    "Outcome",
    "StepOutput",
    "StepStrategy",
    "run_steps",
]


class NonFiniteLoss(RuntimeError):
    pass


@dataclass(frozen=True)
class Artifact:
    """How the trainer's model becomes an mlx-lm directory, and what its manifest says."""

    kind: str  # "adapter" | "full"
    write: Callable[[Path], None]  # writes adapters.safetensors+config or a full model dir
    base_model: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # resolved config, for manifests


@dataclass(frozen=True)
class StepOutput:
    """What one step returns, as plain floats (already evaluated)."""

    sums: dict[str, float]  # added up over the report window, read by ``summarize``
    watch: dict[str, float]  # values that must be finite (else NonFiniteLoss)


class StepStrategy(Protocol):
    """What one step of a method does; ``run_steps`` does everything around it."""

    data: Any  # the stream whose position checkpoints hold (``state()``/``restore()``, ``epoch``)
    extra: Stateful | None  # further state saved with every checkpoint
    validates: bool  # has a validation pass: steps_per_eval steps validate and report
    report_at_checkpoints: bool  # every checkpoint (and a stop) also reports

    def start(self) -> None:
        """Called once after any restore, before the first step (compile, open iterators)."""

    def step(self, step: int) -> StepOutput:
        """Run step ``step`` (0-based: the steps done before it)."""

    def summarize(
        self, window: dict[str, float], seconds: float, steps: int
    ) -> tuple[dict[str, float], int]:
        """Metrics of the ``steps`` steps (``seconds`` of training) whose ``sums`` were
        added up into ``window``, and the tokens they consumed over all ranks. Called at
        the same steps on every rank (it may reduce over ranks)."""

    def validate(self) -> dict[str, float]:
        """Validation metrics (``{}``: nothing to validate on)."""


@dataclass(frozen=True)
class Outcome:
    progress: Progress  # where the run ended: step, tokens, train time, last metrics
    checkpoint: CheckpointInfo | None  # the last checkpoint (None on non-main ranks)


def run_steps(
    strategy: StepStrategy,
    *,
    model: nn.Module,
    optimizer: optim.Optimizer,
    loop: LoopSettings,
    opt: OptimizerSettings,
    ctx: JobContext,
    artifact: Artifact,
    total: int,
) -> Outcome:
    """Run ``strategy`` from step 0 (or the resumed step) to ``total``."""
    world = mx.distributed.init()
    n_proc = world.size()
    is_main = world.rank() == 0 and ctx.is_main
    data, extra = strategy.data, strategy.extra

    progress = Progress()
    if ctx.resume_from is not None:
        progress = trainer_state.restore(Path(ctx.resume_from), model, optimizer, data, extra)
        ctx.log(f"resumed from {ctx.resume_from} at step {progress.step}")
    strategy.start()
    if progress.step == 0 and strategy.validates and loop.steps_per_eval > 0:
        before = strategy.validate()  # every rank: validation may reduce over ranks
        if before:
            progress.metrics.update(before)
            if is_main:
                ctx.report(
                    Report(
                        step=0,
                        total_steps=total,
                        metrics=dict(progress.metrics),
                        epoch=float(getattr(data, "epoch", 0.0)),
                        tokens=0,
                    )
                )

    ckpt_root = Path(ctx.output_dir) / checkpoints.CHECKPOINTS
    last_ckpt: CheckpointInfo | None = None

    def save() -> None:
        nonlocal last_ckpt
        if not is_main:
            return

        def write(tmp: Path) -> None:
            artifact.write(tmp)
            trainer_state.write_trainer_state(
                tmp / checkpoints.TRAINER_STATE, optimizer, progress, data, extra
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

    def should_stop() -> bool:
        stop = bool(ctx.should_stop())
        if n_proc > 1:  # every rank must leave the loop at the same step
            stop = mx.distributed.all_sum(mx.array(int(stop)), stream=mx.cpu).item() > 0
        return stop

    window: dict[str, float] = {}
    window_time, window_steps = 0.0, 0
    session_time, session_steps = 0.0, 0
    while progress.step < total:
        tic = time.perf_counter()
        out = strategy.step(progress.step)
        elapsed = time.perf_counter() - tic
        progress.step += 1
        progress.train_time += elapsed
        window_time, session_time = window_time + elapsed, session_time + elapsed
        window_steps, session_steps = window_steps + 1, session_steps + 1
        _check_finite(out.watch, progress.step, opt)
        for k, v in out.sums.items():
            window[k] = window.get(k, 0.0) + v

        last = progress.step == total
        stop = not last and should_stop()
        every = loop.steps_per_checkpoint
        ckpt_due = last or stop or (every > 0 and progress.step % every == 0)
        report_due = last or progress.step % loop.steps_per_report == 0
        eval_due = (
            strategy.validates
            and loop.steps_per_eval > 0
            and (last or progress.step % loop.steps_per_eval == 0)
        )
        if report_due or ckpt_due:  # checkpoints carry up-to-date metrics and token counts
            metrics, tokens = strategy.summarize(window, window_time, window_steps)
            progress.metrics.update(metrics)
            progress.tokens += tokens
            window, window_time, window_steps = {}, 0.0, 0
        if eval_due:
            progress.metrics.update(strategy.validate())
        report = report_due or eval_due or (strategy.report_at_checkpoints and ckpt_due)
        if report and is_main:
            ctx.report(
                Report(
                    step=progress.step,
                    total_steps=total,
                    metrics=dict(progress.metrics),
                    epoch=float(getattr(data, "epoch", 0.0)),
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
        if ctx.resume_from:
            last_ckpt = checkpoints.info(Path(ctx.resume_from))
        else:
            save()
    return Outcome(progress, last_ckpt)


def _check_finite(watch: dict[str, float], step: int, opt: OptimizerSettings) -> None:
    for name, value in watch.items():
        if not math.isfinite(value):
            raise NonFiniteLoss(
                f"{name} became {'NaN' if math.isnan(value) else 'infinite'} at step "
                f"{step}; lower the learning rate (now {opt.learning_rate:g})"
                + ("" if opt.grad_clip_norm else " or set optimizer.grad_clip_norm")
            )
