"""Run one job in its own process: ``python -m services.runtime.jobs.worker --db DB --job ID``.

The runner has already moved the job to RUNNING. The worker builds a JobContext whose
callbacks become events in the job database, calls the trainer named by ``job.entry``
(``"module:function"``) with the job's resolved config, and records the outcome.

Exit codes: 0 finished (SUCCEEDED, or the job was no longer RUNNING, e.g. cancelled),
1 the trainer failed (the job is FAILED), 75 interrupted after a checkpoint (SIGTERM or
SIGUSR1; the runner requeues the job unless it was cancelled), 2 bad command line.

Data parallel: with ``MLXU_DISTRIBUTED=1`` (set by the runner when it starts the worker
through ``mlx.launch``), every rank runs this module. The job (entry, config, output dir,
checkpoint to resume from) comes from ``MLXU_JOB_SPEC`` (JSON, set by the runner), so ranks
on other hosts never need the service's database; only rank 0 opens it, to write events and
the final state, and so must run on the service's host. Every rank also writes
``<output_dir>/ranks/rank-<r>.json`` (pid, host, then how it exited): mlx.launch exits 0
whatever its ranks did, so that file is how the runner tells a finished group from a rank
that died (crash: requeue) or raised (the job fails with that rank's reason). A rank whose
collective failed because another rank vanished reports ``peer_lost``, never a job failure.
The exit codes, environment variables and files shared with the runner are in protocol.py.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import structlog

from services.runtime import logs
from services.runtime.contract import CheckpointInfo, Interrupted, JobContext, Report, TrainerFn
from services.runtime.jobs.protocol import (
    DISTRIBUTED_ENV,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    JOB_SPEC_ENV,
    LOCAL_RANKS_ENV,
    JobSpec,
    latest_complete_checkpoint,
    write_rank_status,
)
from services.runtime.jobs.scalars import ScalarLog
from services.runtime.jobs.store import JobState, JobStore
from services.runtime.jobs.tracking import FAILED, FINISHED, KILLED, RunInfo, Tracking
from services.runtime.settings import Settings

# What a collective raises when another rank of the group is gone (ring, JACCL, MPI, NCCL).
_PEER_LOST = re.compile(r"\[(ring|jaccl|mpi|nccl)\]|NCCL|connection to a peer", re.IGNORECASE)

log = structlog.get_logger()


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


def is_peer_lost(exc: BaseException) -> bool:
    """True for the error a collective raises when another rank died or was stopped."""
    return isinstance(exc, RuntimeError) and bool(_PEER_LOST.search(str(exc)))


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


def pin_local_rank(rank: int, local_ranks: int) -> list[int] | None:
    """Give rank r of ``local_ranks`` ranks on this host its own slice of the CPUs (Linux).

    MLX's ring backend polls its sockets from busy threads; with every rank free to run on
    every core, ranks and pollers preempt each other and a step takes several times longer
    on a small host. Pinned, each rank's compute and its pollers share only its own cores.
    """
    if not hasattr(os, "sched_setaffinity") or local_ranks < 1:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    per = len(cpus) // local_ranks
    if per < 1:
        return None
    mine = cpus[rank * per : (rank + 1) * per]
    for tid in os.listdir("/proc/self/task"):  # threads already started keep their mask
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), mine)
    return mine


def _init_distributed() -> Any:
    """The global group when the runner launched this job data-parallel, else None."""
    if os.environ.get(DISTRIBUTED_ENV) != "1":
        return None
    import mlx.core as mx

    return mx.distributed.init(strict=True)


class _Recorder:
    """Turns JobContext callbacks into events (rank 0 only)."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        metrics: dict[str, float],
        scalars: ScalarLog,
        tracking: Tracking | None = None,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.scalars = scalars  # the same metrics as TensorBoard event files
        self.tracking = tracking or Tracking([])  # and as MLflow / W&B runs, when configured
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
        self.scalars.add(int(r.step), metrics)
        self.tracking.log(int(r.step), metrics)

    def checkpoint(self, info: CheckpointInfo) -> None:
        payload = checkpoint_payload(info, self.job_id)
        self._append("checkpoint", payload, {"latest_checkpoint": payload})

    def log(self, text: str, level: str = "info") -> None:
        self._append("log", {"level": level, "text": text})

    def close(self, state: str, checkpoint: str | None = None) -> None:
        self.scalars.close()
        self.tracking.finish(state, checkpoint)


def run_job(store: JobStore, job_id: str, stop: StopFlag) -> int:
    """The one-process path: the job comes from the database."""
    job = store.get(job_id)
    if job.state is not JobState.RUNNING:
        log.warning("job_not_running", state=job.state.value)
        return EXIT_OK
    spec = JobSpec.of(job, latest_complete_checkpoint(Path(job.output_dir)))
    return _run(spec, store, stop, None, job.metrics)


def run_rank(db: Path, job_id: str, stop: StopFlag) -> int:
    """One rank of a data-parallel job (MLXU_DISTRIBUTED=1, started by mlx.launch)."""
    rank = int(os.environ.get("MLX_RANK", "0"))
    local = int(os.environ.get(LOCAL_RANKS_ENV, "0") or 0)
    if local > 1:  # set by the runner when all ranks run on its host
        pin_local_rank(rank, local)
    raw = os.environ.get(JOB_SPEC_ENV)
    store, metrics = None, {}
    if rank == 0 or raw is None:
        if not db.is_file():
            log.error("no_job_database", db=str(db), rank=rank)
            print(
                f"rank {rank}: the job database {db} is not on this host; rank 0 (the first "
                "host of the hostfile) must run on the service's host",
                file=sys.stderr,
            )
            return EXIT_FAILED
        store = JobStore(db)
        job = store.get(job_id)
        if job.state is not JobState.RUNNING:
            log.warning("job_not_running", state=job.state.value)
            return EXIT_OK
        metrics = job.metrics
        if raw is None:
            raw = JobSpec.of(job, latest_complete_checkpoint(Path(job.output_dir))).to_json()
    spec = JobSpec.from_json(raw)
    out = Path(spec.output_dir)
    write_rank_status(out, rank, spec.attempts, state="running")
    try:
        group = _init_distributed()
    except Exception as exc:  # a rank that never came up: the runner decides (crash)
        reason = f"{type(exc).__name__}: {exc}"
        log.error("distributed_init_failed", reason=reason)
        write_rank_status(
            out,
            rank,
            spec.attempts,
            state="exited",
            code=EXIT_FAILED,
            kind="peer_lost",
            reason=reason,
        )
        return EXIT_FAILED
    return _run(spec, store, stop, group, metrics)


def _run(spec: JobSpec, store: JobStore | None, stop: StopFlag, group: Any, metrics: dict) -> int:
    job_id = spec.job_id
    rank, world = (group.rank(), group.size()) if group is not None else (0, 1)
    structlog.contextvars.bind_contextvars(rank=rank)
    output_dir = Path(spec.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resume_from = Path(spec.resume_from) if spec.resume_from else None

    def status(
        code: int, kind: str, reason: str = "", state: str = "", checkpoint: str | None = None
    ) -> int:
        if rec is not None:  # the tracked run ends as the job did on this attempt
            rec.close(state or {"ok": FINISHED, "error": FAILED}.get(kind, KILLED), checkpoint)
        if group is not None:
            write_rank_status(
                output_dir,
                rank,
                spec.attempts,
                state="exited",
                code=code,
                kind=kind,
                reason=reason[-2000:],
            )
        return code

    ctx = JobContext(
        job_id=job_id,
        output_dir=output_dir,
        resume_from=resume_from,
        should_stop=stop if group is None else (lambda: sync_stop_flag(stop(), group)),
        rank=rank,
        world_size=world,
        home=Settings.from_env("worker").home,
    )
    rec = None
    if rank == 0 and store is not None:
        job = store.get(job_id)
        info = RunInfo(job_id, job.kind, spec.entry, spec.config, output_dir, job.labels)
        tracking = Tracking.start(info)
        rec = _Recorder(store, job_id, metrics, ScalarLog(output_dir, resume_from), tracking)
    if rec is not None:
        ctx.report, ctx.checkpoint_written, ctx.log = rec.report, rec.checkpoint, rec.log
        start = f"resuming from {resume_from}" if resume_from else "starting (nothing to resume)"
        rec.log(f"attempt {spec.attempts} (pid {os.getpid()}, {world} process(es)): {start}")
    log.info("job_start", entry=spec.entry, resume_from=str(resume_from or ""), world=world)
    try:
        if resume_from is not None and not resume_from.is_dir():
            raise FileNotFoundError(
                f"rank {rank} cannot read the checkpoint {resume_from} on {socket.gethostname()}:"
                " the output dir must be on storage every host of the job shares"
            )
        result = load_entry(spec.entry)(spec.config, ctx)
        if result is not None and not isinstance(result, CheckpointInfo):
            raise TypeError(f"trainer returned {type(result).__name__}, not CheckpointInfo")
    except Interrupted:
        log.info("job_interrupted", signal=stop.signum)
        return status(EXIT_INTERRUPTED, "interrupted")
    except Exception as exc:
        # A machine-readable reason (e.g. REMOTE_UNAVAILABLE) goes into the job's error too.
        code = getattr(exc, "reason", "")
        tag = f" ({code})" if isinstance(code, str) and code else ""
        reason = f"{type(exc).__name__}{tag}: {exc}"
        lost = group is not None and is_peer_lost(exc)
        log.error("job_failed", reason=reason, peer_lost=lost, exc_info=True)
        if rec is not None and store is not None:
            rec.log(traceback.format_exc()[-20000:], level="error")
            if not lost:  # a lost peer is a crash elsewhere: the runner reads every rank
                why = reason if group is None else f"rank 0 of {world} failed: {reason}"
                store.transition(job_id, JobState.FAILED, why, expect={JobState.RUNNING})
        return status(EXIT_FAILED, "peer_lost" if lost else "error", reason)
    if rec is not None and store is not None:
        fields: dict[str, Any] = {"eta_seconds": 0.0}
        if result is not None:
            fields["result"] = checkpoint_payload(result, job_id)
            fields["metrics"] = {**rec.metrics, **fields["result"]["metrics"]}
        # Conditional: a cancel that landed while the trainer finished wins.
        done = store.transition(
            job_id, JobState.SUCCEEDED, "trainer finished", expect={JobState.RUNNING}, **fields
        )
        if done is None and result is not None and store.get(job_id).state == JobState.CANCELLED:
            withdraw_result(Path(result.path), output_dir)
        log.info("job_done", recorded=done is not None)
        if done is None:  # a cancel won: no result to point at
            return status(EXIT_OK, "ok", state=KILLED)
    return status(EXIT_OK, "ok", checkpoint=str(result.path) if result is not None else None)


def withdraw_result(path: Path, output_dir: Path) -> None:
    """A cancel won the race with the trainer's finish: the job records no result, so its
    final checkpoint is withdrawn (renamed aside, then removed) and no complete artifact
    outlives a job that says CANCELLED. Step checkpoints stay (a retry resumes from them)."""
    if path.parent != output_dir or not path.is_dir():
        return
    aside = output_dir / f".withdrawn-{path.name}-{os.getpid()}"
    with contextlib.suppress(OSError):
        os.replace(path, aside)
        log.info("result_withdrawn", path=str(path), reason="job cancelled while finishing")
        shutil.rmtree(aside, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    stop = StopFlag()
    stop.install()  # first: a cancel during start-up must not kill us mid-write
    parser = argparse.ArgumentParser(prog="python -m services.runtime.jobs.worker")
    parser.add_argument("--db", required=True, type=Path, help="the service's job database")
    parser.add_argument("--job", required=True, help="job id")
    args = parser.parse_args(argv)
    logs.configure("worker")
    structlog.contextvars.bind_contextvars(job_id=args.job, pid=os.getpid())
    if os.environ.get(DISTRIBUTED_ENV) == "1":
        return run_rank(args.db, args.job, stop)
    return run_job(JobStore(args.db), args.job, stop)


if __name__ == "__main__":
    sys.exit(main())
