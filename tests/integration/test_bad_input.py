"""Bad input gets a clear status naming the field, creates no job and writes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from mlx_unified.v1 import common_pb2, training_pb2
from tests.conftest import write_jsonl
from tests.integration.helpers import Stubs, violations
from tests.integration.test_training_service import CHAT_ROWS, sft_spec


@pytest.fixture
def training(serve):
    srv = serve("training", api_keys=frozenset({"k1", "k2"}))
    stubs = Stubs(srv.address, api_key="k2")
    yield srv, stubs
    stubs.close()


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def bad_cases(tiny: Path, tmp: Path) -> list[tuple[str, training_pb2.SFTSpec, str, str]]:
    good = write_jsonl(tmp / "good.jsonl", CHAT_ROWS)
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    broken = tmp / "broken.jsonl"
    broken.write_text(json.dumps(CHAT_ROWS[0]) + "\n" + json.dumps(CHAT_ROWS[1]) + "\n{oops\n")
    missing_field = write_jsonl(
        tmp / "missing.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}]
    )
    prefs = write_jsonl(tmp / "prefs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    no_model_dir = tmp / "not-a-model"
    no_model_dir.mkdir()

    def spec(**kw):
        return sft_spec(tiny, kw.pop("data", good), **kw)

    neg_lr = spec()
    neg_lr.optimizer.learning_rate = -1
    absurd = spec()
    absurd.loop.batch_size = 100000
    qbits = spec(method=common_pb2.FINETUNE_METHOD_QLORA)
    qbits.quantization.bits = 7
    unknown = spec()
    unknown.model.model = "no-such-model"
    outside = spec()
    outside.model.model = str(no_model_dir)
    name = spec()
    name.output_name = "../escape"
    return [
        ("unknown model", unknown, "spec.model.model", "no-such-model"),
        ("model dir without config", outside, "spec.model.model", "config.json"),
        ("dataset missing", spec(data=tmp / "nope.jsonl"), "spec.dataset.path", "does not exist"),
        ("dataset empty", spec(data=empty), "spec.dataset.path", "empty"),
        ("malformed line", spec(data=broken), "spec.dataset.path", "line 3"),
        ("missing field", spec(data=missing_field), "spec.dataset.path", "row 2"),
        ("wrong format", spec(data=prefs), "spec.dataset.path", "preference"),
        ("etc passwd", spec(data=Path("/etc/passwd")), "spec.dataset.path", "outside"),
        ("negative lr", neg_lr, "spec.optimizer.learning_rate", ""),
        ("absurd batch", absurd, "spec.loop.batch_size", ""),
        ("qlora bits", qbits, "spec.quantization.bits", ""),
        ("output traversal", name, "spec.output_name", ""),
    ]


def test_bad_input_is_rejected_without_side_effects(training, tiny_model, tmp_path, home):
    _, stubs = training
    cases = bad_cases(tiny_model, tmp_path)
    before = snapshot(home / "checkpoints")
    for label, spec, field, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            stubs.start_sft(spec)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
        fields = violations(err.value)
        assert field in fields, (label, fields, err.value.details())
        assert text.lower() in fields[field].lower(), (label, fields[field])
        assert "Traceback" not in err.value.details()
    listed = stubs.jobs.ListJobs(common_pb2.ListJobsRequest(), metadata=stubs.md)
    assert list(listed.jobs) == []
    assert snapshot(home / "checkpoints") == before


def test_unknown_job_is_not_found(training):
    _, stubs = training
    for call, req in [
        (stubs.jobs.GetJob, common_pb2.GetJobRequest(job_id="nope")),
        (stubs.jobs.CancelJob, common_pb2.CancelJobRequest(job_id="nope")),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            call(req, metadata=stubs.md)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        list(stubs.jobs.WatchJob(common_pb2.WatchJobRequest(job_id="nope"), metadata=stubs.md))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_auth_requires_a_valid_key_but_not_for_health_or_reflection(training):
    srv, _ = training
    address = srv.address
    for key in (None, "wrong"):
        stubs = Stubs(address, api_key=key)
        with pytest.raises(grpc.RpcError) as err:
            stubs.jobs.ListJobs(common_pb2.ListJobsRequest(), metadata=stubs.md)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stubs.close()
    with grpc.insecure_channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        r = health.Check(health_pb2.HealthCheckRequest(service="mlx_unified.v1.TrainingService"))
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(ch)
        names = set(db.get_services())
        assert {
            "mlx_unified.v1.TrainingService",
            "mlx_unified.v1.JobService",
            "mlx_unified.v1.GenerationService",
            "grpc.health.v1.Health",
        } <= names
        pool = descriptor_pool.DescriptorPool(db)
        svc = pool.FindServiceByName("mlx_unified.v1.TrainingService")
        assert {m.name for m in svc.methods} == {"StartSFT", "StartExport"}
        jobs = pool.FindServiceByName("mlx_unified.v1.JobService")
        assert "WatchJob" in {m.name for m in jobs.methods}


def test_no_key_binds_loopback_only(serve):
    srv = serve("training", host="0.0.0.0")
    assert srv.running.settings.host == "127.0.0.1"
    assert os.environ.get("MLXU_API_KEYS") is None
