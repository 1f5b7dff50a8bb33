"""Our gRPC resources under /v1, generated from the contracts: one route per RPC in
``ROUTES`` (and one Start route per training method in services.registry). A body parses
into the RPC's request message with json_format (path parameters fill their fields), a GET's
query string does the same, and the response is the RPC's response message as JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from google.protobuf.message import Message

from clients.client_connection import TRAINER_SERVICES
from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import (
    common_pb2_grpc,
    distillation_pb2_grpc,
    generation_pb2_grpc,
    rlhf_pb2_grpc,
    training_pb2_grpc,
)
from mlx_unified.v1 import generation_pb2 as gpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from mlx_unified.v1 import orchestrator_pb2_grpc as ogrpc
from mlx_unified.v1 import registry_pb2 as mpb
from mlx_unified.v1 import registry_pb2_grpc as mgrpc
from mlx_unified.v1 import rlhf_pb2 as rpb
from services import registry
from services.gateway import deps
from services.gateway.backends import Backends
from services.gateway.convert import from_query, parse, to_json
from services.gateway.errors import BackendError
from services.gateway.schemas import field_schema, ref

ANY_TRAINER = "{service}"  # the service comes from the path: training, distillation, rlhf
STUBS: dict[str, type] = {
    "training": training_pb2_grpc.TrainingServiceStub,
    "distillation": distillation_pb2_grpc.DistillationServiceStub,
    "rlhf": rlhf_pb2_grpc.RLHFServiceStub,
}
ORCH = ogrpc.OrchestratorServiceStub
JOBS = common_pb2_grpc.JobServiceStub
GEN = generation_pb2_grpc.GenerationServiceStub
MODELS = mgrpc.ModelRegistryServiceStub  # served by the orchestrator process
# Components for the OpenAPI document, filled as routes are declared (see app.openapi).
SCHEMAS: dict[str, Any] = {}


@dataclass(frozen=True)
class Rpc:
    verb: str  # "GET", "DELETE": request from the query string; "POST": from the JSON body
    path: str
    service: str
    stub: type
    method: str
    request: type[Message]
    response: type[Message]
    summary: str
    tag: str


ROUTES: tuple[Rpc, ...] = (
    Rpc("GET", "/v1/jobs/{service}", ANY_TRAINER, JOBS, "ListJobs",
        cpb.ListJobsRequest, cpb.ListJobsResponse, "List a service's jobs", "jobs"),
    Rpc("GET", "/v1/jobs/{service}/{job_id}", ANY_TRAINER, JOBS, "GetJob",
        cpb.GetJobRequest, cpb.GetJobResponse, "One job", "jobs"),
    Rpc("POST", "/v1/jobs/{service}/{job_id}/cancel", ANY_TRAINER, JOBS, "CancelJob",
        cpb.CancelJobRequest, cpb.CancelJobResponse, "Cancel a job (idempotent)", "jobs"),
    *(
        Rpc("POST", f"/v1/methods/{m.name}/jobs", m.service, STUBS[m.service], m.rpc,
            m.request, m.response, f"Start a {m.name} job on the {m.service} service", "jobs")
        for m in registry.METHODS
    ),
    Rpc("POST", "/v1/pipelines", "orchestrator", ORCH, "CreatePipeline",
        opb.CreatePipelineRequest, opb.CreatePipelineResponse,
        "Create a pipeline from a full PipelineSpec", "pipelines"),
    Rpc("GET", "/v1/templates", "orchestrator", ORCH, "ListTemplates",
        opb.ListTemplatesRequest, opb.ListTemplatesResponse, "The templates", "templates"),
    Rpc("POST", "/v1/templates/{template}/pipelines", "orchestrator", ORCH,
        "CreatePipelineFromTemplate", opb.CreatePipelineFromTemplateRequest,
        opb.CreatePipelineFromTemplateResponse, "Create a pipeline from a template",
        "templates"),
    Rpc("POST", "/v1/runs", "orchestrator", ORCH, "RunPipeline",
        opb.RunPipelineRequest, opb.RunPipelineResponse, "Start a run of a pipeline", "runs"),
    Rpc("POST", "/v1/runs/start-training", "orchestrator", ORCH, "StartTraining",
        opb.StartTrainingRequest, opb.StartTrainingResponse,
        "A one-stage run of the given stage", "runs"),
    Rpc("GET", "/v1/runs", "orchestrator", ORCH, "ListRuns",
        opb.ListRunsRequest, opb.ListRunsResponse, "List runs, newest first", "runs"),
    Rpc("GET", "/v1/runs/{run_id}", "orchestrator", ORCH, "GetRun",
        opb.GetRunRequest, opb.GetRunResponse, "One run with its stages", "runs"),
    Rpc("POST", "/v1/runs/{run_id}/cancel", "orchestrator", ORCH, "CancelRun",
        opb.CancelRunRequest, opb.CancelRunResponse, "Cancel a run", "runs"),
    Rpc("POST", "/v1/score-completions", "training", GEN, "ScoreCompletions",
        gpb.ScoreCompletionsRequest, gpb.ScoreCompletionsResponse,
        "Log-probabilities of completions under a model", "generation"),
    Rpc("POST", "/v1/score", "rlhf", rlhf_pb2_grpc.RLHFServiceStub, "Score",
        rpb.ScoreRequest, rpb.ScoreResponse, "Score pairs with a reward model", "generation"),
    Rpc("POST", "/v1/models", "orchestrator", MODELS, "RegisterModel",
        mpb.RegisterModelRequest, mpb.RegisterModelResponse,
        "Register a checkpoint or a run's result as a model's next version", "models"),
    Rpc("GET", "/v1/models", "orchestrator", MODELS, "ListModels",
        mpb.ListModelsRequest, mpb.ListModelsResponse, "List registered models", "models"),
    Rpc("GET", "/v1/models/{name}", "orchestrator", MODELS, "GetModel",
        mpb.GetModelRequest, mpb.GetModelResponse, "A model's versions and aliases", "models"),
    Rpc("GET", "/v1/models/{name}/versions/{version}", "orchestrator", MODELS,
        "GetModelVersion", mpb.GetModelVersionRequest, mpb.GetModelVersionResponse,
        "One version by number", "models"),
    Rpc("DELETE", "/v1/models/{name}/versions/{version}", "orchestrator", MODELS,
        "DeleteModelVersion", mpb.DeleteModelVersionRequest, mpb.DeleteModelVersionResponse,
        "Delete a version (409 while a live run uses it)", "models"),
    Rpc("GET", "/v1/models/{name}/aliases/{alias}", "orchestrator", MODELS,
        "GetModelVersion", mpb.GetModelVersionRequest, mpb.GetModelVersionResponse,
        "The version an alias points at", "models"),
    Rpc("POST", "/v1/models/{name}/aliases/{alias}", "orchestrator", MODELS, "SetAlias",
        mpb.SetAliasRequest, mpb.SetAliasResponse,
        'Point an alias at a version (body: {"version": N})', "models"),
    Rpc("DELETE", "/v1/models/{name}/aliases/{alias}", "orchestrator", MODELS, "DeleteAlias",
        mpb.DeleteAliasRequest, mpb.DeleteAliasResponse, "Remove an alias", "models"),
)  # fmt: skip

router = APIRouter()


def path_names(path: str) -> list[str]:
    return [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]


def service_of(rpc_service: str, path: dict[str, str]) -> str:
    if rpc_service != ANY_TRAINER:
        return rpc_service
    service = path.pop("service")
    if service not in TRAINER_SERVICES:
        raise BackendError.invalid("service", f"jobs live on {', '.join(TRAINER_SERVICES)}")
    return service


async def body_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BackendError.invalid("body", f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BackendError.invalid("body", "must be a JSON object")
    return data


async def request_message(request: Request, rpc: Rpc, path: dict[str, str]) -> Message:
    if rpc.verb in ("GET", "DELETE"):
        q = {k: request.query_params.getlist(k) for k in request.query_params}
        return from_query(q, rpc.request, **path)
    data = await body_json(request)
    for k, v in path.items():
        if k in data and data[k] != v:
            raise BackendError.invalid(k, f"the body says {data[k]!r}, the path {v!r}")
        data[k] = v
    return parse(data, rpc.request)


def _endpoint(rpc: Rpc) -> Callable[..., Any]:
    async def endpoint(
        request: Request,
        b: Backends = Depends(deps.backends),
        key: str | None = Depends(deps.api_key),
    ) -> JSONResponse:
        path = dict(request.path_params)
        service = service_of(rpc.service, path)
        msg = await request_message(request, rpc, path)
        resp = await b.call(service, rpc.stub, rpc.method, msg, key)
        return JSONResponse(to_json(resp))

    endpoint.__name__ = f"{rpc.method}_{rpc.path.strip('/').replace('/', '_')}"
    return endpoint


def openapi_extra(rpc: Rpc) -> dict[str, Any]:
    names = path_names(rpc.path)
    params = [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
        | ({"schema": {"type": "string", "enum": list(TRAINER_SERVICES)}} if n == "service" else {})
        for n in names
    ]
    extra: dict[str, Any] = {"parameters": params}
    if rpc.verb in ("GET", "DELETE"):
        for f in rpc.request.DESCRIPTOR.fields:
            if f.name not in names and f.message_type is None:
                schema = field_schema(f, SCHEMAS)
                params.append({"name": f.name, "in": "query", "schema": schema})
    else:
        body = {"schema": ref(rpc.request.DESCRIPTOR, SCHEMAS)}
        extra["requestBody"] = {"required": False, "content": {"application/json": body}}
    return extra


for _rpc in ROUTES:
    router.add_api_route(
        _rpc.path,
        _endpoint(_rpc),
        methods=[_rpc.verb],
        summary=_rpc.summary,
        tags=[_rpc.tag],
        openapi_extra=openapi_extra(_rpc),
        responses={
            200: {
                "content": {"application/json": {"schema": ref(_rpc.response.DESCRIPTOR, SCHEMAS)}}
            }
        },
    )
