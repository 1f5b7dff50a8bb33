"""The original system's endpoints, with its request and response shapes: pipelines,
direct training and workflow templates, each a thin call to the orchestrator."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Query
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from pydantic import BaseModel, ConfigDict, Field

from mlx_unified.v1 import orchestrator_pb2 as opb
from mlx_unified.v1 import orchestrator_pb2_grpc as ogrpc
from services.gateway import deps
from services.gateway.backends import Backends
from services.gateway.convert import to_json
from services.gateway.errors import BackendError
from services.gateway.legacy_spec import PipelineCreate, build
from services.runtime.settings import Settings

router = APIRouter(prefix="/v1", tags=["original API"])
Stub = ogrpc.OrchestratorServiceStub


def _lower(enum: Any, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()


def pipeline_summary(p: opb.Pipeline) -> dict[str, Any]:
    return {
        "pipeline_id": p.pipeline_id,
        "name": p.spec.name,
        "stages": [s.name for s in p.spec.stages],
        "kinds": [_lower(opb.StageKind, s.kind, "STAGE_KIND_") for s in p.spec.stages],
        "base_model": p.spec.base_model.model,
        "dataset_path": p.spec.dataset.path,
        "auto_configure": p.spec.auto_configure,
        "created_at": p.create_time.ToJsonString() if p.HasField("create_time") else None,
    }


def run_status(run: opb.Run) -> dict[str, Any]:
    stages = []
    for s in run.stages:
        stages.append(
            {
                "name": s.name,
                "kind": _lower(opb.StageKind, s.kind, "STAGE_KIND_"),
                "service": s.service,
                "status": _lower(opb.StageState, s.state, "STAGE_STATE_"),
                "job_id": s.job_id or None,
                "step": s.job.step,
                "total_steps": s.job.total_steps,
                "metrics": dict(s.job.metrics),
                "result": s.result.path or None,
                "error": s.error or None,
            }
        )
    current = next((s["name"] for s in stages if s["status"] == "running"), None)
    return {
        "pipeline_id": run.pipeline_id,
        "run_id": run.run_id,
        "status": _lower(opb.RunState, run.state, "RUN_STATE_"),
        "current_stage": current,
        "stages": stages,
        "error": run.error or None,
        "result": run.result.path or None,
    }


async def _orch(b: Backends, method: str, req: Message, key: str | None) -> Any:
    return await b.call("orchestrator", Stub, method, req, key)


async def _create(b: Backends, s: Settings, body: PipelineCreate, key: str | None) -> dict:
    req = await build(body, s.allowed_roots)
    method = (
        "CreatePipeline"
        if isinstance(req, opb.CreatePipelineRequest)
        else "CreatePipelineFromTemplate"
    )
    pipeline = (await _orch(b, method, req, key)).pipeline
    return {**pipeline_summary(pipeline), "status": "created", "pipeline": to_json(pipeline)}


async def _run(b: Backends, pipeline_id: str, request_id: str, key: str | None) -> dict:
    req = opb.RunPipelineRequest(pipeline_id=pipeline_id, request_id=request_id)
    resp = await _orch(b, "RunPipeline", req, key)
    return {**run_status(resp.run), "created": resp.created, "run": to_json(resp.run)}


@router.post("/pipelines/create", summary="Create a pipeline (original shape)")
async def create_pipeline(
    body: PipelineCreate,
    b: Backends = Depends(deps.backends),
    s: Settings = Depends(deps.settings),
    key: str | None = Depends(deps.api_key),
) -> dict:
    return await _create(b, s, body, key)


@router.get("/pipelines", summary="List pipelines, newest first")
async def list_pipelines(
    page_size: int = Query(50, ge=0, le=500),
    page_token: str = "",
    b: Backends = Depends(deps.backends),
    key: str | None = Depends(deps.api_key),
) -> dict:
    req = opb.ListPipelinesRequest(page_size=page_size, page_token=page_token)
    resp = await _orch(b, "ListPipelines", req, key)
    return {
        "pipelines": [pipeline_summary(p) for p in resp.pipelines],
        "next_page_token": resp.next_page_token or None,
    }


@router.get("/pipelines/{pipeline_id}", summary="One pipeline, with its resolved stages")
async def get_pipeline(
    pipeline_id: str, b: Backends = Depends(deps.backends), key: str | None = Depends(deps.api_key)
) -> dict:
    req = opb.GetPipelineRequest(pipeline_id=pipeline_id)
    p = (await _orch(b, "GetPipeline", req, key)).pipeline
    return {**pipeline_summary(p), "pipeline": to_json(p)}


class RunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field("", description="idempotency key: the same one, the same run")


@router.post("/pipelines/{pipeline_id}/run", summary="Start a run of a pipeline")
async def run_pipeline(
    pipeline_id: str,
    body: RunBody | None = Body(None),
    b: Backends = Depends(deps.backends),
    key: str | None = Depends(deps.api_key),
) -> dict:
    return await _run(b, pipeline_id, body.request_id if body else "", key)


@router.get("/pipelines/{pipeline_id}/status", summary="The state of a pipeline's latest run")
async def pipeline_status(
    pipeline_id: str,
    run_id: str = Query("", description="a run of this pipeline (default: the latest)"),
    b: Backends = Depends(deps.backends),
    key: str | None = Depends(deps.api_key),
) -> dict:
    if run_id:
        run = (await _orch(b, "GetRun", opb.GetRunRequest(run_id=run_id), key)).run
        if run.pipeline_id != pipeline_id:
            raise BackendError.invalid("run_id", f"run {run_id} is not a run of {pipeline_id}")
        return run_status(run)
    req = opb.ListRunsRequest(pipeline_id=pipeline_id, page_size=1)
    runs = (await _orch(b, "ListRuns", req, key)).runs
    if runs:
        return run_status(runs[0])
    p = await _orch(b, "GetPipeline", opb.GetPipelineRequest(pipeline_id=pipeline_id), key)
    return {
        "pipeline_id": pipeline_id,
        "run_id": None,
        "status": "not_started",
        "current_stage": None,
        "stages": [{"name": s.name, "status": "pending"} for s in p.pipeline.spec.stages],
        "error": None,
        "result": None,
    }


class TrainBody(BaseModel):
    """One stage, trained as a one-stage pipeline run."""

    model_config = ConfigDict(extra="forbid")
    base_model: str = Field(min_length=1, description="the model to train")
    dataset_path: str = Field(min_length=1)
    name: str = ""
    auto_configure: bool = True
    config: dict[str, Any] = Field(default_factory=dict, description="the method's spec JSON")
    request_id: str = ""


class DistillBody(TrainBody):
    teacher_model: str = Field(
        "", description="default: the base model teaches a half-depth student built from it"
    )


class RLHFBody(TrainBody):
    method: str = Field("", description="dpo, kto, orpo, ppo, grpo; default: by data format")


async def _train(b: Backends, s: Settings, stage: str, body: TrainBody, key: str | None) -> dict:
    config = dict(body.config)
    if isinstance(body, DistillBody) and body.teacher_model:
        config.setdefault("teachers", [{"model": {"model": body.teacher_model}}])
    rid = body.request_id
    spec = PipelineCreate(
        name=body.name or f"train-{stage}",
        stages=[stage],
        base_model=body.base_model,
        dataset_path=body.dataset_path,
        auto_configure=body.auto_configure,
        config={stage: config} if config else {},
        request_id=f"{rid}/pipeline" if rid else "",
    )
    created = await _create(b, s, spec, key)
    run = await _run(b, created["pipeline_id"], f"{rid}/run" if rid else "", key)
    return {**run, "name": created["name"]}


@router.post("/train/sft", summary="Supervised fine-tuning (a one-stage run)")
async def train_sft(
    body: TrainBody,
    b: Backends = Depends(deps.backends),
    s: Settings = Depends(deps.settings),
    key: str | None = Depends(deps.api_key),
) -> dict:
    return await _train(b, s, "sft", body, key)


@router.post("/train/distill", summary="Knowledge distillation (a one-stage run)")
async def train_distill(
    body: DistillBody,
    b: Backends = Depends(deps.backends),
    s: Settings = Depends(deps.settings),
    key: str | None = Depends(deps.api_key),
) -> dict:
    return await _train(b, s, "distillation", body, key)


@router.post("/train/rlhf", summary="RLHF: DPO / KTO by data format, or the named method")
async def train_rlhf(
    body: RLHFBody,
    b: Backends = Depends(deps.backends),
    s: Settings = Depends(deps.settings),
    key: str | None = Depends(deps.api_key),
) -> dict:
    return await _train(b, s, body.method or "rlhf", body, key)


@router.get("/workflows/templates", summary="The built-in pipeline templates")
async def workflow_templates(
    b: Backends = Depends(deps.backends), key: str | None = Depends(deps.api_key)
) -> dict:
    resp = await _orch(b, "ListTemplates", opb.ListTemplatesRequest(), key)
    return {
        "templates": [
            {
                "name": t.name,
                "description": t.description,
                "stages": [s.name for s in t.spec.stages],
                "spec": to_json(t.spec),
            }
            for t in resp.templates
        ]
    }


class FromTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    template: str = Field(min_length=1, examples=["chatbot"])
    base_model: str = Field("", examples=["mlx-community/Qwen2.5-1.5B"])
    dataset_path: str = ""
    name: str = ""
    auto_configure: bool | None = None
    overrides: dict[str, Any] = Field(default_factory=dict, description="PipelineSpec JSON")
    request_id: str = ""


@router.post("/workflows/from-template", summary="Create a pipeline from a template")
async def from_template(
    body: FromTemplate,
    b: Backends = Depends(deps.backends),
    key: str | None = Depends(deps.api_key),
) -> dict:
    req = opb.CreatePipelineFromTemplateRequest(
        request_id=body.request_id, template=body.template, name=body.name
    )
    if body.base_model:
        req.base_model.model = body.base_model
    if body.dataset_path:
        req.dataset.path = body.dataset_path
    if body.auto_configure is not None:
        req.auto_configure = body.auto_configure
    if body.overrides:
        s = struct_pb2.Struct()
        s.update(body.overrides)
        req.overrides.CopyFrom(s)
    p = (await _orch(b, "CreatePipelineFromTemplate", req, key)).pipeline
    return {**pipeline_summary(p), "status": "created", "pipeline": to_json(p)}
