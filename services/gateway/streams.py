"""Streaming routes: job and run progress as Server-Sent Events (resumable by seq), and
Generate, as SSE chunks or one JSON answer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from clients.client import TERMINAL_JOB_STATES, TERMINAL_RUN_STATES
from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import generation_pb2 as gpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from services.gateway import deps, events
from services.gateway.backends import Backends
from services.gateway.convert import parse, to_json
from services.gateway.errors import BackendError
from services.gateway.resources import GEN, JOBS, ORCH, SCHEMAS, body_json, service_of
from services.gateway.schemas import ref

router = APIRouter(prefix="/v1")
_SSE = {200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}}


def _lag(request: Request, stream: str) -> Callable[[Any], None] | None:
    """Records each delivered event's lag (``mlxu_event_lag_seconds``)."""
    http = getattr(request.app.state, "http_metrics", None)
    if http is None:
        return None
    opened = time.time()

    def delivered(resp: Any) -> None:
        if resp.event.HasField("time"):
            http.delivered(stream, resp.event.time.ToNanoseconds() / 1e9, opened)

    return delivered


def _job_frame(resp: cpb.WatchJobResponse) -> tuple[str, int, dict[str, Any]]:
    kind = resp.event.WhichOneof("payload") or "event"
    return kind, resp.event.seq, {"event": to_json(resp.event), "job": to_json(resp.job)}


def _run_frame(resp: opb.WatchRunResponse) -> tuple[str, int, dict[str, Any]]:
    kind = resp.event.WhichOneof("payload") or "event"
    return kind, resp.event.seq, to_json(resp.event)


@router.get(
    "/jobs/{service}/{job_id}/events",
    tags=["jobs"],
    summary="A job's events as SSE (id = seq; resume with Last-Event-ID)",
    responses=_SSE,
    response_class=StreamingResponse,
)
async def job_events(
    request: Request,
    service: str,
    job_id: str,
    after_seq: int | None = Query(None, description="resume after this seq (Last-Event-ID wins)"),
    b: Backends = Depends(deps.backends),
    key: str | None = Depends(deps.api_key),
) -> StreamingResponse:
    svc = service_of("{service}", {"service": service})
    seq = events.after_seq(request, after_seq)
    # Refusals (no such job, bad key, service down) are HTTP errors, before any event.
    get = cpb.GetJobRequest(job_id=job_id)
    await b.call(svc, JOBS, "GetJob", get, key)

    async def finished() -> bool:
        try:
            job = (await b.call(svc, JOBS, "GetJob", get, key)).job
        except BackendError:
            return False
        return job.state in TERMINAL_JOB_STATES

    req = cpb.WatchJobRequest(job_id=job_id, after_seq=seq, view=cpb.JOB_VIEW_BASIC)
    source = b.stream(svc, JOBS, "WatchJob", req, key)
    lag = _lag(request, "job")
    return events.response(events.sse(source, _job_frame, finished, lag))


@router.get(
    "/runs/{run_id}/events",
    tags=["runs"],
    summary="A run's events as SSE (id = seq; resume with Last-Event-ID)",
    responses=_SSE,
    response_class=StreamingResponse,
)
async def run_events(
    request: Request,
    run_id: str,
    after_seq: int | None = Query(None, description="resume after this seq (Last-Event-ID wins)"),
    b: Backends = Depends(deps.backends),
    key: str | None = Depends(deps.api_key),
) -> StreamingResponse:
    seq = events.after_seq(request, after_seq)
    get = opb.GetRunRequest(run_id=run_id)
    await b.call("orchestrator", ORCH, "GetRun", get, key)

    async def finished() -> bool:
        try:
            run = (await b.call("orchestrator", ORCH, "GetRun", get, key)).run
        except BackendError:
            return False
        return run.state in TERMINAL_RUN_STATES

    req = opb.WatchRunRequest(run_id=run_id, after_seq=seq)
    source = b.stream("orchestrator", ORCH, "WatchRun", req, key)
    lag = _lag(request, "run")
    return events.response(events.sse(source, _run_frame, finished, lag))


def _joined(chunks: list[gpb.GenerateResponse]) -> dict[str, Any]:
    last = chunks[-1] if chunks else gpb.GenerateResponse()
    return {
        "text": "".join(c.text for c in chunks),
        "token_ids": [t for c in chunks for t in c.token_ids],
        "logprobs": [p for c in chunks for p in c.logprobs],
        "finish_reason": gpb.FinishReason.Name(last.finish_reason),
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "tokens_per_second": last.tokens_per_second,
    }


@router.post(
    "/generate",
    tags=["generation"],
    summary="Sample from a model: one JSON answer, or SSE chunks with ?stream=true",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": ref(gpb.GenerateRequest.DESCRIPTOR, SCHEMAS)}
            },
        }
    },
)
async def generate(
    request: Request,
    stream: bool = Query(False, description="SSE, one 'chunk' event per token"),
    service: str = Query("training", description="the service that serves the model"),
    b: Backends = Depends(deps.backends),
    key: str | None = Depends(deps.api_key),
) -> Any:
    svc = service_of("{service}", {"service": service})
    req = parse(await body_json(request), gpb.GenerateRequest)
    source = b.stream(svc, GEN, "Generate", req, key)
    if not stream:
        return JSONResponse(_joined([c async for c in source]))
    # The first chunk is awaited here, so a refusal (no such model, a limit) is an HTTP
    # error rather than an event in a 200 stream.
    first = await anext(source, None)

    async def chunks() -> AsyncIterator[gpb.GenerateResponse]:
        if first is not None:
            yield first
            async for c in source:
                yield c

    counter = iter(range(1, 1 << 62))
    return events.response(events.sse(chunks(), lambda c: ("chunk", next(counter), to_json(c))))
