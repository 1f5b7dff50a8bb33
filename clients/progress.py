"""Live progress for job and pipeline-run event streams.

On a terminal one line per job (or per pipeline stage) is redrawn in place; elsewhere (CI logs,
pipes) each event is appended as a plain line. The renderers are pure functions of the job /
run snapshots, so they are tested without a terminal; the two small classes only decide where
and how often to write, and fold the events into the job / run they show (a stream's snapshot
is the job *now*: a replay must show each step as it was). A line too long for the terminal
keeps, in order: the step, the loss, the ETA, tok/s, then the other metrics.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import TextIO

from mlx_unified.v1 import common_pb2

Job = common_pb2.Job
JobEvent = common_pb2.JobEvent

# How metrics are named on screen. A report's ``train_*`` figures are means over training
# batches and its ``val_*`` figures the same loss on held-out data (services.runtime.loop), so
# both keep their word: "train acc 1" next to "val acc 0.68" never reads as held-out accuracy.
_SHORT = {
    "accuracy": "acc",
    "accuracies": "acc",
    "margin": "margin",
    "margins": "margin",
    "kd_loss": "kd",  # KD: the teacher-student divergence
    "ce_loss": "ce",
    "nll_loss": "nll",
    "kl": "kl",
    "ppl": "ppl",
}
# Held-out and training-batch metrics shown on the line (the rest are in `jobs show`).
_VAL_SHOWN = ("accuracy", "accuracies", "margin", "margins", "kd_loss", "kl", "ppl")
_TRAIN_SHOWN = ("accuracy", "accuracies", "margin", "margins", "kd_loss", "ce_loss", "nll_loss")
# Rollout methods (PPO, GRPO): their rewards and KL are of the rollout batch, against the
# frozen reference policy.
_ROLLOUT = {"reward_mean": "reward", "reward": "reward", "kl": "kl(ref)", "kl_coef": "kl_coef"}
_NOT_SHOWN = {
    "tokens_per_second",
    "steps_per_second",
    "epoch",
    "step",
    "steps",
    "tokens",
    "total_steps",
    "eta_seconds",
    "train_time_s",
    "train_rows",
    "temperature",
}
# At most this many of the other metrics on a line (a wide terminal is no reason for 20).
_REST_LIMIT = 8


def loss_of(metrics: dict[str, float] | object) -> float | None:
    """The training loss of a job's metrics: ``train_loss`` (every batch-trained method), else
    ``loss`` (rollout methods' update loss), else None."""
    m = dict(metrics)  # type: ignore[call-overload]
    for key in ("train_loss", "loss"):
        if key in m:
            return float(m[key])
    return None


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


def _rest(m: dict[str, float]) -> list[str]:
    """The metrics after the loss, labelled, in display order (most useful first)."""
    parts: list[str] = []
    seen: set[str] = set()

    def add(key: str, label: str) -> None:
        if key in m and key not in seen:
            seen.add(key)
            parts.append(f"{label} {format_value(m[key])}")

    add("val_loss", "val loss")
    for name in _VAL_SHOWN:
        add(f"val_{name}", f"val {_SHORT[name]}")
    rollout = "reward_mean" in m or "reward" in m  # PPO / GRPO
    for key, label in _ROLLOUT.items():
        if rollout or key != "kl":
            add(key, label)
    for name in _TRAIN_SHOWN:
        add(f"train_{name}", f"train {_SHORT[name]}")
    add("learning_rate", "lr")
    for key in sorted(m):
        if key in seen or key in _NOT_SHOWN or key in ("train_loss", "loss"):
            continue
        if key.startswith(("val_", "train_")):
            continue  # the less telling ones (logps, rewards_chosen, ...): `jobs show`
        add(key, key)
    return parts[:_REST_LIMIT]


def _fit(line: str, width: int | None) -> str:
    if width is None or len(line) <= width:
        return line
    return line[: max(width - 1, 0)] + "…"


def _fit_parts(parts: list[tuple[int, str]], width: int | None) -> str:
    """Join (priority, text) parts in order, two spaces apart (one before a text that starts
    with a space, the bar after its step), leaving out the least important (highest number)
    until the line fits ``width``; cut with "…" if even the most important do not fit."""

    def join(ps: list[tuple[int, str]]) -> str:
        return "".join(
            t if i == 0 or t.startswith(" ") else "  " + t for i, (_, t) in enumerate(ps)
        )

    keep = list(parts)
    while width is not None and len(keep) > 1 and len(join(keep)) > width:
        del keep[max(range(len(keep)), key=lambda i: (keep[i][0], i))]
    return _fit(join(keep).strip(), width)


def _elapsed(start: object, end: object) -> float | None:
    if not start.seconds or not end.seconds:  # type: ignore[attr-defined]
        return None
    return (end.ToNanoseconds() - start.ToNanoseconds()) / 1e9  # type: ignore[attr-defined]


# Priorities of the parts of a progress line, when the terminal is too narrow for all:
# step, loss, ETA, tok/s, then the other metrics in display order; the bar goes first.
_P_STEP, _P_LOSS, _P_ETA, _P_RATE, _P_REST, _P_BAR = 0, 1, 2, 3, 10, 1000


def _progress_parts(job: Job, with_bar: bool, ascii_only: bool) -> list[tuple[int, str]]:
    parts: list[tuple[int, str]] = []
    if job.total_steps > 0:
        frac = job.step / job.total_steps
        parts.append((_P_STEP, f"step {job.step}/{job.total_steps}"))
        if with_bar:
            parts.append((_P_BAR, f" {bar(frac, 20, ascii_only)} {frac:4.0%}"))
    elif job.step:
        parts.append((_P_STEP, f"step {job.step}"))
    m = dict(job.metrics)
    if (loss := loss_of(m)) is not None:
        parts.append((_P_LOSS, f"loss {format_value(loss)}"))
    parts += [(_P_REST + i, text) for i, text in enumerate(_rest(m))]
    if m.get("tokens_per_second"):
        parts.append((_P_RATE, format_rate(m["tokens_per_second"])))
    if job.state == common_pb2.JOB_STATE_RUNNING and job.eta_seconds > 0:
        parts.append((_P_ETA, f"ETA {format_duration(job.eta_seconds)}"))
    return parts


def progress_text(
    job: Job, *, with_bar: bool = True, ascii_only: bool = False, width: int | None = None
) -> str:
    """ "120/1000 [███░░] 12%  loss 1.23  val loss 1.31  2.1k tok/s  ETA 3m12s" (no state),
    fitted to ``width`` by priority: step, loss, ETA, tok/s, then the rest."""
    return _fit_parts(_progress_parts(job, with_bar, ascii_only), width)


def _with_head(head: str, job: Job, width: int | None, ascii_only: bool) -> str:
    room = None if width is None else max(width - len(head) - 2, 0)
    tail = progress_text(job, ascii_only=ascii_only, width=room)
    return _fit(f"{head}  {tail}".rstrip(), width)


def job_line(job: Job, *, width: int | None = None, ascii_only: bool = False) -> str:
    """The live line for one job."""
    head = f"{job.kind or 'job'} {job.job_id[:12]}  {state_name(job.state):<9}"
    if job.state == common_pb2.JOB_STATE_PENDING and not job.step:
        return _fit(f"{head}  waiting for a worker", width)
    return _with_head(head, job, width, ascii_only)


def _transition(what: str, frm: str, to: str, reason: str) -> str:
    # The first state has no "from" (it is UNSPECIFIED on the wire): "state PENDING: created".
    text = f"{what}{to}" if frm == "UNSPECIFIED" else f"{what}{frm} -> {to}"
    return f"{text}: {reason}" if reason else text


_TRACEBACK = "Traceback (most recent call last)"


def _said_already(line: str, said: list[str]) -> bool:
    """A summary's "reason: X" when an earlier line (the FAILED transition) ended with X."""
    reason = line.removeprefix("reason: ")
    return line.startswith("reason: ") and any(s.endswith(reason) for s in said)


def event_line(event: JobEvent, job: Job | None = None, tracebacks: bool = True) -> str | None:
    """One plain log line for an event (None for events not worth a line). With
    ``tracebacks=False`` a failed worker's traceback log is left out: its last line is the
    reason its FAILED transition states."""
    kind = event.WhichOneof("payload")
    if kind == "progress":
        snap = Job()
        if job is not None:
            snap.CopyFrom(job)
        snap = apply_event(snap, event)
        return progress_text(snap, with_bar=False) or None
    if kind == "state_change":
        sc = event.state_change
        return _transition("state ", state_name(sc.from_state), state_name(sc.to_state), sc.reason)
    if kind == "checkpoint":
        cp = event.checkpoint
        if job is not None and job.kind == "export":
            return f"exported model: {checkpoint_text(cp)}"
        if cp.step <= 0:  # written by no training step: say what it is, not "step 0"
            return f"checkpoint: {checkpoint_text(cp)}"
        return f"checkpoint step {cp.step}: {cp.path}"
    if kind == "log":
        if not tracebacks and event.log.text.startswith(_TRACEBACK):
            return None
        return f"[{event.log.level or 'info'}] {event.log.text}"
    return None


def apply_event(job: Job, event: JobEvent) -> Job:
    """A copy of ``job`` updated by ``event`` (for streams that carry no job snapshot)."""
    out = Job()
    out.CopyFrom(job)
    kind = event.WhichOneof("payload")
    if kind in ("progress", "log", "checkpoint") and out.state in (
        common_pb2.JOB_STATE_UNSPECIFIED,
        common_pb2.JOB_STATE_PENDING,
    ):
        out.state = common_pb2.JOB_STATE_RUNNING  # only a running worker writes these
    if kind == "progress":
        p = event.progress
        out.step = p.step
        # 0 means "not reported" in proto3: keep what the snapshot knew.
        if p.total_steps:
            out.total_steps = p.total_steps
        if p.eta_seconds:
            out.eta_seconds = p.eta_seconds
        elif out.total_steps and p.step >= out.total_steps:
            out.eta_seconds = 0.0  # the last step: nothing left to estimate
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


def fresh(job: Job) -> Job:
    """What is known of ``job`` before its first event: who it is, none of its progress.

    A stream's job snapshot is the job as it is *now* (WatchJobResponse), so replaying a
    finished job's log with it would show the final metrics on every step; displays fold the
    events into this instead (``apply_event``), and show each step as it was."""
    out = Job(
        job_id=job.job_id,
        kind=job.kind,
        request_id=job.request_id,
        output_dir=job.output_dir,
        state=common_pb2.JOB_STATE_PENDING,  # every job's first state
    )
    out.labels.update(job.labels)
    out.create_time.CopyFrom(job.create_time)
    return out


class JobProgress:
    """Shows a job's events on ``stream``: a redrawn line on a TTY, appended lines otherwise.

    What it shows is the job as of each event (the events folded from the first one seen),
    never the stream's "now" snapshot, so a replay shows every step as it was."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else tty
        self._drawn = False
        self.job: Job | None = None  # the job as of the last event shown
        self.tracebacks = bool(os.environ.get("MLXU_DEBUG"))  # as main()'s errors
        self._said: list[str] = []

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = False

    def message(self, text: str) -> None:
        self._clear()
        self._said.append(text)
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, event: JobEvent, job: Job) -> None:
        """Show ``event``; ``job`` (the stream's snapshot) only says which job it is."""
        before = self.job if self.job is not None else fresh(job)
        self.job = apply_event(before, event)
        if not self.tty:
            line = event_line(event, before, self.tracebacks)
            if line is not None:
                self.message(f"{job.job_id[:12]} {line}")
            return
        if event.WhichOneof("payload") in ("log", "checkpoint", "state_change"):
            line = event_line(event, before, self.tracebacks)
            if line:
                self.message(line)
        self.stream.write("\r" + job_line(self.job, width=_width(self.stream)) + "\x1b[K")
        self._drawn = True
        self.stream.flush()

    def finish(self, job: Job, checkpoint: bool = True) -> None:
        """Replace the live line with the summary (``checkpoint=False``: without its path)."""
        self._clear()
        for line in summary(job):
            if _said_already(line, self._said):
                continue  # errors print once
            if checkpoint or not line.startswith("checkpoint: "):
                self.stream.write(line + "\n")
        self.stream.flush()
