"""Orchestrator service (port 8600): a thin gRPC adapter over ``orchestrator.scheduler``.

    uv run mlxu serve orchestrator        # or: python -m services.runtime.rpc.server orchestrator

Pipelines, runs and run events live in ``$MLXU_HOME/state/orchestrator.db``; stages run on
the trainer services at ``MLXU_<SERVICE>_ADDR`` (an empty address turns a service off). A
pipeline whose stage needs a service that is not configured, or that does not answer its
health check, is refused before anything is stored. At start, unfinished runs are driven
again; on SIGTERM the run drivers stop without changing any state (the jobs keep training
on their services and the next start reattaches to them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from grpc import aio

from mlx_unified.v1 import orchestrator_pb2 as opb
from mlx_unified.v1 import orchestrator_pb2_grpc, registry_pb2_grpc
from orchestrator import environment, model_refs, pipeline, registry_server, templates
from orchestrator.backend import GrpcStageBackend
from orchestrator.model_registry import check_name
from orchestrator.precheck import check_on_services
from orchestrator.scheduler import (
    RetryPolicy,
    Scheduler,
    SchedulerConfig,
    stage_fields,
    training_pipeline,
)
from orchestrator.store import Store
from services.runtime import logs, specs
from services.runtime.errors import FailedPrecondition, InvalidArgument, shown
from services.runtime.rpc.jobs_servicer import CANCEL_OUTCOME
from services.runtime.rpc.server import ServiceHandle
from services.runtime.settings import Settings

# A trainer service that restarts (or is briefly unreachable) must not fail a long run:
# starts and job watches are retried for ~1 minute (0.25 s doubling to 10 s) before the
# stage fails with the reason.
SCHEDULER_CONFIG = SchedulerConfig(
    retry=RetryPolicy(max_tries=12, initial_delay=0.25, max_delay=10.0),
)
SERVICE_NAME = opb.DESCRIPTOR.services_by_name["OrchestratorService"].full_name


def _required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument.one(field, "is required")
    return value


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    def __init__(self, scheduler: Scheduler, backend: GrpcStageBackend) -> None:
        self.scheduler = scheduler
        self.store = scheduler.store
        self.backend = backend
        self.models = scheduler.models

    # ---- pipelines -------------------------------------------------------------------

    async def CreatePipeline(
        self, request: opb.CreatePipelineRequest, context: aio.ServicerContext
    ) -> opb.CreatePipelineResponse:
        pl = await self._create(request.spec, request.request_id)
        return opb.CreatePipelineResponse(pipeline=pl)

    async def CreatePipelineFromTemplate(
        self, request: opb.CreatePipelineFromTemplateRequest, context: aio.ServicerContext
    ) -> opb.CreatePipelineFromTemplateResponse:
        env = self.scheduler.env
        request = await asyncio.to_thread(model_refs.resolve, self.models, request, "")
        spec = await asyncio.to_thread(
            templates.from_template,
            request.template,
            base_model=request.base_model if request.HasField("base_model") else None,
            dataset=request.dataset if request.HasField("dataset") else None,
            overrides=request.overrides if request.HasField("overrides") else None,
            name=request.name,
            auto_configure=request.auto_configure if request.HasField("auto_configure") else None,
            model_info=env.model_info if env else None,
        )
        pl = await self._create(spec, request.request_id)
        return opb.CreatePipelineFromTemplateResponse(pipeline=pl)

    async def GetPipeline(
        self, request: opb.GetPipelineRequest, context: aio.ServicerContext
    ) -> opb.GetPipelineResponse:
        pid = _required(request.pipeline_id, "pipeline_id")
        return opb.GetPipelineResponse(pipeline=self.store.get_pipeline(pid))

    async def ListPipelines(
        self, request: opb.ListPipelinesRequest, context: aio.ServicerContext
    ) -> opb.ListPipelinesResponse:
        items, token = self.store.list_pipelines(request.page_size, request.page_token)
        return opb.ListPipelinesResponse(pipelines=items, next_page_token=token)

    async def ListTemplates(
        self, request: opb.ListTemplatesRequest, context: aio.ServicerContext
    ) -> opb.ListTemplatesResponse:
        return opb.ListTemplatesResponse(templates=templates.list_templates())

    # ---- runs ------------------------------------------------------------------------

    async def RunPipeline(
        self, request: opb.RunPipelineRequest, context: aio.ServicerContext
    ) -> opb.RunPipelineResponse:
        pid = _required(request.pipeline_id, "pipeline_id")
        run, created = await self.scheduler.run_pipeline(pid, request.request_id)
        if created:
            logs.get(run_id=run.run_id).info("run_created", pipeline_id=pid)
        return opb.RunPipelineResponse(run=run, created=created)

    async def GetRun(
        self, request: opb.GetRunRequest, context: aio.ServicerContext
    ) -> opb.GetRunResponse:
        return opb.GetRunResponse(run=self.store.get_run(_required(request.run_id, "run_id")))

    async def ListRuns(
        self, request: opb.ListRunsRequest, context: aio.ServicerContext
    ) -> opb.ListRunsResponse:
        runs, token = self.store.list_runs(
            request.pipeline_id, request.page_size, request.page_token
        )
        return opb.ListRunsResponse(runs=runs, next_page_token=token)

    async def WatchRun(
        self, request: opb.WatchRunRequest, context: aio.ServicerContext
    ) -> AsyncIterator[opb.WatchRunResponse]:
        rid = _required(request.run_id, "run_id")
        if request.after_seq < 0:
            raise InvalidArgument.one("after_seq", "must be >= 0")
        async for ev in self.scheduler.watch(rid, request.after_seq):
            yield opb.WatchRunResponse(event=ev)

    async def CancelRun(
        self, request: opb.CancelRunRequest, context: aio.ServicerContext
    ) -> opb.CancelRunResponse:
        rid = _required(request.run_id, "run_id")
        before = await asyncio.to_thread(self.store.get_run, rid)
        if before.state == opb.RUN_STATE_CANCELLED:
            # Idempotent, and says so: this call cancelled nothing.
            await context.send_initial_metadata(((CANCEL_OUTCOME, "already-cancelled"),))
            return opb.CancelRunResponse(run=before)
        run = await self.scheduler.cancel_run(rid, request.reason)
        logs.get(run_id=rid).info("run_cancel_requested", state=opb.RunState.Name(run.state))
        if run.state in (opb.RUN_STATE_SUCCEEDED, opb.RUN_STATE_FAILED):
            # The run finished while the cancel was on its way: that outcome stands.
            raise FailedPrecondition(
                f"run {rid} ended {opb.RunState.Name(run.state)} before the cancel took effect"
            )
        done = run.state == opb.RUN_STATE_CANCELLED
        await context.send_initial_metadata(
            ((CANCEL_OUTCOME, "cancelled" if done else "cancelling"),)
        )
        return opb.CancelRunResponse(run=run)

    async def StartTraining(
        self, request: opb.StartTrainingRequest, context: aio.ServicerContext
    ) -> opb.StartTrainingResponse:
        if not request.HasField("stage"):
            raise InvalidArgument.one("stage", "is required")
        request = await asyncio.to_thread(model_refs.resolve, self.models, request, "")
        one = pipeline.normalize(opb.PipelineSpec(stages=[request.stage]))
        if request.request_id:
            # Refused before anything is stored: a request_id a run of another pipeline has.
            await asyncio.to_thread(self._check_run_request, request.request_id)
        if not request.request_id or not self._replay(f"{request.request_id}/pipeline"):
            st = one.stages[0]
            info = pipeline.KINDS.get(st.kind)
            if info is not None and st.WhichOneof("spec"):
                # The trainer's own rules, before a run exists (names under "stage.<kind>").
                await asyncio.to_thread(
                    _check_stage_spec, info.name, getattr(st, info.name), f"stage.{info.name}"
                )
            await self._require_reachable(one, validate=None)
            spec, info = training_pipeline(request.stage)
            try:
                plan = await asyncio.to_thread(
                    pipeline.resolve, spec, self.scheduler.services, self.scheduler.env
                )
                await check_on_services(self.backend, plan, spec.base_model)
            except InvalidArgument as e:
                raise stage_fields(e, info) from None
        run, pl = await self.scheduler.start_training(request.stage, request.request_id)
        return opb.StartTrainingResponse(run=run, pipeline=pl)

    # ---- helpers ---------------------------------------------------------------------

    def _check_run_request(self, request_id: str) -> None:
        run = self.store.run_for_request(request_id)
        if run is None:
            return
        pl = self.store.pipeline_for_request(f"{request_id}/pipeline")
        if pl is None or pl.pipeline_id != run.pipeline_id:
            raise FailedPrecondition(
                f"request_id {shown(request_id)} was used for a run of pipeline "
                f"{run.pipeline_id}; use a new request_id"
            )

    def _replay(self, request_id: str) -> bool:
        return self.store.pipeline_for_request(request_id) is not None

    async def _create(self, spec: opb.PipelineSpec, request_id: str) -> opb.Pipeline:
        # Registry references become checkpoints before anything else sees the spec.
        spec = await asyncio.to_thread(model_refs.resolve, self.models, spec, "spec")
        if not request_id or not self._replay(request_id):
            normal = pipeline.normalize(spec)

            def validate() -> pipeline.Plan:
                if normal.register_as:
                    check_name(normal.register_as, "spec.register_as")
                plan = pipeline.resolve(normal, self.scheduler.services, self.scheduler.env)
                check_stages(plan)
                return plan

            plan = await asyncio.to_thread(validate)
            await self._require_reachable(normal, None)
            # Every stage as its service would start it: models, datasets, row formats.
            await check_on_services(self.backend, plan, normal.base_model)
        pl, created = await asyncio.to_thread(self.scheduler.create_pipeline, spec, request_id)
        if created:
            logs.get(pipeline_id=pl.pipeline_id).info(
                "pipeline_created", name=pl.spec.name, stages=len(pl.spec.stages)
            )
        return pl

    async def _require_reachable(
        self, spec: opb.PipelineSpec, validate: Callable[[], Any] | None
    ) -> None:
        """FailedPrecondition naming each stage whose (configured) service does not answer
        its health check. A spec that is also invalid gets its InvalidArgument instead:
        the caller has to fix that first. Unconfigured services are ``resolve``'s to report.
        """
        stages = [
            (st.name, pipeline.KINDS[st.kind]) for st in spec.stages if st.kind in pipeline.KINDS
        ]
        needed = {info.service for _, info in stages} & self.scheduler.services
        down = await self.backend.unreachable(needed)
        if not down:
            return
        if validate is not None:
            await asyncio.to_thread(validate)
        problems = [
            f"stage {name!r} ({info.name}) needs the {info.service} service, which is "
            f"{down[info.service]}"
            for name, info in stages
            if info.service in down
        ]
        raise FailedPrecondition("; ".join(problems))


# Reference fields are the trainer service's to resolve (they may name its host's files, or
# be bound to an earlier stage's result): the orchestrator checks everything else.
_REFERENCE_SUFFIXES = (".model", ".adapter_path", ".dataset.path", ".dataset.valid_path")


def _check_stage_spec(kind: str, spec: Any, prefix: str) -> None:
    try:
        specs.check_static(kind, spec, prefix)
    except InvalidArgument as e:
        kept = [v for v in e.violations if not v.field.endswith(_REFERENCE_SUFFIXES)]
        if kept:
            raise InvalidArgument(kept) from None


def check_stages(plan: pipeline.Plan) -> None:
    """Every stage spec through its trainer's own static checks (the registry's
    ``Method.check``), so a pipeline is refused here, with every violation, rather than
    failing at its stage."""
    found: list = []
    for sp in plan.stages:
        try:
            _check_stage_spec(sp.info.name, sp.message(), f"spec.stages[{sp.index}].{sp.info.name}")
        except InvalidArgument as e:
            found.extend(e.violations)
    if found:
        raise InvalidArgument(found)


async def register(server: aio.Server, settings: Settings) -> ServiceHandle:
    settings.ensure_dirs()
    store = Store(settings.db_path)
    backend = GrpcStageBackend.from_settings(settings)
    env = await asyncio.to_thread(environment.from_settings, settings)
    scheduler = Scheduler(
        store, backend, services=backend.configured(), env=env, config=SCHEDULER_CONFIG
    )
    orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(
        OrchestratorServicer(scheduler, backend), server
    )
    registry_pb2_grpc.add_ModelRegistryServiceServicer_to_server(
        registry_server.ModelRegistryServicer(scheduler.models, store, settings.allowed_roots),
        server,
    )

    async def on_start() -> None:
        resumed = await scheduler.recover()
        logs.get().info(
            "orchestrator_ready",
            services={s: backend.endpoints[s] for s in sorted(backend.configured())},
            resumed_runs=resumed,
        )

    async def on_stop(grace: float) -> None:
        # Runs keep their state: their jobs go on training, recover() reattaches later.
        await scheduler.close()
        await backend.close()

    return ServiceHandle(
        names=[SERVICE_NAME, registry_server.SERVICE_NAME],
        on_start=on_start,
        on_stop=on_stop,
        extra={"scheduler": scheduler, "store": store, "backend": backend},
    )
