"""A tiny but real trainer for tests of the job machinery (entry ``TEST_ENTRY``).

It fits a linear regression with SGD in MLX (the loss really falls), reports every step,
checkpoints every ``checkpoint_every`` steps like a real trainer (atomic dir with
state.json + manifest.json under output_dir/checkpoints/step_XXXXXXX), resumes from
``ctx.resume_from`` at the saved step with the saved weights, and on ``ctx.should_stop()``
saves and raises Interrupted.

Config: ``steps`` (required), ``checkpoint_every`` (default 2), ``lr`` (default 0.1),
``seed`` (default 0), ``fail_at_step`` (raise RuntimeError at that step) and
``step_delay_s`` (sleep after each step). The last two exist only so tests can make a job
fail, or kill / cancel / interrupt it mid-run; no real trainer has them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import mlx.core as mx

from services.runtime.contract import CheckpointInfo, Interrupted, JobContext, Report

TEST_ENTRY = "services.runtime.jobs.testing:run"

_FEATURES, _ROWS = 8, 64


def _data(seed: int) -> tuple[mx.array, mx.array]:
    key = mx.random.key(seed)
    kx, kw, kn = mx.random.split(key, 3)
    x = mx.random.normal((_ROWS, _FEATURES), key=kx)
    w_true = mx.random.normal((_FEATURES,), key=kw)
    y = x @ w_true + 0.01 * mx.random.normal((_ROWS,), key=kn)
    return x, y


def _loss(w: mx.array, x: mx.array, y: mx.array) -> mx.array:
    return mx.mean(mx.square(x @ w - y))


def save_checkpoint(
    output_dir: Path, name: str, step: int, w: mx.array, loss: float, job_id: str
) -> CheckpointInfo:
    """Write output_dir/checkpoints/<name> (or output_dir/<name> for "final") atomically."""
    parent = output_dir if name == "final" else output_dir / "checkpoints"
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / name
    tmp = parent / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {"step": step, "w": w.tolist(), "loss": loss}
    (tmp / "state.json").write_text(json.dumps(state))
    manifest = {"job_id": job_id, "step": step, "metrics": {"loss": loss}, "files": ["state.json"]}
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return CheckpointInfo(path=final, kind="full", step=step, metrics={"loss": loss})


def run(config: dict, ctx: JobContext) -> CheckpointInfo:
    steps = int(config["steps"])
    every = int(config.get("checkpoint_every", 2))
    lr = float(config.get("lr", 0.1))
    fail_at = config.get("fail_at_step")
    delay = float(config.get("step_delay_s", 0.0))
    x, y = _data(int(config.get("seed", 0)))
    grad_fn = mx.value_and_grad(_loss)

    step, w, loss = 0, mx.zeros((_FEATURES,)), float(_loss(mx.zeros((_FEATURES,)), x, y))
    if ctx.resume_from is not None:
        state = json.loads((ctx.resume_from / "state.json").read_text())
        step, w, loss = state["step"], mx.array(state["w"]), state["loss"]
        ctx.log(f"resumed at step {step}")
    saved = step

    def save(name: str) -> CheckpointInfo:
        # Data-parallel ranks hold the same weights: only rank 0 writes.
        parent = ctx.output_dir if name == "final" else ctx.output_dir / "checkpoints"
        if not ctx.is_main:
            return CheckpointInfo(path=parent / name, kind="full", step=step)
        info = save_checkpoint(ctx.output_dir, name, step, w, loss, ctx.job_id)
        ctx.checkpoint_written(info)
        return info

    while step < steps:
        if ctx.should_stop():
            if saved != step:
                save(f"step_{step:07d}")
            raise Interrupted(f"stopped at step {step}")
        if fail_at is not None and step + 1 == int(fail_at):
            raise RuntimeError(f"fail_at_step={fail_at} reached")
        value, grad = grad_fn(w, x, y)
        w = w - lr * grad
        mx.eval(w, value)
        step, loss = step + 1, value.item()
        ctx.report(Report(step=step, total_steps=steps, metrics={"loss": loss}))
        if step % every == 0:
            save(f"step_{step:07d}")
            saved = step
        if delay:
            time.sleep(delay)
    return save("final")
