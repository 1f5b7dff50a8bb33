"""The contract between a job worker and a trainer.

A trainer is a plain function ``run(config: dict, ctx: JobContext) -> CheckpointInfo``
named by a dotted path (``"services.training.trainers.sft:run"``) stored on the job. It
knows nothing of gRPC or the job database: it reports through ``ctx``, saves checkpoints
under ``ctx.output_dir``, resumes from ``ctx.resume_from`` and stops cleanly (raising
``Interrupted`` after a checkpoint) when ``ctx.should_stop()`` turns true.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class Interrupted(Exception):
    """Raised by a trainer that stopped on request after saving a resumable checkpoint."""


@dataclass(frozen=True)
class Report:
    step: int
    total_steps: int
    metrics: dict[str, float]
    epoch: float = 0.0
    tokens: int = 0
    eta_seconds: float = 0.0


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    kind: Literal["adapter", "full"]
    step: int
    base_model: str = ""
    sha256: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def _noop(*_: Any) -> None:
    return None


@dataclass
class JobContext:
    job_id: str
    # Everything the job writes lives here: checkpoints/step_XXXXXXX/, final/.
    output_dir: Path
    # Latest complete checkpoint of an earlier attempt of this job, if any.
    resume_from: Path | None = None
    report: Callable[[Report], None] = _noop
    checkpoint_written: Callable[[CheckpointInfo], None] = _noop
    log: Callable[[str], None] = _noop
    should_stop: Callable[[], bool] = lambda: False
    rank: int = 0
    world_size: int = 1
    # Model and data roots, for trainers that resolve references themselves.
    home: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


TrainerFn = Callable[[dict, JobContext], CheckpointInfo]
