"""The job model: states, the transitions between them, and the records the store returns.

Everything that talks about jobs (the runner, the worker, the servicers' proto conversion)
speaks in these types; only store.py knows how they sit in SQLite.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "EVENT_TYPES",
    "TERMINAL",
    "TRANSITIONS",
    "EventRecord",
    "JobRecord",
    "JobState",
    "new_job_id",
]


class JobState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# RUNNING -> PENDING requeues a job whose worker stopped (interrupt, crash, service restart):
# the next worker resumes from the newest checkpoint.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.PENDING}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

EVENT_TYPES = frozenset({"state", "progress", "checkpoint", "log"})


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    kind: str
    entry: str
    state: JobState
    request_id: str | None
    config: dict[str, Any]
    output_dir: str
    labels: dict[str, str]
    create_time: float
    start_time: float | None
    end_time: float | None
    step: int
    total_steps: int
    metrics: dict[str, float]
    latest_checkpoint: dict[str, Any] | None
    result: dict[str, Any] | None
    error: str
    attempts: int
    worker_pid: int | None
    eta_seconds: float
    last_seq: int

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class EventRecord:
    job_id: str
    seq: int
    time: float
    type: str
    payload: dict[str, Any]


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:16]}"
