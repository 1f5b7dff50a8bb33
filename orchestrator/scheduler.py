"""The scheduler: sequences a run's stages across the trainer services.

One asyncio task drives each unfinished run, stage by stage:

1. hand-off: bound inputs of the stage spec get the source stages' result checkpoints
   (adapter -> ``{model: base, adapter_path: ckpt}``, full -> ``{model: ckpt}``); the inputs'
   paths and sha256 are recorded with the attempt and written as ``mlxu.input.*`` labels.
2. cache: when the pipeline caches, a stage whose kind, spec and inputs (paths, sha256, and
   a stat fingerprint of every local path it names) hash to an earlier SUCCEEDED stage's key
   is SKIPPED with that stage's result, provided its checkpoint still exists.
3. attempt: the exact spec is stored *before* it is sent, under the idempotency key
   ``runs/{run}/stages/{name}/attempts/{n}`` (the service's request_id), so a retried or
   re-issued start never launches a second job. ``output_name`` defaults to
   ``{run_id}-{stage}`` and is the same for every attempt of a stage.
4. start: ``Unavailable`` is retried with bounded exponential backoff, then the stage fails
   with the reason; any other error (InvalidArgument, FailedPrecondition, ...) fails at once.
5. follow: job events are relayed into the run log (deduplicated by job seq); a dropped
   watch is re-opened after the last relayed seq. A job the service no longer knows
   (NotFound) is restarted as a new attempt (a new job with the same output_name, which the
   service resumes from that directory's latest checkpoint), at most ``max_restarts`` times.

Cancel propagates to the running job and ends the run CANCELLED. ``recover()`` at startup
drives every unfinished run again: RUNNING stages reattach to their job from the last
relayed seq; a stage recorded but never acknowledged re-sends its start (same key).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf import json_format
from google.protobuf.message import Message

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from orchestrator import pipeline, templates
from orchestrator.autoconfig import Environment
from orchestrator.store import STAGE_DONE, Attempt, Store
from services.runtime import logs
from services.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    Violation,
)

RS, SS, JS = opb.RunState, opb.StageState, cpb.JobState
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


def stat_fingerprint(path: str) -> str:
    """Cheap content fingerprint of a local file or directory ("" for non-paths)."""
    if not path or not os.path.exists(path):
        return ""
    if os.path.isfile(path):
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    h, seen = hashlib.sha256(), 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        seen += len(files)
        if seen > 10_000:  # not a model or dataset directory: don't walk a whole tree
            return "large-dir"
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            h.update(f"{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:".encode())
            h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class SchedulerConfig:
    retry: RetryPolicy = RetryPolicy()
    max_restarts: int = 2  # new attempts for jobs the service lost
    cancel_grace: float = 60.0  # wait for the job to confirm a cancel
    cancel_wait: float = 10.0  # how long cancel_run waits for the run to end
    fingerprint: Callable[[str], str] = stat_fingerprint
    exists: Callable[[str], bool] = os.path.exists


class _StageFailed(Exception):
    pass


class _CancelledBeforeStart(Exception):
    pass


@dataclass
class _Ctx:
    run_id: str
    cache: bool
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""


class Scheduler:
    def __init__(
        self,
        store: Store,
        backend: StageBackend,
        *,
        services: Collection[str],
        env: Environment | None = None,
        config: SchedulerConfig = SchedulerConfig(),
    ) -> None:
        self.store, self.backend, self.env, self.config = store, backend, env, config
        self.services = frozenset(services)
        self._tasks: dict[str, asyncio.Task] = {}
        self._ctx: dict[str, _Ctx] = {}

    # ---- pipelines -------------------------------------------------------------------

    def create_pipeline(
        self, spec: opb.PipelineSpec, request_id: str = ""
    ) -> tuple[opb.Pipeline, bool]:
        """Validate, resolve and store; nothing is stored when validation fails."""
        digest = hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()
        if request_id and (old := self.store.pipeline_for_request(request_id, digest)):
            return old, False
        spec = pipeline.normalize(spec)
        plan = pipeline.resolve(spec, self.services, self.env)
        return self.store.create_pipeline(spec, plan.to_json(), request_id, digest)

    def create_from_template(
        self, template: str, *, request_id: str = "", **kw: Any
    ) -> tuple[opb.Pipeline, bool]:
        """``templates.from_template`` then ``create_pipeline``; errors name ``spec.*``."""
        model_info = self.env.model_info if self.env else None
        spec = templates.from_template(template, model_info=model_info, **kw)
        return self.create_pipeline(spec, request_id)

    # ---- runs ------------------------------------------------------------------------

    async def run_pipeline(self, pipeline_id: str, request_id: str = "") -> tuple[opb.Run, bool]:
        run, created = self.store.create_run(pipeline_id, request_id)
        if created:
            self._spawn(run.run_id)
        return run, created

    async def start_training(
        self, stage: opb.Stage, request_id: str = ""
    ) -> tuple[opb.Run, opb.Pipeline]:
        """A one-stage pipeline (uncached) and its run; errors name ``stage.*``."""
        spec = opb.PipelineSpec(stages=[stage], cache=False)
        spec = pipeline.normalize(spec)
        st = spec.stages[0]
        info = pipeline.KINDS.get(st.kind)
        if info is not None and st.WhichOneof("spec"):
            body = getattr(st, info.name)
            target = "teachers[0].model" if info.name == "distill" and body.teachers else ""
            ref = pipeline.ref_at(body, target or info.model_target)
            spec.base_model.CopyFrom(ref)
        spec.name = f"train-{st.name or 'stage'}"
        try:
            pl, _ = self.create_pipeline(spec, f"{request_id}/pipeline" if request_id else "")
        except InvalidArgument as e:
            raise InvalidArgument([_stage_field(x, info) for x in e.violations]) from None
        run, _ = await self.run_pipeline(pl.pipeline_id, request_id)
        return run, pl

    async def cancel_run(self, run_id: str, reason: str = "") -> opb.Run:
        run = self.store.get_run(run_id)
        if run.state == RS.RUN_STATE_CANCELLED:
            return run
        if run.state in (RS.RUN_STATE_SUCCEEDED, RS.RUN_STATE_FAILED):
            raise FailedPrecondition(f"run {run_id} already ended {RS.Name(run.state)}")
        reason = reason or "cancelled by request"
        self.store.request_cancel(run_id, reason)
        task = self._tasks.get(run_id) or self._spawn(run_id)
        ctx = self._ctx[run_id]
        ctx.reason = ctx.reason or reason
        ctx.cancelled.set()
        await asyncio.wait({task}, timeout=self.config.cancel_wait)
        return self.store.get_run(run_id)

    async def recover(self) -> list[str]:
        """Drive every unfinished run again (call once at startup)."""
        ids = [r for r in self.store.unfinished_runs() if r not in self._tasks]
        for rid in ids:
            self._spawn(rid)
        return ids

    async def wait(self, run_id: str, timeout: float | None = None) -> opb.Run:
        task = self._tasks.get(run_id)
        if task is not None:
            await asyncio.wait({task}, timeout=timeout)
        return self.store.get_run(run_id)

    def watch(self, run_id: str, after_seq: int = 0) -> AsyncIterator[opb.RunEvent]:
        return self.store.watch(run_id, after_seq)

    async def close(self) -> None:
        """Stop driving runs without changing their state (shutdown); recover() resumes."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    def _spawn(self, run_id: str) -> asyncio.Task:
        run = self.store.get_run(run_id)
        plan = pipeline.Plan.from_json(self.store.resolved(run.pipeline_id))
        ctx = self._ctx.setdefault(run_id, _Ctx(run_id, plan.cache))
        if reason := self.store.cancel_reason(run_id):
            ctx.reason = reason
            ctx.cancelled.set()
        task = asyncio.create_task(self._drive(ctx, plan), name=f"run:{run_id}")
        self._tasks[run_id] = task

        def done(t: asyncio.Task) -> None:
            if self._tasks.get(run_id) is t:
                del self._tasks[run_id]
                self._ctx.pop(run_id, None)

        task.add_done_callback(done)
        return task

    # ---- driving ---------------------------------------------------------------------

    async def _drive(self, ctx: _Ctx, plan: pipeline.Plan) -> None:
        rid = ctx.run_id
        try:
            to, reason, result = await self._stages(ctx, plan)
            error = reason if to == RS.RUN_STATE_FAILED else ""
            self.store.set_run_state(rid, to, reason, error=error, result=result)
            logs.get(run_id=rid).info("run_ended", state=RS.Name(to), reason=reason)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug must end the run visibly, not leave it RUNNING
            logs.get(run_id=rid).exception("run_driver_failed")
            msg = f"internal error: {type(e).__name__}: {e}"
            try:
                self.store.set_run_state(rid, RS.RUN_STATE_FAILED, msg, error=msg)
            except Exception:
                logs.get(run_id=rid).exception("run_failure_not_recorded")

    async def _stages(self, ctx: _Ctx, plan: pipeline.Plan) -> tuple[int, str, Any]:
        """Run the stages still to do; returns how the run ends (state, reason, result)."""
        rid = ctx.run_id
        run = self.store.get_run(rid)
        if run.state == RS.RUN_STATE_PENDING:
            if ctx.cancelled.is_set():
                return RS.RUN_STATE_CANCELLED, ctx.reason, None
            self.store.set_run_state(rid, RS.RUN_STATE_RUNNING, "started")
        results: dict[str, cpb.Checkpoint] = {}
        for sp in plan.stages:
            state = run.stages[sp.index].state
            if state not in STAGE_DONE | {SS.STAGE_STATE_FAILED, SS.STAGE_STATE_CANCELLED}:
                if ctx.cancelled.is_set():  # stages never started stay PENDING
                    return RS.RUN_STATE_CANCELLED, ctx.reason, None
                state = await self._run_stage(ctx, sp, results)
            row = self.store.get_run(rid).stages[sp.index]
            if state == SS.STAGE_STATE_CANCELLED:
                why = (
                    ctx.reason
                    or f"stage {sp.name!r} was cancelled: {row.error or 'by its service'}"
                )
                return RS.RUN_STATE_CANCELLED, why, None
            if state == SS.STAGE_STATE_FAILED:
                return RS.RUN_STATE_FAILED, f"stage {sp.name!r} failed: {row.error}", None
            results[sp.name] = row.result
        return RS.RUN_STATE_SUCCEEDED, "all stages done", results[plan.stages[-1].name]

    async def _run_stage(self, ctx: _Ctx, sp: pipeline.StagePlan, results: dict) -> int:
        rid, name, svc = ctx.run_id, sp.name, sp.info.service
        att = self.store.latest_attempt(rid, name)
        if att is None:
            spec, inputs = handoff(sp, results)
            key = self.cache_key(sp, spec, inputs)
            hit = self.store.find_cached(key, exclude_run=rid) if ctx.cache else None
            if hit is not None and self.config.exists(hit.result.path):
                self.store.set_stage_state(
                    rid, name, SS.STAGE_STATE_SKIPPED,
                    f"same inputs and config as {hit.ref}: reusing {hit.result.path}",
                    result=hit.result, cached_from=hit.ref, cache_key=key,
                )  # fmt: skip
                return SS.STAGE_STATE_SKIPPED
            _runtime_fields(spec, rid, sp, inputs)
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
            except _StageFailed as e:
                self.store.set_stage_state(rid, name, SS.STAGE_STATE_FAILED, str(e), error=str(e))
                return SS.STAGE_STATE_FAILED
            except _CancelledBeforeStart:
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

    async def _start(self, ctx: _Ctx, sp: pipeline.StagePlan, att: Attempt) -> str:
        msg = json_format.ParseDict(att.spec, sp.info.message())
        policy, svc = self.config.retry, sp.info.service
        for n in range(1, policy.max_tries + 1):
            if ctx.cancelled.is_set():
                raise _CancelledBeforeStart
            try:
                return await self.backend.start(sp.info.name, msg, att.idempotency_key)
            except Unavailable as e:
                err = e
                if n < policy.max_tries:
                    logs.get(run_id=ctx.run_id, stage=sp.name).warning(
                        "service_unavailable", service=svc, tries=n, error=str(e)
                    )
                    await _pause(ctx, policy.delay(n))
            except Exception as e:  # rejected spec or unexpected: retrying cannot help
                raise _StageFailed(f"{svc} rejected the {sp.info.name} stage: {e}") from e
        raise _StageFailed(f"{svc} service unavailable after {policy.max_tries} tries: {err}")

    async def _follow_or_cancel(
        self, ctx: _Ctx, sp: pipeline.StagePlan, att: Attempt
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

    async def _follow(self, ctx: _Ctx, sp: pipeline.StagePlan, att: Attempt) -> cpb.Job | None:
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
                    raise _StageFailed(
                        f"lost contact with {sp.info.service} while following job {att.job_id}: {e}"
                    ) from e
                await asyncio.sleep(self.config.retry.delay(failures))

    def _finish(self, ctx: _Ctx, sp: pipeline.StagePlan, job: cpb.Job) -> int:
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

    def cache_key(self, sp: pipeline.StagePlan, spec: Message, inputs: dict[str, Any]) -> str:
        body = pipeline.to_json(spec)
        local = sorted({s for s in _strings(body) if os.path.isabs(s) or s.startswith(".")})
        payload = {
            "kind": sp.info.name,
            "spec": body,
            "inputs": {k: [v["path"], v["sha256"]] for k, v in sorted(inputs.items())},
            "content": {p: self.config.fingerprint(p) for p in local},
        }
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def handoff(sp: pipeline.StagePlan, results: dict[str, cpb.Checkpoint]) -> tuple[Message, dict]:
    """The stage spec with each bound input set to its source stage's result checkpoint."""
    spec = sp.message()
    inputs: dict[str, Any] = {}
    for b in sp.bindings:
        ckpt = results[b.from_stage]
        pipeline.ref_at(spec, b.target, create=True).CopyFrom(pipeline.ref_for(ckpt))
        inputs[b.input] = {"from_stage": b.from_stage, "path": ckpt.path, "sha256": ckpt.sha256}
    return spec, inputs


def _runtime_fields(spec: Any, run_id: str, sp: pipeline.StagePlan, inputs: dict) -> None:
    """Per-run fields, outside the cache key: output directory and provenance labels."""
    if not spec.output_name:
        spec.output_name = f"{run_id}-{sp.name}"
    spec.labels["mlxu.run_id"] = run_id
    spec.labels["mlxu.stage"] = sp.name
    for name, inp in inputs.items():
        spec.labels[f"mlxu.input.{name}.path"] = inp["path"]
        spec.labels[f"mlxu.input.{name}.sha256"] = inp["sha256"]


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


async def _pause(ctx: _Ctx, seconds: float) -> None:
    """Sleep, but wake at once on cancel."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ctx.cancelled.wait(), seconds)


def _stage_field(v: Violation, info: pipeline.KindInfo | None) -> Violation:
    f = v.field.replace("spec.stages[0].", "stage.").replace("spec.stages[0]", "stage")
    if f == "spec.base_model.model" and info is not None:
        f = f"stage.{info.name}.{info.model_target}.model"
    return Violation(f, v.description)
