"""Job store records -> protos (mlx_unified.v1 Job, JobEvent, Checkpoint)."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from mlx_unified.v1 import common_pb2
from services.runtime.jobs.store import EventRecord, JobRecord

STATE = {
    "PENDING": common_pb2.JOB_STATE_PENDING,
    "RUNNING": common_pb2.JOB_STATE_RUNNING,
    "SUCCEEDED": common_pb2.JOB_STATE_SUCCEEDED,
    "FAILED": common_pb2.JOB_STATE_FAILED,
    "CANCELLED": common_pb2.JOB_STATE_CANCELLED,
}
STATE_NAME = {v: k for k, v in STATE.items()}
KIND = {"adapter": common_pb2.CHECKPOINT_KIND_ADAPTER, "full": common_pb2.CHECKPOINT_KIND_FULL}


def ts(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def checkpoint(d: dict[str, Any] | None) -> common_pb2.Checkpoint | None:
    if not d:
        return None
    return common_pb2.Checkpoint(
        path=d.get("path", ""),
        kind=KIND.get(d.get("kind", ""), 0),
        step=int(d.get("step", 0)),
        base_model=d.get("base_model", ""),
        sha256=d.get("sha256", ""),
        job_id=d.get("job_id", ""),
        metrics={k: float(v) for k, v in (d.get("metrics") or {}).items()},
        create_time=ts(d.get("create_time")),
    )


def job(r: JobRecord, *, full: bool = True) -> common_pb2.Job:
    """The Job proto of a record; ``full=False`` is JOB_VIEW_BASIC (no resolved_config)."""
    cfg = None
    if full:
        cfg = struct_pb2.Struct()
        cfg.update(r.config)
    return common_pb2.Job(
        job_id=r.job_id,
        kind=r.kind,
        state=STATE[str(r.state)],
        request_id=r.request_id or "",
        create_time=ts(r.create_time),
        start_time=ts(r.start_time),
        end_time=ts(r.end_time),
        step=r.step,
        total_steps=r.total_steps,
        metrics={k: float(v) for k, v in r.metrics.items()},
        latest_checkpoint=checkpoint(r.latest_checkpoint),
        result=checkpoint(r.result),
        error=r.error,
        resolved_config=cfg,
        attempts=r.attempts,
        output_dir=r.output_dir,
        labels=r.labels,
        eta_seconds=r.eta_seconds,
    )


def event(e: EventRecord) -> common_pb2.JobEvent:
    p = e.payload
    ev = common_pb2.JobEvent(job_id=e.job_id, seq=e.seq, time=ts(e.time))
    if e.type == "state":
        ev.state_change.CopyFrom(
            common_pb2.StateChange(
                from_state=STATE.get(p.get("from") or "", 0),
                to_state=STATE.get(p.get("to") or "", 0),
                reason=p.get("reason", ""),
            )
        )
    elif e.type == "progress":
        ev.progress.CopyFrom(
            common_pb2.Progress(
                step=int(p.get("step", 0)),
                total_steps=int(p.get("total_steps", 0)),
                epoch=float(p.get("epoch", 0.0)),
                tokens=int(p.get("tokens", 0)),
                eta_seconds=float(p.get("eta_seconds", 0.0)),
                metrics={k: float(v) for k, v in (p.get("metrics") or {}).items()},
            )
        )
    elif e.type == "checkpoint":
        ev.checkpoint.CopyFrom(checkpoint(p))
    else:
        ev.log.CopyFrom(common_pb2.LogMessage(level=p.get("level", "info"), text=p.get("text", "")))
    return ev
