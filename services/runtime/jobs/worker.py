"""Run one job in its own process: ``python -m services.runtime.jobs.worker --db DB --job ID``.

The runner has already moved the job to RUNNING. The worker builds a JobContext whose
callbacks become events in the job database, calls the trainer named by ``job.entry``
(``"module:function"``) with the job's resolved config, and records the outcome.

Exit codes: 0 finished (SUCCEEDED, or the job was no longer RUNNING, e.g. cancelled),
1 the trainer failed (the job is FAILED), 75 interrupted after a checkpoint (SIGTERM or
SIGUSR1; the runner requeues the job unless it was cancelled), 2 bad command line.

Data parallel: with ``MLXU_DISTRIBUTED=1`` (set by the runner when it starts the worker
through ``mlx.launch``), every rank runs this module; only rank 0 writes to the database.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import signal
import sqlite3
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import structlog

from services.runtime import logs
from services.runtime.contract import CheckpointInfo, Interrupted, JobContext, Report, TrainerFn
from services.runtime.jobs.store import JobState, JobStore
from services.runtime.settings import Settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: try again later, from the checkpoint

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step_(\d+)$")

log = structlog.get_logger()


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """Newest dir under output_dir/checkpoints holding a manifest.json.

    The manifest is written last, so a dir without one is an interrupted save. Hidden and
    ``*.tmp`` dirs are in-progress atomic saves (temp dir + rename) and never count.
    """
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [
        d
        for d in root.iterdir()
        if d.is_dir()
        and not d.name.startswith(".")
        and not d.name.endswith(".tmp")
        and (d / MANIFEST).is_file()
    ]

    def order(d: Path) -> tuple[int, float]:
        m = _STEP_DIR.search(d.name)
        return (int(m.group(1)) if m else -1, d.stat().st_mtime)

    return max(done, key=order, default=None)


def checkpoint_payload(info: CheckpointInfo, job_id: str) -> dict[str, Any]:
    """The JSON shape of a checkpoint (events, latest_checkpoint, result): proto Checkpoint."""
    return {
        "path": str(info.path),
        "kind": info.kind,
        "step": int(info.step),
        "base_model": info.base_model,
        "sha256": info.sha256,
        "job_id": job_id,
        "metrics": {k: float(v) for k, v in info.metrics.items()},
        "create_time": time.time(),
    }


def load_entry(entry: str) -> TrainerFn:
    module, _, name = entry.partition(":")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ImportError(f"trainer entry {entry!r}: {module} has no function {name!r}")
    return fn


class StopFlag:
    """Set by SIGTERM (cancel) or SIGUSR1 (service shutdown); read through ctx.should_stop."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signum = signum

    def __call__(self) -> bool:
        return self.signum is not None


def sync_stop_flag(local: bool, group: Any = None) -> bool:
    """Agree on stopping across data-parallel ranks: true on every rank if true on any.

    A collective (an all_sum of one int): every rank must call it at the same point of the
    loop, which is why ``ctx.should_stop`` is wired to it under MLXU_DISTRIBUTED and
    trainers must call ``should_stop()`` unconditionally once per step on every rank.
    Signals reach ranks at different moments (or only the local host's ranks), so
    without this the ranks would stop at different steps and deadlock in the next all_sum.
    TODO(distributed): measure its cost per step on multi-host rings; if it matters, check
    every N steps (the loop's checkpoint cadence) instead of every step.
    """
    if group is None or group.size() == 1:
        return local
    import mlx.core as mx

    flag = mx.distributed.all_sum(mx.array(1 if local else 0, dtype=mx.int32), group=group)
    return int(flag.item()) > 0


def _init_distributed() -> Any:
    """The global group when the runner launched this job data-parallel, else None."""
    if os.environ.get("MLXU_DISTRIBUTED") != "1":
        return None
    import mlx.core as mx

    return mx.distributed.init(strict=True)


class _Recorder:
    """Turns JobContext callbacks into events (rank 0 only)."""

    def __init__(self, store: JobStore, job_id: str, metrics: dict[str, float]) -> None:
        self.store = store
        self.job_id = job_id
        # Job metrics keep the latest value of each name: val_loss survives train-only reports.
        self.metrics = dict(metrics)
        self.t0 = time.monotonic()
        self.first_step: int | None = None

    def _append(self, type: str, payload: dict, updates: dict | None = None) -> None:
        try:
            self.store.append_event(self.job_id, type, payload, updates)
        except sqlite3.Error as exc:
            # A lost event must not kill a training run; the next report carries the state.
            log.warning("event_not_recorded", type=type, error=str(exc))

    def _eta(self, r: Report) -> float:
        if r.eta_seconds or not r.total_steps:
            return float(r.eta_seconds)
        if self.first_step is None:
            self.first_step, self.t0 = r.step, time.monotonic()
            return 0.0
        done = r.step - self.first_step
        rate = done / max(time.monotonic() - self.t0, 1e-9)
        return (r.total_steps - r.step) / rate if done > 0 else 0.0

    def report(self, r: Report) -> None:
        metrics = {k: float(v) for k, v in r.metrics.items()}
        self.metrics.update(metrics)
        eta = self._eta(r)
        payload = {
            "step": int(r.step),
            "total_steps": int(r.total_steps),
            "epoch": float(r.epoch),
            "tokens": int(r.tokens),
            "eta_seconds": eta,
            "metrics": metrics,
        }
        updates = {
            "step": int(r.step),
            "total_steps": int(r.total_steps),
            "metrics": self.metrics,
            "eta_seconds": eta,
        }
        self._append("progress", payload, updates)

    def checkpoint(self, info: CheckpointInfo) -> None:
        payload = checkpoint_payload(info, self.job_id)
        self._append("checkpoint", payload, {"latest_checkpoint": payload})

    def log(self, text: str, level: str = "info") -> None:
        self._append("log", {"level": level, "text": text})


def run_job(store: JobStore, job_id: str, stop: StopFlag) -> int:
    job = store.get(job_id)
    if job.state is not JobState.RUNNING:
        log.warning("job_not_running", state=job.state.value)
        return EXIT_OK
    group = _init_distributed()
    rank, world = (group.rank(), group.size()) if group is not None else (0, 1)
    structlog.contextvars.bind_contextvars(rank=rank)
    output_dir = Path(job.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resume_from = latest_complete_checkpoint(output_dir)
    ctx = JobContext(
        job_id=job_id,
        output_dir=output_dir,
        resume_from=resume_from,
        should_stop=stop if group is None else (lambda: sync_stop_flag(stop(), group)),
        rank=rank,
        world_size=world,
        home=Settings.from_env("worker").home,
    )
    rec = _Recorder(store, job_id, job.metrics) if rank == 0 else None
    if rec is not None:
        ctx.report, ctx.checkpoint_written, ctx.log = rec.report, rec.checkpoint, rec.log
        start = f"resuming from {resume_from}" if resume_from else "starting from step 0"
        rec.log(f"attempt {job.attempts} (pid {os.getpid()}, {world} process(es)): {start}")
    log.info("job_start", entry=job.entry, resume_from=str(resume_from or ""), world=world)
    try:
        result = load_entry(job.entry)(job.config, ctx)
        if result is not None and not isinstance(result, CheckpointInfo):
            raise TypeError(f"trainer returned {type(result).__name__}, not CheckpointInfo")
    except Interrupted:
        log.info("job_interrupted", signal=stop.signum)
        return EXIT_INTERRUPTED
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        log.error("job_failed", reason=reason, exc_info=True)
        if rec is not None:
            rec.log(traceback.format_exc()[-20000:], level="error")
            store.transition(job_id, JobState.FAILED, reason, expect={JobState.RUNNING})
        return EXIT_FAILED
    if rec is not None:
        fields: dict[str, Any] = {"eta_seconds": 0.0}
        if result is not None:
            fields["result"] = checkpoint_payload(result, job_id)
            fields["metrics"] = {**rec.metrics, **fields["result"]["metrics"]}
        # Conditional: a cancel that landed while the trainer finished wins.
        done = store.transition(
            job_id, JobState.SUCCEEDED, "trainer finished", expect={JobState.RUNNING}, **fields
        )
        log.info("job_done", recorded=done is not None)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    stop = StopFlag()
    stop.install()  # first: a cancel during start-up must not kill us mid-write
    parser = argparse.ArgumentParser(prog="python -m services.runtime.jobs.worker")
    parser.add_argument("--db", required=True, type=Path, help="the service's job database")
    parser.add_argument("--job", required=True, help="job id")
    args = parser.parse_args(argv)
    logs.configure("worker")
    structlog.contextvars.bind_contextvars(job_id=args.job, pid=os.getpid())
    return run_job(JobStore(args.db), args.job, stop)


if __name__ == "__main__":
    sys.exit(main())
