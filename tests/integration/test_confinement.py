"""Issue 16: confinement by the real path of every file actually opened. Symlinks inside an
allowed root that lead outside it are refused wherever they sit (a dataset's member file, a
model's or an adapter's files, a hostfile, an output dir); the answer never tells what sits
outside. Hard links are names inside the root and are accepted (docs/operations.md)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from mlx_unified.v1 import (
    common_pb2,
    distillation_pb2,
    distillation_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    rlhf_pb2,
    rlhf_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from services.runtime import datasets, errors, models, paths
from tests.conftest import write_jsonl
from tests.integration.helpers import violations
from tests.integration.test_training_service import CHAT_ROWS, sft_spec

PREFS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(8)]


@pytest.fixture
def outside():
    """A directory outside every allowed root (not under pytest's temp dir or the repo)."""
    d = Path(tempfile.mkdtemp(prefix="mlxu-outside-")).resolve()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def services(serve):
    return {name: serve(name) for name in ("training", "rlhf", "distillation")}


def refused(call, request, field: str) -> str:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as err:
        out = call(request, timeout=60)
        if not hasattr(out, "SerializeToString"):
            list(out)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    found = violations(err.value)
    assert field in found, (field, found)
    return found[field]


def linked_model(tiny: Path, outside: Path, inside: Path) -> Path:
    """``inside`` holds only symlinks, to a copy of the tiny model outside the roots."""
    real = outside / "model"
    shutil.copytree(tiny, real)
    inside.mkdir(parents=True)
    for f in real.iterdir():
        (inside / f.name).symlink_to(f)
    return inside


def test_dataset_dir_member_symlinked_outside_is_refused_without_leaking(
    services, tiny_model, tmp_path, outside, home
):
    ch = grpc.insecure_channel(services["training"].address)
    stub = training_pb2_grpc.TrainingServiceStub(ch)
    ds = tmp_path / "ds"
    ds.mkdir()
    member = ds / "train.jsonl"
    write_jsonl(outside / "secret.jsonl", CHAT_ROWS)
    (outside / "a-dir").mkdir()
    os.mkfifo(outside / "a-fifo")
    answers = set()
    for target in ("secret.jsonl", "a-dir", "a-fifo", "missing.jsonl"):
        member.unlink(missing_ok=True)
        member.symlink_to(outside / target)
        req = training_pb2.StartSFTRequest(spec=sft_spec(tiny_model, ds))
        answers.add(refused(stub.StartSFT, req, "spec.dataset.path"))
    # One answer whatever sits outside: file, directory, FIFO or nothing at all.
    assert len(answers) == 1, answers
    (answer,) = answers
    assert "outside the allowed roots" in answer and "secret" not in answer
    # valid.jsonl is a member too.
    member.unlink()
    write_jsonl(member, CHAT_ROWS)
    (ds / "valid.jsonl").symlink_to(outside / "secret.jsonl")
    refused(
        stub.StartSFT,
        training_pb2.StartSFTRequest(spec=sft_spec(tiny_model, ds)),
        "spec.dataset.path",
    )
    assert not any((home / "checkpoints").iterdir())
    ch.close()


def test_model_dirs_of_symlinks_outside_are_refused_everywhere(
    services, tiny_model, tmp_path, outside
):
    model = linked_model(tiny_model, outside, tmp_path / "model")
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", PREFS)
    train = grpc.insecure_channel(services["training"].address)
    rlhf = grpc.insecure_channel(services["rlhf"].address)
    kd = grpc.insecure_channel(services["distillation"].address)
    t = training_pb2_grpc.TrainingServiceStub(train)
    gen = generation_pb2_grpc.GenerationServiceStub(train)
    ref = common_pb2.ModelRef(model=str(model))
    good = common_pb2.ModelRef(model=str(tiny_model))

    refused(
        t.StartSFT, training_pb2.StartSFTRequest(spec=sft_spec(model, chat)), "spec.model.model"
    )
    prompt = generation_pb2.GenerateRequest(model=ref, prompt="hi")
    refused(gen.Generate, prompt, "model.model")
    score = generation_pb2.ScoreCompletionsRequest(
        model=ref, items=[generation_pb2.PromptCompletion(prompt="a", completion="b")]
    )
    refused(gen.ScoreCompletions, score, "model.model")
    export = training_pb2.ExportSpec(
        model=ref, mode=training_pb2.EXPORT_MODE_QUANTIZE,
        quantization=common_pb2.QuantizationConfig(bits=4, group_size=32),
    )  # fmt: skip
    refused(t.StartExport, training_pb2.StartExportRequest(spec=export), "spec.model.model")
    teacher = distillation_pb2.DistillationSpec(
        teachers=[distillation_pb2.Teacher(model=ref)],
        student=good,
        dataset=common_pb2.DatasetRef(path=str(chat)),
    )
    stub = distillation_pb2_grpc.DistillationServiceStub(kd)
    req = distillation_pb2.StartDistillationRequest(spec=teacher)
    refused(stub.StartDistillation, req, "spec.teachers[0].model.model")
    dpo = rlhf_pb2.DPOSpec(
        policy=good, reference=ref, dataset=common_pb2.DatasetRef(path=str(prefs))
    )
    r = rlhf_pb2_grpc.RLHFServiceStub(rlhf)
    refused(r.StartDPO, rlhf_pb2.StartDPORequest(spec=dpo), "spec.reference.model")
    refused(
        r.Score,
        rlhf_pb2.ScoreRequest(
            reward_model=ref, items=[generation_pb2.PromptCompletion(prompt="a")]
        ),
        "reward_model.model",
    )
    # An adapter dir whose weights are a symlink outside.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (outside / "adapters.safetensors").write_bytes(b"\0" * 8)
    (adapter / "adapters.safetensors").symlink_to(outside / "adapters.safetensors")
    with_adapter = sft_spec(tiny_model, chat)
    with_adapter.model.adapter_path = str(adapter)
    req = training_pb2.StartSFTRequest(spec=with_adapter)
    refused(t.StartSFT, req, "spec.model.adapter_path")
    for c in (train, rlhf, kd):
        c.close()


def test_output_dir_symlinked_outside_is_refused_before_writing(
    services, tiny_model, tmp_path, outside, home
):
    stub = training_pb2_grpc.TrainingServiceStub(
        grpc.insecure_channel(services["training"].address)
    )
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    ckpts = home / "checkpoints"
    (ckpts / "evil").symlink_to(outside)
    planted = ckpts / "planted"
    planted.mkdir()
    (planted / "final").symlink_to(outside)
    for name in ("evil", "planted"):
        spec = sft_spec(tiny_model, chat, output_name=name)
        refused(stub.StartSFT, training_pb2.StartSFTRequest(spec=spec), "spec.output_name")
    assert list(outside.iterdir()) == []


def test_hostfile_is_confined_and_read_at_start(services, tiny_model, tmp_path, outside, home):
    stub = training_pb2_grpc.TrainingServiceStub(
        grpc.insecure_channel(services["training"].address)
    )
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    (outside / "hosts.json").write_text('[{"ssh": "h1"}, {"ssh": "h2"}]')
    link = tmp_path / "hosts-link.json"
    link.symlink_to(outside / "hosts.json")
    junk = tmp_path / "junk.json"
    junk.write_text("not json")
    for hostfile, text in (
        ("/etc/shadow", "outside"),
        (str(link), "outside"),
        (str(junk), "not valid JSON"),
        (str(tmp_path), "not a regular file"),
    ):
        spec = sft_spec(tiny_model, chat)
        spec.resources.num_processes = 2
        spec.resources.hostfile = hostfile
        got = refused(
            stub.StartSFT, training_pb2.StartSFTRequest(spec=spec), "spec.resources.hostfile"
        )
        assert text in got, (hostfile, got)
    assert not any((home / "checkpoints").iterdir())


# ---- the confinement functions themselves (what the services and workers call) -------------


def test_open_checks_the_descriptor_not_the_name(tmp_path, outside, monkeypatch):
    root = (tmp_path / "root").resolve()
    root.mkdir()
    (outside / "secret.jsonl").write_text('{"text": "secret"}\n')
    link = root / "data.jsonl"
    link.symlink_to(outside / "secret.jsonl")
    with pytest.raises(errors.InvalidArgument, match="outside the allowed roots"):
        paths.open_confined(link, (root,), "f")
    # TOCTOU: the name looks inside when checked (a swap right after the check), the file
    # actually opened is outside: the descriptor's real path refuses it.
    real_realpath = os.path.realpath
    monkeypatch.setattr(
        paths.os.path,
        "realpath",
        lambda p: str(root / "x") if str(p) == str(link) else real_realpath(p),
    )
    with pytest.raises(errors.InvalidArgument, match="outside the allowed roots"):
        paths.open_confined(link, (root,), "f")
    monkeypatch.undo()
    # A FIFO inside a root neither hangs nor is read.
    os.mkfifo(root / "pipe.jsonl")
    with pytest.raises(errors.InvalidArgument, match="not a regular file"):
        paths.open_confined(root / "pipe.jsonl", (root,), "f")
    # A symlink loop is an answer too.
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises(errors.InvalidArgument, match="cannot"):
        paths.confine(str(root / "loop" / "x"), (root,), "f")


def test_hard_links_are_names_inside_the_root(tmp_path, outside):
    """Documented limit: a hard link inside a root to an outside file is inside by path."""
    root = (tmp_path / "root").resolve()
    root.mkdir()
    src = write_jsonl(outside / "rows.jsonl", [{"text": "linked"}])
    try:
        os.link(src, root / "rows.jsonl")
    except OSError:
        pytest.skip("the outside dir is on another filesystem: no hard link possible")
    assert datasets.load_rows(root / "rows.jsonl", "f", (root,)) == [{"text": "linked"}]


def test_workers_confine_with_the_roots_they_were_started_with(
    tmp_path, outside, monkeypatch, tiny_model
):
    root = (tmp_path / "root").resolve()
    root.mkdir()
    write_jsonl(outside / "train.jsonl", CHAT_ROWS)
    ds = root / "ds"
    ds.mkdir()
    (ds / "train.jsonl").symlink_to(outside / "train.jsonl")
    model = linked_model(tiny_model, outside, root / "model")
    monkeypatch.setenv("MLXU_ALLOWED_ROOTS", str(root))
    monkeypatch.delenv("MLXU_HOME", raising=False)
    assert paths.process_roots() == (root,)
    with pytest.raises(errors.InvalidArgument, match="outside"):
        datasets.load_dir(ds, "spec.dataset.path")
    with pytest.raises(errors.InvalidArgument, match="outside"):
        models.load_model(str(model))
    monkeypatch.delenv("MLXU_ALLOWED_ROOTS")
    assert paths.process_roots() is None  # nothing configured: no confinement to apply
