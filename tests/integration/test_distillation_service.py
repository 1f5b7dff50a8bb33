"""The real distillation service on loopback: a student distilled from the tiny teacher."""

from __future__ import annotations

import grpc
import pytest

from mlx_unified.v1 import common_pb2, distillation_pb2, distillation_pb2_grpc
from tests.conftest import write_jsonl
from tests.integration.helpers import Stubs, violations
from tests.integration.test_training_service import CHAT_ROWS


def spec(teacher, data) -> distillation_pb2.DistillationSpec:
    return distillation_pb2.DistillationSpec(
        teachers=[distillation_pb2.Teacher(model=common_pb2.ModelRef(model=str(teacher)))],
        student_init=distillation_pb2.StudentInit(num_layers=1),
        dataset=common_pb2.DatasetRef(path=str(data)),
        method=common_pb2.FINETUNE_METHOD_FULL,
        optimizer=common_pb2.OptimizerConfig(
            learning_rate=2e-3, schedule=common_pb2.LR_SCHEDULE_CONSTANT
        ),
        loop=common_pb2.LoopConfig(
            batch_size=4,
            max_steps=30,
            steps_per_report=1,
            steps_per_eval=-1,
            steps_per_checkpoint=15,
            max_seq_length=128,
            seed=0,
        ),
        alpha=1.0,
        temperature=distillation_pb2.TemperatureConfig(initial=2.0),
    )


@pytest.fixture
def distill(serve):
    srv = serve("distillation")
    stubs = Stubs(srv.address)
    yield distillation_pb2_grpc.DistillationServiceStub(stubs.channel), stubs
    stubs.close()


def test_distillation_job_lowers_kd_loss(distill, tiny_model, tmp_path):
    stub, stubs = distill
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    req = distillation_pb2.StartDistillationRequest(spec=spec(tiny_model, data))
    job = stub.StartDistillation(req, timeout=120).job
    final, events = stubs.wait(job.job_id)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    kd = [
        e.progress.metrics["train_kd_loss"]
        for e in events
        if e.WhichOneof("payload") == "progress" and "train_kd_loss" in e.progress.metrics
    ]
    assert len(kd) >= 25
    assert sum(kd[-5:]) / 5 < 0.8 * sum(kd[:3]) / 3, kd
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    import mlx_lm

    model, _ = mlx_lm.load(final.result.path)
    assert len(model.layers) == 1  # the half-depth (here: 1 of 2 layers) student


def test_bad_distillation_specs_are_rejected(distill, tiny_model, tmp_path):
    stub, stubs = distill
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    no_teachers = spec(tiny_model, data)
    del no_teachers.teachers[:]
    bad_t = spec(tiny_model, data)
    bad_t.temperature.initial = -1
    zero_w = spec(tiny_model, data)
    zero_w.teachers[0].weight = -1
    bad_map = spec(tiny_model, data)
    bad_map.features.enabled = True
    bad_map.features.layer_map.add(student_layer=0, teacher_layer=7)
    cases = [
        (no_teachers, "spec.teachers"),
        (bad_t, "spec.temperature.initial"),
        (zero_w, "spec.teachers[0].weight"),
        (bad_map, "spec.features.layer_map[0].teacher_layer"),
    ]
    for s, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.StartDistillation(distillation_pb2.StartDistillationRequest(spec=s))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in violations(err.value), (field, violations(err.value))
    assert list(stubs.jobs.ListJobs(common_pb2.ListJobsRequest()).jobs) == []
