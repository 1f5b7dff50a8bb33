"""KTO and ORPO through the real RLHF service on loopback (they reach it only through
services.registry): the jobs train, the loss falls, bad specs are refused with the field."""

from __future__ import annotations

import grpc
import pytest

from mlx_unified.v1 import common_pb2, rlhf_pb2
from tests.conftest import write_jsonl
from tests.integration.helpers import violations
from tests.integration.test_rlhf_service import const_lr, loop, preferences, progress, rlhf  # noqa: F401


def unpaired(n: int = 64) -> list[dict]:
    rows = []
    for r in preferences(n // 2):
        rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return rows


def test_kto_trains_on_unpaired_rows(rlhf, tiny_model, tmp_path):  # noqa: F811
    stub, stubs = rlhf
    data = write_jsonl(tmp_path / "unpaired.jsonl", unpaired())
    spec = rlhf_pb2.KTOSpec(
        policy=common_pb2.ModelRef(model=str(tiny_model)),
        dataset=common_pb2.DatasetRef(path=str(data)),
        method=common_pb2.FINETUNE_METHOD_FULL,
        optimizer=const_lr(1e-3),
        loop=loop(12),
        beta=0.5,
    )
    job = stub.StartKTO(rlhf_pb2.StartKTORequest(spec=spec), timeout=120).job
    assert job.kind == "kto"
    final, events = stubs.wait(job.job_id)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    losses = progress(events, "train_loss")
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] - 0.01, losses  # KTO starts at 0.5 (r = z = 0)
    assert final.result.path


def test_orpo_trains_without_a_reference(rlhf, tiny_model, tmp_path):  # noqa: F811
    stub, stubs = rlhf
    data = write_jsonl(tmp_path / "prefs.jsonl", preferences())
    spec = rlhf_pb2.ORPOSpec(
        policy=common_pb2.ModelRef(model=str(tiny_model)),
        dataset=common_pb2.DatasetRef(path=str(data)),
        method=common_pb2.FINETUNE_METHOD_FULL,
        optimizer=const_lr(1e-3),
        loop=loop(12),
    )
    job = stub.StartORPO(rlhf_pb2.StartORPORequest(spec=spec), timeout=120).job
    final, events = stubs.wait(job.job_id)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    losses = progress(events, "train_loss")
    assert sum(losses[-3:]) / 3 < losses[0] * 0.9, losses
    assert "reference" not in final.resolved_config


@pytest.mark.parametrize(
    ("method", "spec", "field"),
    [
        ("StartKTO", rlhf_pb2.KTOSpec(beta=-1.0), "spec.beta"),
        ("StartKTO", rlhf_pb2.KTOSpec(desirable_weight=-2.0), "spec.desirable_weight"),
        ("StartORPO", rlhf_pb2.ORPOSpec(beta=-1.0), "spec.beta"),
    ],
)
def test_bad_specs_are_refused_with_the_field(rlhf, tiny_model, tmp_path, method, spec, field):  # noqa: F811
    stub, _ = rlhf
    rows = unpaired() if method == "StartKTO" else preferences()
    spec.policy.model = str(tiny_model)
    spec.dataset.path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    req = getattr(rlhf_pb2, method + "Request")(spec=spec)
    with pytest.raises(grpc.RpcError) as e:
        getattr(stub, method)(req, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(e.value), violations(e.value)


def test_orpo_refuses_unpaired_rows(rlhf, tiny_model, tmp_path):  # noqa: F811
    stub, _ = rlhf
    spec = rlhf_pb2.ORPOSpec(
        policy=common_pb2.ModelRef(model=str(tiny_model)),
        dataset=common_pb2.DatasetRef(path=str(write_jsonl(tmp_path / "u.jsonl", unpaired()))),
    )
    with pytest.raises(grpc.RpcError) as e:
        stub.StartORPO(rlhf_pb2.StartORPORequest(spec=spec), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.dataset.path" in violations(e.value)
