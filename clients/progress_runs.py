"""Live progress for pipeline runs: one line per stage, redrawn in place on a terminal,
appended elsewhere, folded from the run's event stream (see clients.progress for jobs)."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from clients.progress import (
    Job,
    JobEvent,
    _elapsed,
    _fit,
    _is_tty,
    _said_already,
    _transition,
    _width,
    _with_head,
    apply_event,
    checkpoint_text,
    event_line,
    format_duration,
    state_name,
)
from mlx_unified.v1 import common_pb2, orchestrator_pb2


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
        return _with_head(head, stage.job, width, ascii_only)
    else:
        tail = ""
    return _fit(f"{head}  {tail}".rstrip(), width)


def _stage_echo(event: JobEvent) -> bool:
    """True for a job state change its stage's own transition already tells: the job's
    creation, its start and its end. A requeue (RUNNING -> PENDING, the worker stopped and
    the job resumes) has no stage transition and is shown."""
    sc = event.state_change
    return event.WhichOneof("payload") == "state_change" and not (
        sc.from_state == common_pb2.JOB_STATE_RUNNING
        and sc.to_state == common_pb2.JOB_STATE_PENDING
    )


def run_event_line(
    event: orchestrator_pb2.RunEvent,
    run: orchestrator_pb2.Run | None = None,
    tracebacks: bool = True,
) -> str | None:
    """One plain line for a run event (None for those not worth one); ``run``, as of the
    event, tells the stage's kind (an export stage's checkpoint is an exported model)."""
    kind = event.WhichOneof("payload")
    if kind == "run_state_change":
        c = event.run_state_change
        rs = orchestrator_pb2.RunState
        return _transition(
            "run ", state_name(c.from_state, rs), state_name(c.to_state, rs), c.reason
        )
    if kind == "stage_state_change":
        c = event.stage_state_change
        ss = orchestrator_pb2.StageState
        text = _transition(
            f"[{c.stage}] ", state_name(c.from_state, ss), state_name(c.to_state, ss), ""
        )
        if c.job_id:
            text += f" (job {c.job_id})"
        return f"{text}: {c.reason}" if c.reason else text
    if kind == "job_event":
        inner = event.job_event.event
        if _stage_echo(inner):
            return None
        stages = run.stages if run is not None else ()
        stage = next((s for s in stages if s.name == event.job_event.stage), None)
        job = None
        if stage is not None:
            job = Job(kind=state_name(stage.kind, orchestrator_pb2.StageKind).lower())
        line = event_line(inner, job, tracebacks)
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


def fresh_run(run: orchestrator_pb2.Run) -> orchestrator_pb2.Run:
    """``run`` before its first event: its stages, in order, none of their progress (see
    ``fresh``: a replay shows each stage as it was, not the run's final state)."""
    out = orchestrator_pb2.Run(
        run_id=run.run_id, pipeline_id=run.pipeline_id, state=orchestrator_pb2.RUN_STATE_PENDING
    )
    out.create_time.CopyFrom(run.create_time)
    for s in run.stages:
        out.stages.add(name=s.name, kind=s.kind, state=orchestrator_pb2.STAGE_STATE_PENDING)
    return out


class RunProgress:
    """One redrawn line per stage on a TTY; appended event lines otherwise. ``run`` names
    the stages; what is shown of them comes from the events, from the first one."""

    def __init__(
        self, run: orchestrator_pb2.Run, stream: TextIO | None = None, tty: bool | None = None
    ) -> None:
        self.run = fresh_run(run)
        self.tracebacks = bool(os.environ.get("MLXU_DEBUG"))
        self._said: list[str] = []
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
        self._said.append(text)
        self.stream.write(text + "\n")
        if self.tty:
            self._draw()
        self.stream.flush()

    def update(self, event: orchestrator_pb2.RunEvent) -> None:
        line = run_event_line(event, self.run, self.tracebacks)
        self.run = apply_run_event(self.run, event)
        if not self.tty:
            if line:
                self.message(line)
            return
        self._erase()
        payload = event.WhichOneof("payload")
        inner = event.job_event.event.WhichOneof("payload") if payload == "job_event" else None
        if line and inner != "progress":  # progress shows in the stage line itself
            self._said.append(line)
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
            if not _said_already(line, self._said):  # errors print once
                self.stream.write(line + "\n")
        self.stream.flush()
