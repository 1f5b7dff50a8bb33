"""The gateway's pieces without services: the original pipeline shape -> PipelineSpec,
gRPC statuses -> HTTP answers (never a traceback), JSON/query -> proto, SSE framing."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import pytest
from fastapi.testclient import TestClient
from google.protobuf import any_pb2, json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from services.gateway import events
from services.gateway.app import create_app
from services.gateway.convert import from_query
from services.gateway.errors import HTTP_STATUS, BackendError
from services.gateway.legacy_spec import PipelineCreate, build
from services.runtime.settings import Settings
from tests.conftest import REPO, write_jsonl

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
PREF = {"prompt": "p", "chosen": "a", "rejected": "b"}
UNPAIRED = {"prompt": "p", "completion": "a", "label": True}


@pytest.fixture
def data(tmp_path: Path) -> dict[str, str]:
    return {
        name: str(write_jsonl(tmp_path / f"{name}.jsonl", [row] * 3))
        for name, row in (("chat", CHAT), ("prefs", PREF), ("unpaired", UNPAIRED))
    }


def _build(tmp_path: Path, **kw: object):
    body = PipelineCreate(name="p", base_model="m", **kw)  # type: ignore[arg-type]
    return asyncio.run(build(body, (tmp_path.resolve(),)))


def _kinds(spec: opb.PipelineSpec) -> list[str]:
    return [opb.StageKind.Name(s.kind) for s in spec.stages]


def test_the_issue_stages_become_sft_distill_and_dpo(tmp_path: Path, data: dict) -> None:
    req = _build(
        tmp_path,
        stages=["sft", "distillation", "rlhf"],
        dataset_path=data["chat"],
        datasets={"rlhf": data["prefs"]},
    )
    # A distillation stage needs its half-depth student sized by the orchestrator.
    assert isinstance(req, opb.CreatePipelineFromTemplateRequest)
    over = json_format.MessageToDict(req.overrides)
    spec = json_format.ParseDict(over, opb.PipelineSpec())
    assert [s.name for s in spec.stages] == ["sft", "distillation", "rlhf"]
    assert _kinds(spec) == ["STAGE_KIND_SFT", "STAGE_KIND_DISTILL", "STAGE_KIND_DPO"]
    assert spec.stages[1].distill.HasField("student_init")
    assert spec.auto_configure and spec.datasets["rlhf"].path == data["prefs"]


def test_rlhf_follows_the_data_format(tmp_path: Path, data: dict) -> None:
    req = _build(tmp_path, stages=["rlhf"], dataset_path=data["unpaired"], auto_configure=False)
    assert isinstance(req, opb.CreatePipelineRequest)
    assert _kinds(req.spec) == ["STAGE_KIND_KTO"] and not req.spec.auto_configure
    req = _build(tmp_path, stages=["rlhf"], dataset_path=data["prefs"])
    assert _kinds(req.spec) == ["STAGE_KIND_DPO"]
    with pytest.raises(BackendError) as e:
        _build(tmp_path, stages=["rlhf"], dataset_path=data["chat"])
    assert e.value.http_status == 400 and e.value.violations[0].field == "stages[0]"


def test_every_problem_in_one_answer(tmp_path: Path, data: dict) -> None:
    with pytest.raises(BackendError) as e:
        _build(
            tmp_path,
            stages=["sft", "dpo", "nope"],
            dataset_path=data["prefs"],  # SFT cannot train preference rows
            datasets={"dpo": "/etc/passwd", "ghost": data["chat"]},
            config={"sft": {"loop": {"max_steps": 3}}},
        )
    fields = [v.field for v in e.value.violations]
    assert sorted(fields) == ["dataset_path", "datasets.dpo", "datasets.ghost", "stages[2]"]


def test_config_is_the_methods_spec(tmp_path: Path, data: dict) -> None:
    req = _build(
        tmp_path,
        stages=["sft"],
        dataset_path=data["chat"],
        config={"sft": {"loop": {"max_steps": 3}}},
    )
    assert req.spec.stages[0].sft.loop.max_steps == 3
    with pytest.raises(BackendError) as e:
        _build(tmp_path, stages=["sft"], dataset_path=data["chat"], config={"sft": {"loop": 1}})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


class _FakeRpcError(grpc.RpcError):
    def __init__(self, status: grpc.Status) -> None:
        self._s = status

    def code(self) -> grpc.StatusCode:
        return self._s.code

    def details(self) -> str:
        return self._s.details

    def trailing_metadata(self):  # noqa: ANN201
        return self._s.trailing_metadata


def test_violations_and_retry_info_come_through() -> None:
    st = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="bad")
    for detail in (
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field="a.b", description="d")
            ]
        ),
        error_details_pb2.RetryInfo(retry_delay={"seconds": 3}),
    ):
        packed = any_pb2.Any()
        packed.Pack(detail)
        st.details.append(packed)
    err = BackendError.from_rpc_error(_FakeRpcError(rpc_status.to_status(st)))
    assert err.http_status == 400 and err.retry_after_s == 3
    assert err.body() == {
        "error": {
            "code": "INVALID_ARGUMENT",
            "message": "bad",
            "violations": [{"field": "a.b", "description": "d"}],
        }
    }


class _Backends:
    """Stands in for the services: every call raises what the test put in ``raise_``."""

    raise_: BaseException = RuntimeError("boom")

    async def call(self, *_a: object) -> object:
        raise self.raise_

    async def health(self) -> dict[str, str]:
        return {"orchestrator": "UNREACHABLE"}

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.FAILED_PRECONDITION, 409),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_status_codes_map_to_http(code: grpc.StatusCode, status: int, tmp_path: Path) -> None:
    assert HTTP_STATUS.get(code, 500) == status
    b = _Backends()
    b.raise_ = BackendError(code, "why", retry_after_s=2.0)
    with TestClient(create_app(Settings(service="gateway", home=tmp_path), b)) as c:  # type: ignore[arg-type]
        r = c.get("/v1/runs/r1")
    assert r.status_code == status
    assert r.json()["error"] == {"code": code.name, "message": "why"}


def test_no_traceback_and_open_health(tmp_path: Path) -> None:
    s = Settings(service="gateway", home=tmp_path, api_keys=frozenset({"k"}))
    app = create_app(s, _Backends())  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/v1/runs/r1").status_code == 401  # before any call
        r = c.get("/v1/runs/r1", headers={"X-API-Key": "k"})  # the backend raises RuntimeError
        assert r.status_code == 500 and "Traceback" not in r.text and "boom" not in r.text
        assert "incident" in r.json()["error"]["message"]
        h = c.get("/healthz")
        assert h.status_code == 503 and h.json()["status"] == "degraded"


def test_query_strings_parse_into_the_request_message() -> None:
    req = from_query(
        {"states": ["JOB_STATE_RUNNING,JOB_STATE_PENDING"], "page_size": ["3"]}, cpb.ListJobsRequest
    )
    assert list(req.states) == [cpb.JOB_STATE_RUNNING, cpb.JOB_STATE_PENDING] and req.page_size == 3
    with pytest.raises(BackendError) as e:
        from_query({"nope": ["1"]}, cpb.ListJobsRequest)
    assert e.value.violations[0].field == "nope"
    with pytest.raises(BackendError) as e:
        from_query({"page_size": ["x"]}, cpb.ListJobsRequest)
    assert e.value.violations[0].field == "page_size"


def test_sse_frames_carry_the_seq() -> None:
    assert events.frame("progress", {"a": 1}, 7) == 'id: 7\nevent: progress\ndata: {"a":1}\n\n'

    class Req:
        def __init__(self, h: dict[str, str]) -> None:
            self.headers = h

    assert events.after_seq(Req({"last-event-id": "5"}), 2) == 5  # type: ignore[arg-type]
    assert events.after_seq(Req({}), 2) == 2  # type: ignore[arg-type]
    with pytest.raises(BackendError):
        events.after_seq(Req({"last-event-id": "x"}), None)  # type: ignore[arg-type]


def test_a_body_over_the_limit_is_refused_unread(tmp_path: Path) -> None:
    s = Settings(service="gateway", home=tmp_path)
    s = dataclasses.replace(s, limits=dataclasses.replace(s.limits, max_request_bytes=100))
    with TestClient(create_app(s, _Backends())) as c:  # type: ignore[arg-type]
        r = c.post("/v1/runs", content=b"{" + b" " * 200 + b"}")
    assert r.status_code == 413 and r.json()["error"]["code"] == "RESOURCE_EXHAUSTED"


def test_gateway_is_a_servable_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from clients.cli import build_parser

    args = build_parser().parse_args(["serve", "gateway", "--port", "9999"])
    assert (args.service, args.port) == ("gateway", 9999)
    monkeypatch.delenv("MLXU_GATEWAY_PORT", raising=False)
    assert Settings.from_env("gateway", home=tmp_path).port == 8700
    monkeypatch.setenv("MLXU_GATEWAY_PORT", "18700")
    assert Settings.from_env("gateway", home=tmp_path).port == 18700
    assert "gateway: uv run mlxu serve gateway" in (REPO / "Procfile").read_text()


class _Watched(_Backends):
    """One job: a stored event from 100 s ago, then one recorded after the watch opened
    and relayed 0.2 s later, then the job is over."""

    def __init__(self) -> None:
        self.job = cpb.Job(job_id="j1", state=cpb.JOB_STATE_SUCCEEDED)

    async def call(self, *_a: object) -> object:
        return cpb.GetJobResponse(job=self.job)

    async def stream(self, *_a: object):
        import time

        for seq, age in ((1, 100.0), (2, None)):
            created = time.time() - (age or 0.0)
            if age is None:  # live: recorded while the watcher waits, relayed 0.2 s later
                await asyncio.sleep(0.2)
            event = cpb.JobEvent(job_id="j1", seq=seq, log=cpb.LogMessage(text="x"))
            event.time.FromNanoseconds(int(created * 1e9))
            yield cpb.WatchJobResponse(event=event, job=self.job)


def test_event_lag_is_measured_at_delivery_live_and_replayed_apart(tmp_path: Path) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    app = create_app(Settings(service="gateway", home=tmp_path), _Watched())  # type: ignore[arg-type]
    with TestClient(app) as c:
        r = c.get("/v1/jobs/training/j1/events")
    assert r.status_code == 200 and r.text.count("event: log") == 2
    text = generate_latest(app.state.metrics_registry).decode()
    samples = {
        (s.name, s.labels.get("phase"), s.labels.get("le")): s.value
        for fam in text_string_to_metric_families(text)
        if fam.name == "mlxu_event_lag_seconds"
        for s in fam.samples
        if s.labels.get("stream") == "job"
    }
    assert samples[("mlxu_event_lag_seconds_count", "replay", None)] == 1
    assert samples[("mlxu_event_lag_seconds_count", "live", None)] == 1
    assert 100 <= samples[("mlxu_event_lag_seconds_sum", "replay", None)] < 110
    live = samples[("mlxu_event_lag_seconds_sum", "live", None)]
    assert 0.2 <= live < 5
    assert samples[("mlxu_event_lag_seconds_bucket", "live", "0.1")] == 0
    assert samples[("mlxu_event_lag_seconds_bucket", "live", "5.0")] == 1
