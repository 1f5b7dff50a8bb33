"""services.registry against the contracts: every method's RPC, messages, stage kind and
entry points exist and agree, and every Start RPC of a trainer service has a method."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mlx_unified.v1 import distillation_pb2, orchestrator_pb2, rlhf_pb2, training_pb2
from services import registry

FILES = {"training": training_pb2, "distillation": distillation_pb2, "rlhf": rlhf_pb2}


def _service(m: registry.Method):
    (svc,) = FILES[m.service].DESCRIPTOR.services_by_name.values()
    return svc


@pytest.mark.parametrize("m", registry.METHODS, ids=lambda m: m.name)
def test_method_matches_its_contract(m: registry.Method) -> None:
    rpc = _service(m).methods_by_name[m.rpc]
    assert rpc.input_type is m.request.DESCRIPTOR
    assert rpc.output_type is m.response.DESCRIPTOR
    assert m.request.DESCRIPTOR.fields_by_name["spec"].message_type is m.spec.DESCRIPTOR
    assert set(m.response.DESCRIPTOR.fields_by_name) >= {"job", "created"}
    # The pipeline stage: its kind and its oneof field, both named by the method.
    stage = orchestrator_pb2.Stage.DESCRIPTOR.fields_by_name[m.name]
    assert stage.containing_oneof.name == "spec" and stage.message_type is m.spec.DESCRIPTOR
    assert orchestrator_pb2.StageKind.Name(m.stage_kind) == "STAGE_KIND_" + m.name.upper()
    # Where a pipeline's inputs land are ModelRefs of the spec.
    assert m.spec.DESCRIPTOR.fields_by_name[m.model_field].message_type.name == "ModelRef"
    if m.has_reference:
        assert "reference" in m.spec.DESCRIPTOR.fields_by_name
    if m.has_dataset:
        assert "dataset" in m.spec.DESCRIPTOR.fields_by_name
    for dotted in (m.trainer, m.prepare, m.check, m.config):
        assert registry.load(dotted) is not None, dotted
    assert callable(registry.load(m.trainer))
    if m.lr:
        assert all(0 < x <= 1 for x in m.lr)


def test_every_start_rpc_and_stage_kind_has_a_method() -> None:
    starts = {
        (service, name)
        for service, mod in FILES.items()
        for svc in mod.DESCRIPTOR.services_by_name.values()
        for name in svc.methods_by_name
        if name.startswith("Start")
    }
    assert starts == {(m.service, m.rpc) for m in registry.METHODS}
    kinds = set(orchestrator_pb2.StageKind.values()) - {orchestrator_pb2.STAGE_KIND_UNSPECIFIED}
    assert kinds == {m.stage_kind for m in registry.METHODS}


def test_lookups_and_unknown_names() -> None:
    assert registry.by_spec(rlhf_pb2.DPOSpec()).name == "dpo"
    assert registry.get("sft").service == "training"
    assert set(registry.names("rlhf")) >= {"reward_model", "dpo", "ppo", "grpo"}
    with pytest.raises(KeyError, match="unknown training method 'nope'; one of sft"):
        registry.get("nope")


def test_layers_derive_their_tables_from_the_registry() -> None:
    from clients import cli, client, config
    from orchestrator import autoconfig, backend, pipeline
    from services.rlhf import server as rlhf_server
    from services.rlhf import validate
    from services.rlhf.trainers import TRAINERS

    names = set(registry.names())
    assert set(backend.STARTS) == set(client.SERVICE_OF_KIND) == set(config.KINDS) == names
    assert {i.name for i in pipeline.KINDS.values()} == names
    assert set(validate.KINDS) == set(TRAINERS) == set(registry.names("rlhf"))
    assert set(cli.TRAIN_KINDS.values()) == {m.name for m in registry.METHODS if m.cli}
    assert set(autoconfig.LR) == {m.name for m in registry.METHODS if m.auto_lr}
    for m in registry.of_service("rlhf"):
        assert callable(getattr(rlhf_server.RLHFServicer, m.rpc))
        assert callable(getattr(client.MLXUClient, f"start_{m.name}"))


def test_registry_imports_no_mlx_and_no_grpc() -> None:
    code = (
        "import sys, services.registry; "
        "bad = [m for m in ('mlx.core', 'grpc', 'mlx_lm') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_docs_methods_table_is_current() -> None:
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import methods_table

    doc = (Path(__file__).resolve().parents[2] / "docs" / "methods.md").read_text()
    assert methods_table.table() in doc, "rerun: uv run python scripts/methods_table.py"


def test_a_pipeline_takes_kto_and_orpo_stages_from_the_registry() -> None:
    from orchestrator import pipeline

    spec = orchestrator_pb2.PipelineSpec(name="p")
    spec.base_model.model = "base"
    spec.dataset.path = "/data/prefs.jsonl"
    spec.stages.add(kind=orchestrator_pb2.STAGE_KIND_SFT)
    spec.stages.add(kind=orchestrator_pb2.STAGE_KIND_KTO)
    spec.stages.add(kind=orchestrator_pb2.STAGE_KIND_ORPO)
    plan = pipeline.resolve(pipeline.normalize(spec), {"training", "rlhf"})
    kto, orpo = plan.stages[1], plan.stages[2]
    assert (kto.name, orpo.name) == ("kto", "orpo")
    assert {b.target: b.from_stage for b in kto.bindings} == {"policy": "sft", "reference": "sft"}
    assert {b.target: b.from_stage for b in orpo.bindings} == {"policy": "kto"}
    assert orpo.spec.get("policy", {}).get("model", "") == ""  # typed: the binding fills it
    assert orpo.shown_spec()["policy"]["model"] == pipeline.placeholder("kto")
