"""Driving one stage of a run on its trainer service: attempt, start, follow, finish.

A stage with no attempt yet gets its inputs bound (stage_inputs.handoff), is skipped when
the cache holds its result, or gets an attempt whose exact spec is stored before it is
sent. The attempt's job is started with bounded retries on ``Unavailable``; its events are
relayed into the run log until it ends, a lost watch is re-opened after the last relayed
seq, and a job the service no longer knows is restarted as a new attempt (at most
``max_restarts`` times). Cancel reaches the job through ``RunCtx.cancelled``.

``StageBackend`` is how the driver reaches the services and ``SchedulerConfig`` its knobs;
both are re-exported by scheduler.py, which sequences the stages of a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf import json_format
from google.protobuf.message import Message

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from orchestrator import pipeline
from orchestrator.records import Attempt
from orchestrator.stage_inputs import cache_key, handoff, runtime_fields, stat_fingerprint
from orchestrator.store import Store
from services.runtime import logs
from services.runtime.errors import NotFound, Unavailable

__all__ = [
    "CancelledBeforeStart",
    "Owner",
    "RetryPolicy",
    "RunCtx",
    "SchedulerConfig",
    "StageBackend",
    "StageDriver",
    "StageFailed",
    "pause",
]

SS, JS = opb.StageState, cpb.JobState
JOB_TERMINAL = {JS.JOB_STATE_SUCCEEDED, JS.JOB_STATE_FAILED, JS.JOB_STATE_CANCELLED}


class StageBackend(Protocol):
    """How the scheduler reaches the trainer services (the server implements it with gRPC).

    ``stage_kind`` is the stage's kind name ("sft", "export", "distill", "reward_model",
    "dpo", "ppo", "grpo"): it selects the service and Start RPC, and after a restart it is
    the only way to know which service holds a job id. Errors must be translated into
    services.runtime.errors: Unavailable (retried), NotFound (job gone), InvalidArgument /
    FailedPrecondition (the service rejected the spec; never retried).
    """

    async def start(self, stage_kind: str, spec: Message, idempotency_key: str) -> str: ...

    async def get(self, stage_kind: str, job_id: str) -> cpb.Job: ...

    def watch(
        self, stage_kind: str, job_id: str, after_seq: int
    ) -> AsyncIterator[tuple[cpb.JobEvent, cpb.Job]]: ...

    async def cancel(self, stage_kind: str, job_id: str, reason: str) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    max_tries: int = 6
    initial_delay: float = 0.5
    max_delay: float = 10.0
    multiplier: float = 2.0

    def delay(self, failures: int) -> float:
        return min(self.max_delay, self.initial_delay * self.multiplier ** (failures - 1))


@dataclass(frozen=True)
class SchedulerConfig:
    retry: RetryPolicy = RetryPolicy()
    max_restarts: int = 2  # new attempts for jobs the service lost
    cancel_grace: float = 60.0  # wait for the job to confirm a cancel
    cancel_wait: float = 10.0  # how long cancel_run waits for the run to end
    fingerprint: Callable[[str], str] = stat_fingerprint
    exists: Callable[[str], bool] = os.path.exists


class StageFailed(Exception):
    """The stage fails with this reason (the service rejected it, or was unreachable)."""


class CancelledBeforeStart(Exception):
    """The run was cancelled before the stage's job was started."""


@dataclass
class RunCtx:
    """What the scheduler and the stage driver share about one run being driven."""

    run_id: str
    cache: bool
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""


class Owner(Protocol):
    """What the driver reads from the scheduler that owns it."""

    store: Store
    backend: StageBackend
    config: SchedulerConfig


class StageDriver:
    """Runs the stages of its owner's runs, one ``run`` call per stage."""

    def __init__(self, owner: Owner) -> None:
        self._owner = owner

    # Read from the owner at each use: a scheduler's backend may be replaced while it runs
    # (tests do), and every stage step must then reach the new one.
    @property
    def store(self) -> Store:
        return self._owner.store

    @property
    def backend(self) -> StageBackend:
        return self._owner.backend

    @property
    def config(self) -> SchedulerConfig:
        return self._owner.config

    async def run(self, ctx: RunCtx, sp: pipeline.StagePlan, results: dict) -> int:
        """Run (or resume, or skip from the cache) one stage; returns its final state."""
        rid, name, svc = ctx.run_id, sp.name, sp.info.service
        att = self.store.latest_attempt(rid, name)
        if att is None:
            spec, inputs = handoff(sp, results)
            key = cache_key(sp, spec, inputs, self.config.fingerprint)
            hit = self.store.find_cached(key, exclude_run=rid) if ctx.cache else None
            if hit is not None and self.config.exists(hit.result.path):
                self.store.set_stage_state(
                    rid, name, SS.STAGE_STATE_SKIPPED,
                    f"same inputs and config as {hit.ref}: reusing {hit.result.path}",
                    result=hit.result, cached_from=hit.ref, cache_key=key,
                )  # fmt: skip
                return SS.STAGE_STATE_SKIPPED
            runtime_fields(spec, rid, sp, inputs)
            att = self.store.begin_attempt(
                rid, name, spec=pipeline.to_json(spec), inputs=inputs, cache_key=key
            )
        while True:
            try:
                if not att.job_id:
                    job_id = await self._start(ctx, sp, att)
                    why = f"attempt {att.number}: job {job_id} on {svc}"
                    self.store.record_job(rid, name, att.number, job_id, why)
                    logs.get(run_id=rid, stage=name).info(
                        "stage_started", job_id=job_id, attempt=att.number
                    )
                    att = self.store.attempt(rid, name, att.number)
                job = await self._follow_or_cancel(ctx, sp, att)
            except StageFailed as e:
                self.store.set_stage_state(rid, name, SS.STAGE_STATE_FAILED, str(e), error=str(e))
                return SS.STAGE_STATE_FAILED
            except CancelledBeforeStart:
                why = f"{ctx.reason} (before the job started)"
                self.store.set_stage_state(rid, name, SS.STAGE_STATE_CANCELLED, why)
                return SS.STAGE_STATE_CANCELLED
            if job is not None:
                return self._finish(ctx, sp, job)
            # The service no longer knows the job: start a new one on the same output.
            if ctx.cancelled.is_set():
                why = f"job {att.job_id} is gone; {ctx.reason}"
                self.store.set_stage_state(rid, name, SS.STAGE_STATE_CANCELLED, why)
                return SS.STAGE_STATE_CANCELLED
            if att.number > self.config.max_restarts:
                why = f"{svc} lost job {att.job_id} (attempt {att.number}); giving up"
                self.store.set_stage_state(rid, name, SS.STAGE_STATE_FAILED, why, error=why)
                return SS.STAGE_STATE_FAILED
            why = (
                f"{svc} no longer knows job {att.job_id}: attempt {att.number + 1} resumes from "
                f"the latest checkpoint in output {att.spec.get('output_name', '')!r}"
            )
            att = self.store.begin_attempt(
                rid, name, spec=att.spec, inputs=att.inputs, restart_reason=why
            )

    async def _start(self, ctx: RunCtx, sp: pipeline.StagePlan, att: Attempt) -> str:
        msg = json_format.ParseDict(att.spec, sp.info.message())
        policy, svc = self.config.retry, sp.info.service
        for n in range(1, policy.max_tries + 1):
            if ctx.cancelled.is_set():
                raise CancelledBeforeStart
            try:
                return await self.backend.start(sp.info.name, msg, att.idempotency_key)
            except Unavailable as e:
                err = e
                if n < policy.max_tries:
                    logs.get(run_id=ctx.run_id, stage=sp.name).warning(
                        "service_unavailable", service=svc, tries=n, error=str(e)
                    )
                    await pause(ctx, policy.delay(n))
            except Exception as e:  # rejected spec or unexpected: retrying cannot help
                raise StageFailed(f"{svc} rejected the {sp.info.name} stage: {e}") from e
        raise StageFailed(f"{svc} service unavailable after {policy.max_tries} tries: {err}")

    async def _follow_or_cancel(
        self, ctx: RunCtx, sp: pipeline.StagePlan, att: Attempt
    ) -> cpb.Job | None:
        follow = asyncio.create_task(self._follow(ctx, sp, att))
        cancel = asyncio.create_task(ctx.cancelled.wait())
        try:
            await asyncio.wait({follow, cancel}, return_when=asyncio.FIRST_COMPLETED)
            if not follow.done():
                try:
                    await self.backend.cancel(sp.info.name, att.job_id, ctx.reason)
                except NotFound:
                    return None
                except Exception as e:
                    logs.get(run_id=ctx.run_id, job_id=att.job_id).warning(
                        "job_cancel_failed", error=str(e)
                    )
                await asyncio.wait({follow}, timeout=self.config.cancel_grace)
                if not follow.done():
                    return cpb.Job(
                        job_id=att.job_id,
                        state=JS.JOB_STATE_CANCELLED,
                        error=f"{sp.info.service} did not confirm the cancel; the job may "
                        "still be running",
                    )
            return follow.result()
        finally:
            follow.cancel()
            cancel.cancel()

    async def _follow(self, ctx: RunCtx, sp: pipeline.StagePlan, att: Attempt) -> cpb.Job | None:
        """Relay the job's events until it ends; None when the service lost the job."""
        kind, after, failures = sp.info.name, att.last_job_seq, 0
        while True:
            seen = after
            try:
                async for ev, job in self.backend.watch(kind, att.job_id, after):
                    failures = 0
                    self.store.relay(ctx.run_id, sp.name, att.number, ev, job)
                    after = max(after, ev.seq)
                    # ``job`` is the job as it is now, not as of ``ev`` (a replay of a
                    # finished job carries the final snapshot on every event): only the
                    # terminal state change, always the job's last event, ends the relay.
                    if ev.WhichOneof("payload") == "state_change" and (
                        ev.state_change.to_state in JOB_TERMINAL
                    ):
                        return job
                job = await self.backend.get(kind, att.job_id)
                if after == seen:  # the stream closed with nothing new
                    if job.state in JOB_TERMINAL:
                        return job
                    await asyncio.sleep(self.config.retry.initial_delay)  # don't spin
            except NotFound:
                return None
            except Unavailable as e:
                failures += 1
                if failures >= self.config.retry.max_tries:
                    raise StageFailed(
                        f"lost contact with {sp.info.service} while following job {att.job_id}: {e}"
                    ) from e
                await asyncio.sleep(self.config.retry.delay(failures))

    def _finish(self, ctx: RunCtx, sp: pipeline.StagePlan, job: cpb.Job) -> int:
        rid, name = ctx.run_id, sp.name
        if job.state == JS.JOB_STATE_SUCCEEDED and job.result.path:
            why = f"job {job.job_id} succeeded: {job.result.path}"
            self.store.set_stage_state(
                rid, name, SS.STAGE_STATE_SUCCEEDED, why, result=job.result, job=job
            )
            return SS.STAGE_STATE_SUCCEEDED
        if job.state == JS.JOB_STATE_CANCELLED:
            why = ctx.reason if ctx.cancelled.is_set() else f"job {job.job_id} was cancelled"
            why += f" ({job.error})" if job.error else ""
            self.store.set_stage_state(
                rid, name, SS.STAGE_STATE_CANCELLED, why, error=job.error, job=job
            )
            return SS.STAGE_STATE_CANCELLED
        if job.state == JS.JOB_STATE_SUCCEEDED:
            why = f"job {job.job_id} succeeded without a result checkpoint"
        else:
            why = f"job {job.job_id} failed: {job.error or 'no reason given'}"
        self.store.set_stage_state(rid, name, SS.STAGE_STATE_FAILED, why, error=why, job=job)
        return SS.STAGE_STATE_FAILED


async def pause(ctx: RunCtx, seconds: float) -> None:
    """Sleep, but wake at once on cancel."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ctx.cancelled.wait(), seconds)
