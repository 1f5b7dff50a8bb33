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

This module sequences runs (one task each); steps 3-5 for one stage are stages.py's
StageDriver, steps 1-2 are stage_inputs.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

from google.protobuf.message import Message

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from orchestrator import lineage, pipeline, templates
from orchestrator.autoconfig import Environment
from orchestrator.model_registry import ModelRegistry
from orchestrator.stage_inputs import cache_key, handoff, stat_fingerprint
from orchestrator.stages import (
    JOB_TERMINAL,
    RetryPolicy,
    RunCtx,
    SchedulerConfig,
    StageBackend,
    StageDriver,
)
from orchestrator.store import STAGE_DONE, Store
from services.runtime import logs
from services.runtime.errors import FailedPrecondition, InvalidArgument, Violation

# Names that live in stages.py / stage_inputs.py; the server, tests and tools import them here.
__all__ = [
    "JOB_TERMINAL",
    "RetryPolicy",
    "Scheduler",
    "SchedulerConfig",
    "StageBackend",
    "handoff",
    "stat_fingerprint",
]

RS, SS = opb.RunState, opb.StageState


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
        self._ctx: dict[str, RunCtx] = {}
        self._driver = StageDriver(self)
        self.models = ModelRegistry(store.db)

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
        spec, info = training_pipeline(stage)
        try:
            pl, _ = self.create_pipeline(spec, f"{request_id}/pipeline" if request_id else "")
        except InvalidArgument as e:
            raise stage_fields(e, info) from None
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
        ctx = self._ctx.setdefault(run_id, RunCtx(run_id, plan.cache))
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

    async def _drive(self, ctx: RunCtx, plan: pipeline.Plan) -> None:
        rid = ctx.run_id
        try:
            to, reason, result = await self._stages(ctx, plan)
            error = reason if to == RS.RUN_STATE_FAILED else ""
            also = self._register_as(rid) if to == RS.RUN_STATE_SUCCEEDED else None
            self.store.set_run_state(rid, to, reason, error=error, result=result, also=also)
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

    def _register_as(self, run_id: str) -> Callable[[Any], None] | None:
        """The write that registers a succeeded run's result (PipelineSpec.register_as), to
        run in the transaction that ends the run: the run never SUCCEEDS unregistered."""
        run = self.store.get_run(run_id)
        name = self.store.get_pipeline(run.pipeline_id).spec.register_as
        if not name:
            return None
        ckpt, lin, base = lineage.from_run(self.store, run)

        def write(db: Any) -> None:
            v = self.models.add_version(db, name, ckpt, base_model=base, lineage=lin)
            logs.get(run_id=run_id).info("model_registered", model=name, version=v)

        return write

    async def _stages(self, ctx: RunCtx, plan: pipeline.Plan) -> tuple[int, str, Any]:
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

    async def _run_stage(self, ctx: RunCtx, sp: pipeline.StagePlan, results: dict) -> int:
        return await self._driver.run(ctx, sp, results)

    def cache_key(self, sp: pipeline.StagePlan, spec: Message, inputs: dict[str, Any]) -> str:
        return cache_key(sp, spec, inputs, self.config.fingerprint)


def training_pipeline(stage: opb.Stage) -> tuple[opb.PipelineSpec, pipeline.KindInfo | None]:
    """StartTraining's one-stage pipeline: uncached, its base model the stage's own model
    (a distillation stage's: its first teacher). InvalidArgument on ``stage`` when it names
    no kind of training."""
    spec = pipeline.normalize(opb.PipelineSpec(stages=[stage], cache=False))
    st = spec.stages[0]
    info = pipeline.KINDS.get(st.kind)
    if info is None:
        kinds = ", ".join(sorted(pipeline.BY_NAME))
        raise InvalidArgument.one("stage", f"set the stage's kind or spec: one of {kinds}")
    if st.WhichOneof("spec"):
        body = getattr(st, info.name)
        target = "teachers[0].model" if info.name == "distill" and body.teachers else ""
        spec.base_model.CopyFrom(pipeline.ref_at(body, target or info.model_target))
    spec.name = f"train-{st.name or 'stage'}"
    return spec, info


def stage_fields(e: InvalidArgument, info: pipeline.KindInfo | None) -> InvalidArgument:
    """A one-stage pipeline's violations named as StartTraining's request names them."""
    return InvalidArgument([_stage_field(x, info) for x in e.violations])


def _stage_field(v: Violation, info: pipeline.KindInfo | None) -> Violation:
    f = v.field.replace("spec.stages[0].", "stage.").replace("spec.stages[0]", "stage")
    if f == "spec.base_model.model" and info is not None:
        f = f"stage.{info.name}.{info.model_target}.model"
    return Violation(f, v.description)
