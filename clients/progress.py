"""Live progress for job and pipeline-run event streams.

On a terminal one line per job (or per pipeline stage) is redrawn in place; elsewhere (CI logs,
pipes) each event is appended as a plain line. The renderers are pure functions of the job /
run snapshots, so they are tested without a terminal; the two small classes only decide where
and how often to write.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import TextIO

from mlx_unified.v1 import common_pb2, orchestrator_pb2

Job = common_pb2.Job
JobEvent = common_pb2.JobEvent

# Metrics in display order, with short labels; others follow alphabetically.
_METRICS = {
    "loss": "loss",
    "val_loss": "val",
    "reward": "reward",
    "kl": "kl",
    "accuracy": "acc",
    "learning_rate": "lr",
}
_NOT_SHOWN = {"tokens_per_second", "epoch", "step", "tokens", "total_steps", "eta_seconds"}


def state_name(value: int, enum: object = common_pb2.JobState) -> str:
    """JOB_STATE_RUNNING -> RUNNING (works for RunState / StageState / StageKind too)."""
    name = enum.Name(value)  # type: ignore[attr-defined]
    for prefix in ("JOB_STATE_", "RUN_STATE_", "STAGE_STATE_", "STAGE_KIND_", "CHECKPOINT_KIND_"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0 or seconds != seconds:
        return "--"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def format_rate(tokens_per_second: float) -> str:
    if tokens_per_second >= 1000:
        return f"{tokens_per_second / 1000:.1f}k tok/s"
    return f"{tokens_per_second:.0f} tok/s"


def format_value(v: float) -> str:
    return f"{v:.2e}" if v != 0 and abs(v) < 1e-3 else f"{v:.4g}"


def bar(fraction: float, width: int = 20, ascii_only: bool = False) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full, empty = ("#", "-") if ascii_only else ("█", "░")
    n = int(fraction * width + 1e-9)
    return full * n + empty * (width - n)


def metrics_text(metrics: dict[str, float] | object, limit: int = 6) -> str:
    m = dict(metrics)  # type: ignore[call-overload]
    keys = [k for k in _METRICS if k in m]
    keys += sorted(k for k in m if k not in _METRICS and k not in _NOT_SHOWN)
    parts = [f"{_METRICS.get(k, k)} {format_value(m[k])}" for k in keys[:limit]]
    if "tokens_per_second" in m:
        parts.append(format_rate(m["tokens_per_second"]))
    return "  ".join(parts)


def _fit(line: str, width: int | None) -> str:
    if width is None or len(line) <= width:
        return line
    return line[: max(width - 1, 0)] + "…"


def _elapsed(start: object, end: object) -> float | None:
    if not start.seconds or not end.seconds:  # type: ignore[attr-defined]
        return None
    return (end.ToNanoseconds() - start.ToNanoseconds()) / 1e9  # type: ignore[attr-defined]


def progress_text(job: Job, *, with_bar: bool = True, ascii_only: bool = False) -> str:
    """ "120/1000 [███░░] 12%  loss 1.23  val 1.31  2.1k tok/s  ETA 3m12s" (no state)."""
    parts = []
    if job.total_steps > 0:
        frac = job.step / job.total_steps
        step = f"step {job.step}/{job.total_steps}"
        parts.append(f"{step} {bar(frac, 20, ascii_only)} {frac:4.0%}" if with_bar else step)
    elif job.step:
        parts.append(f"step {job.step}")
    if m := metrics_text(job.metrics):
        parts.append(m)
    if job.state == common_pb2.JOB_STATE_RUNNING and job.eta_seconds > 0:
        parts.append(f"ETA {format_duration(job.eta_seconds)}")
    return "  ".join(parts)


def job_line(job: Job, *, width: int | None = None, ascii_only: bool = False) -> str:
    """The live line for one job."""
    head = f"{job.kind or 'job'} {job.job_id[:12]}  {state_name(job.state):<9}"
    if job.state == common_pb2.JOB_STATE_PENDING and not job.step:
        return _fit(f"{head}  waiting for a worker", width)
    return _fit(f"{head}  {progress_text(job, ascii_only=ascii_only)}".rstrip(), width)


def event_line(event: JobEvent, job: Job | None = None) -> str | None:
    """One plain log line for an event (None for events not worth a line)."""
    kind = event.WhichOneof("payload")
    if kind == "progress":
        snap = Job()
        if job is not None:
            snap.CopyFrom(job)
        snap = apply_event(snap, event)
        return progress_text(snap, with_bar=False) or None
    if kind == "state_change":
        sc = event.state_change
        text = f"state {state_name(sc.from_state)} -> {state_name(sc.to_state)}"
        return f"{text}: {sc.reason}" if sc.reason else text
    if kind == "checkpoint":
        cp = event.checkpoint
        return f"checkpoint step {cp.step}: {cp.path}"
    if kind == "log":
        return f"[{event.log.level or 'info'}] {event.log.text}"
    return None


def apply_event(job: Job, event: JobEvent) -> Job:
    """A copy of ``job`` updated by ``event`` (for streams that carry no job snapshot)."""
    out = Job()
    out.CopyFrom(job)
    kind = event.WhichOneof("payload")
    if kind == "progress":
        p = event.progress
        out.step = p.step
        # 0 means "not reported" in proto3: keep what the snapshot knew.
        if p.total_steps:
            out.total_steps = p.total_steps
        if p.eta_seconds:
            out.eta_seconds = p.eta_seconds
        out.metrics.update(p.metrics)
    elif kind == "state_change":
        out.state = event.state_change.to_state
        if event.state_change.to_state in (
            common_pb2.JOB_STATE_FAILED,
            common_pb2.JOB_STATE_CANCELLED,
        ):
            out.error = event.state_change.reason or out.error
    elif kind == "checkpoint":
        out.latest_checkpoint.CopyFrom(event.checkpoint)
    return out


def checkpoint_text(cp: common_pb2.Checkpoint) -> str:
    kind = state_name(cp.kind, common_pb2.CheckpointKind).lower()
    extra = [kind] if cp.kind else []
    if cp.base_model and cp.kind == common_pb2.CHECKPOINT_KIND_ADAPTER:
        extra.append(f"base {cp.base_model}")
    return f"{cp.path} ({', '.join(extra)})" if extra else cp.path


def summary(job: Job) -> list[str]:
    """Final lines: outcome, duration, last metrics, and the checkpoint or the reason."""
    took = format_duration(_elapsed(job.start_time, job.end_time))
    head = f"{job.kind or 'job'} {job.job_id} {state_name(job.state)}"
    if took != "--":
        head += f" in {took}" if job.state == common_pb2.JOB_STATE_SUCCEEDED else f" after {took}"
    if progress := progress_text(job, with_bar=False):
        head += f"  ({progress})"
    lines = [head]
    if job.state == common_pb2.JOB_STATE_SUCCEEDED:
        cp = job.result if job.result.path else job.latest_checkpoint
        if cp.path:
            lines.append(f"checkpoint: {checkpoint_text(cp)}")
    elif job.error:
        lines.append(f"reason: {job.error}")
    return lines


def _is_tty(stream: TextIO) -> bool:
    return stream.isatty() and os.environ.get("TERM") != "dumb"


def _width(stream: TextIO) -> int:
    return max(shutil.get_terminal_size((100, 24)).columns - 1, 20)


class JobProgress:
    """Shows a job's events on ``stream``: a redrawn line on a TTY, appended lines otherwise."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else tty
        self._drawn = False

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = False

    def message(self, text: str) -> None:
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, event: JobEvent, job: Job) -> None:
        if not self.tty:
            line = event_line(event, job)
            if line is not None:
                self.message(f"{job.job_id[:12]} {line}")
            return
        if event.WhichOneof("payload") in ("log", "checkpoint", "state_change"):
            line = event_line(event, job)
            if line:
                self.message(line)
        self.stream.write("\r" + job_line(job, width=_width(self.stream)) + "\x1b[K")
        self._drawn = True
        self.stream.flush()

    def finish(self, job: Job, checkpoint: bool = True) -> None:
        """Replace the live line with the summary (``checkpoint=False``: without its path)."""
        self._clear()
        for line in summary(job):
            if checkpoint or not line.startswith("checkpoint: "):
                self.stream.write(line + "\n")
        self.stream.flush()


# ---- pipeline runs --------------------------------------------------------------------------


def stage_line(
    stage: orchestrator_pb2.StageRun,
    *,
    name_width: int = 12,
    width: int | None = None,
    ascii_only: bool = False,
) -> str:
    """One stage of a run: name, kind, state, then progress / result / reason."""
    state = state_name(stage.state, orchestrator_pb2.StageState)
    kind = state_name(stage.kind, orchestrator_pb2.StageKind).lower()
    head = f"{stage.name:<{name_width}} {kind:<12} {state:<9}"
    if stage.state == orchestrator_pb2.STAGE_STATE_SKIPPED:
        tail = f"cached from {stage.cached_from}" if stage.cached_from else "cached"
    elif stage.state == orchestrator_pb2.STAGE_STATE_SUCCEEDED:
        tail = stage.result.path or stage.job.result.path
    elif stage.state in (
        orchestrator_pb2.STAGE_STATE_FAILED,
        orchestrator_pb2.STAGE_STATE_CANCELLED,
    ):
        tail = stage.error or stage.job.error
    elif stage.state == orchestrator_pb2.STAGE_STATE_RUNNING:
        tail = progress_text(stage.job, ascii_only=ascii_only)
    else:
        tail = ""
    return _fit(f"{head}  {tail}".rstrip(), width)


def run_event_line(event: orchestrator_pb2.RunEvent) -> str | None:
    kind = event.WhichOneof("payload")
    if kind == "run_state_change":
        c = event.run_state_change
        rs = orchestrator_pb2.RunState
        text = f"run {state_name(c.from_state, rs)} -> {state_name(c.to_state, rs)}"
        return f"{text}: {c.reason}" if c.reason else text
    if kind == "stage_state_change":
        c = event.stage_state_change
        ss = orchestrator_pb2.StageState
        text = f"[{c.stage}] {state_name(c.from_state, ss)} -> {state_name(c.to_state, ss)}"
        if c.job_id:
            text += f" (job {c.job_id})"
        return f"{text}: {c.reason}" if c.reason else text
    if kind == "job_event":
        line = event_line(event.job_event.event)
        return f"[{event.job_event.stage}] {line}" if line else None
    return None


def apply_run_event(
    run: orchestrator_pb2.Run, event: orchestrator_pb2.RunEvent
) -> orchestrator_pb2.Run:
    """A copy of ``run`` updated by ``event``."""
    out = orchestrator_pb2.Run()
    out.CopyFrom(run)
    kind = event.WhichOneof("payload")
    if kind == "run_state_change":
        out.state = event.run_state_change.to_state
        if event.run_state_change.reason and out.state in (
            orchestrator_pb2.RUN_STATE_FAILED,
            orchestrator_pb2.RUN_STATE_CANCELLED,
        ):
            out.error = event.run_state_change.reason
        return out
    name = event.stage_state_change.stage if kind == "stage_state_change" else event.job_event.stage
    stage = next((s for s in out.stages if s.name == name), None)
    if stage is None:
        stage = out.stages.add(name=name)
    if kind == "stage_state_change":
        c = event.stage_state_change
        stage.state = c.to_state
        if c.job_id:
            stage.job_id = c.job_id
            stage.job.job_id = c.job_id
        if c.reason and c.to_state in (
            orchestrator_pb2.STAGE_STATE_FAILED,
            orchestrator_pb2.STAGE_STATE_CANCELLED,
        ):
            stage.error = c.reason
    elif kind == "job_event":
        stage.job.CopyFrom(apply_event(stage.job, event.job_event.event))
        if event.job_event.event.WhichOneof("payload") == "checkpoint":
            stage.result.CopyFrom(event.job_event.event.checkpoint)
    return out


def run_summary(run: orchestrator_pb2.Run) -> list[str]:
    took = format_duration(_elapsed(run.start_time, run.end_time))
    head = f"run {run.run_id} {state_name(run.state, orchestrator_pb2.RunState)}"
    if took != "--":
        head += f" in {took}"
    lines = [head]
    if run.result.path:
        lines.append(f"checkpoint: {checkpoint_text(run.result)}")
    if run.error:
        lines.append(f"reason: {run.error}")
    return lines


class RunProgress:
    """One redrawn line per stage on a TTY; appended event lines otherwise."""

    def __init__(
        self, run: orchestrator_pb2.Run, stream: TextIO | None = None, tty: bool | None = None
    ) -> None:
        self.run = run
        self.stream = stream or sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else tty
        self._lines = 0

    def _lines_now(self) -> list[str]:
        w = max([len(s.name) for s in self.run.stages] + [5])
        return [stage_line(s, name_width=w, width=_width(self.stream)) for s in self.run.stages]

    def _erase(self) -> None:
        if self._lines:
            self.stream.write(f"\x1b[{self._lines}F\x1b[J")
            self._lines = 0

    def _draw(self) -> None:
        lines = self._lines_now()
        self.stream.write("".join(line + "\n" for line in lines))
        self._lines = len(lines)

    def message(self, text: str) -> None:
        self._erase()
        self.stream.write(text + "\n")
        if self.tty:
            self._draw()
        self.stream.flush()

    def update(self, event: orchestrator_pb2.RunEvent) -> None:
        self.run = apply_run_event(self.run, event)
        line = run_event_line(event)
        if not self.tty:
            if line:
                self.message(line)
            return
        self._erase()
        payload = event.WhichOneof("payload")
        inner = event.job_event.event.WhichOneof("payload") if payload == "job_event" else None
        if line and inner != "progress":  # progress shows in the stage line itself
            self.stream.write(f"{line}\n")
        self._draw()
        self.stream.flush()

    def finish(self, run: orchestrator_pb2.Run) -> None:
        self.run = run
        self._erase()
        if self.tty:
            self._draw()
            self._lines = 0
        for line in run_summary(run):
            self.stream.write(line + "\n")
        self.stream.flush()
