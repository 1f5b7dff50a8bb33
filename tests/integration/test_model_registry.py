"""The model registry against real services on loopback (tiny model): a pipeline with
register_as registers its result with lineage naming its stage and job; after tagging, a
second pipeline whose base model is ``name:production`` trains from that checkpoint, and
the version cannot be deleted while that run is live."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from clients import cli
from clients.client import ClientError, MLXUClient
from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from tests.integration.test_orchestrator import (  # noqa: F401 (fixtures)
    data,
    pipeline_spec,
    sft_stage,
    stack,
)

RS = opb.RunState


def _run(c: MLXUClient, spec: opb.PipelineSpec) -> opb.Run:
    pl = c.create_pipeline(spec)
    run = c.run_pipeline(pl.pipeline_id)
    list(c.watch_run(run.run_id))
    return c.get_run(run.run_id)


def test_register_as_then_train_from_the_alias(
    stack: MLXUClient,  # noqa: F811 (the fixture)
    tiny_model: Path,
    data: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    c = stack
    spec = pipeline_spec(tiny_model, data, sft_stage("tune", 4))
    spec.register_as = "reg-sft"
    run = _run(c, spec)
    assert run.state == RS.RUN_STATE_SUCCEEDED, run.error

    model = c.get_model("reg-sft")
    (v1,) = model.versions
    stage = run.stages[0]
    assert v1.version == 1 and v1.checkpoint.path == run.result.path
    assert v1.checkpoint.sha256 == run.result.sha256 and v1.checkpoint.metrics
    assert v1.base_model == str(tiny_model)
    lin = v1.lineage
    assert (lin.run_id, lin.pipeline_id, lin.stage, lin.job_id) == (
        run.run_id,
        run.pipeline_id,
        "tune",
        stage.job_id,
    )
    assert [(s.stage, s.job_id, s.service) for s in lin.stages] == [
        ("tune", stage.job_id, "training")
    ]
    assert lin.config["kind"] == "sft"

    # Tagged from the CLI, read back by the client and the CLI.
    addr = ["--address", c.address_of("orchestrator")]
    assert cli.main(["models", "tag", "reg-sft", "production", "1", *addr]) == 0
    assert c.get_model_version("reg-sft", alias="production").aliases == ["production"]
    assert [m.name for m in c.list_models()] == ["reg-sft"]
    capsys.readouterr()
    assert cli.main(["models", "show", "reg-sft:production", *addr]) == 0
    shown = capsys.readouterr().out
    assert "reg-sft@1  (production)" in shown and stage.job_id in shown
    assert cli.main(["models", "list", *addr]) == 0
    assert "production->1" in capsys.readouterr().out

    # Unknown versions and shadowing names are refused, naming the field.
    bad = pipeline_spec(tiny_model, data, sft_stage("again", 2))
    bad.base_model.model = "reg-sft@9"
    with pytest.raises(ClientError) as e:
        c.create_pipeline(bad)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.base_model.model" in {v.field for v in e.value.violations}
    bad = pipeline_spec(tiny_model, data, sft_stage("again", 2))
    bad.register_as = "tiny-llama"
    with pytest.raises(ClientError) as e:
        c.create_pipeline(bad)
    assert {v.field for v in e.value.violations} == {"spec.register_as"}

    # From the alias: the adapter on its base, as a stage hand-off would pass it.
    nxt = pipeline_spec(tiny_model, data, sft_stage("more", 3))
    nxt.base_model.CopyFrom(cpb.ModelRef(model="reg-sft:production"))
    pl = c.create_pipeline(nxt)
    assert pl.spec.base_model.adapter_path == v1.checkpoint.path
    live = c.run_pipeline(pl.pipeline_id)
    with pytest.raises(ClientError) as e:
        c.delete_model_version("reg-sft", 1)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert live.run_id in str(e.value)
    list(c.watch_run(live.run_id))
    live = c.get_run(live.run_id)
    assert live.state == RS.RUN_STATE_SUCCEEDED, live.error
    job = c.get_job(live.stages[0].job_id)
    assert job.resolved_config["model"]["adapter_path"] == v1.checkpoint.path

    # StartTraining resolves its stage's model too; an unknown version names the field.
    one = sft_stage("one", 2)
    one.sft.dataset.path = str(data)
    one.sft.model.model = "reg-sft@2"
    with pytest.raises(ClientError) as e:
        c.start_training(one)
    assert {v.field for v in e.value.violations} == {"stage.sft.model.model"}
    one.sft.model.model = "reg-sft@1"
    started = c.start_training(one)
    ref = c.get_pipeline(started.pipeline_id).spec.stages[0].sft.model
    assert (ref.model, ref.adapter_path) == (str(tiny_model), v1.checkpoint.path)
    list(c.watch_run(started.run_id))
    assert c.get_run(started.run_id).state == RS.RUN_STATE_SUCCEEDED

    c.delete_model_version("reg-sft", 1)  # the runs are over: allowed now
    assert not c.get_model("reg-sft").versions
