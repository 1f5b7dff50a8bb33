"""Every job's reported metrics as TensorBoard scalars, beside its checkpoints.

`<output_dir>/tensorboard/` holds standard event files (tensorboardX's writer), so
``tensorboard --logdir <MLXU_HOME>/checkpoints`` shows every job's curves: train_* under
``train/``, val_* under ``val/`` (held-out), the rest (learning rate, tok/s, memory, reward, KL)
under ``run/``. A resumed attempt writes with ``purge_step`` at its checkpoint's step, so the
curves show each step once, as TensorBoard's own resume handling does. Writing scalars must
never fail a training job: a problem is logged once and the sink switches itself off.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger()

DIRNAME = "tensorboard"
_STEP = re.compile(r"(\d+)$")


def tag(name: str) -> str:
    """ "train_loss" -> "train/loss", "val_accuracy" -> "val/accuracy", "lr" -> "run/lr"."""
    for split in ("train", "val"):
        if name.startswith(split + "_"):
            return f"{split}/{name[len(split) + 1 :]}"
    return f"run/{name}"


def resume_step(resume_from: Path | None) -> int | None:
    """The step of a checkpoint directory (``step_0000040`` -> 40), None when fresh."""
    if resume_from is None:
        return None
    m = _STEP.search(Path(resume_from).name)
    return int(m.group(1)) if m else None


class ScalarLog:
    """Lazily opened: a job that never reports writes no event file."""

    def __init__(self, output_dir: Path, resume_from: Path | None = None) -> None:
        self.dir = Path(output_dir) / DIRNAME
        self.purge = resume_step(resume_from)
        self._writer: Any = None
        self.enabled = True

    def add(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        try:
            if self._writer is None:
                from tensorboardX import SummaryWriter

                self._writer = SummaryWriter(
                    str(self.dir),
                    purge_step=self.purge,
                    flush_secs=5,
                    # One file per attempt, even two in the same second on the same host.
                    filename_suffix=f".{os.getpid()}.{time.time_ns()}",
                )
            for name, value in metrics.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._writer.add_scalar(tag(name), float(value), int(step))
        except Exception as exc:  # noqa: BLE001 - scalars are a view; training goes on
            self.enabled = False
            log.warning("tensorboard_disabled", error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("tensorboard_close_failed", error=str(exc))
            self._writer = None
