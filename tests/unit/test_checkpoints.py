"""Checkpoint directories: atomic writes, manifests, pruning, verification, publishing."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from services.runtime import checkpoints
from services.runtime.errors import FailedPrecondition


def _writer(value: float, *, with_state: bool = True):
    def write(d: Path) -> None:
        mx.save_safetensors(str(d / "adapters.safetensors"), {"w": mx.full((4,), value)})
        (d / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora"}))
        if with_state:
            (d / checkpoints.TRAINER_STATE).mkdir()
            (d / checkpoints.TRAINER_STATE / "state.json").write_text("{}")

    return write


MANIFEST = {"job_id": "job-1", "kind": "adapter", "base_model": "base", "config": {"a": 1}}


def test_save_writes_manifest_with_hashes(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    info = checkpoints.save(root, 7, _writer(1.0), {**MANIFEST, "metrics": {"loss": 2.5}}, 3)
    assert info.path == root / "step_0000007"
    assert info.kind == "adapter" and info.step == 7 and info.base_model == "base"
    assert info.metrics == {"loss": 2.5}
    manifest = json.loads((info.path / "manifest.json").read_text())
    assert manifest["job_id"] == "job-1" and manifest["step"] == 7
    assert manifest["config"] == {"a": 1} and manifest["trainer_state"] is True
    assert set(manifest["files"]) == {"adapters.safetensors"}
    assert len(manifest["sha256"]) == 64 and manifest["sha256"] == info.sha256
    assert checkpoints.verify(info.path).sha256 == info.sha256
    assert [p.name for p in root.iterdir()] == ["step_0000007"]  # no temp dir left


def test_failed_write_leaves_no_step_dir(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"

    def broken(d: Path) -> None:
        _writer(1.0)(d)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoints.save(root, 3, broken, MANIFEST, 3)
    assert list(root.iterdir()) == []
    assert checkpoints.latest(root) is None


def test_writer_without_weights_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no weight files"):
        checkpoints.save(tmp_path, 1, lambda d: None, MANIFEST, 3)
    assert list(tmp_path.iterdir()) == []


def test_keep_last_and_latest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        checkpoints.save(root, step, _writer(float(step)), MANIFEST, 2)
    assert [p.name for p in checkpoints.list_checkpoints(root)] == ["step_0000030", "step_0000040"]
    # A dir without a manifest is an interrupted save: never the latest.
    (root / "step_0000050").mkdir()
    assert checkpoints.latest(root) == root / "step_0000040"
    assert checkpoints.latest(tmp_path) == root / "step_0000040"  # the output dir works too
    checkpoints.save(root, 60, _writer(6.0), MANIFEST, -1)
    assert len(checkpoints.list_checkpoints(root)) == 3  # -1 keeps all


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    checkpoints.save(tmp_path, 5, _writer(1.0), MANIFEST, 3)
    info = checkpoints.save(tmp_path, 5, _writer(2.0), MANIFEST, 3)
    w = mx.load(str(info.path / "adapters.safetensors"))["w"]
    assert w.tolist() == [2.0] * 4
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000005"]


def test_verify_detects_tampering(tmp_path: Path) -> None:
    info = checkpoints.save(tmp_path, 1, _writer(1.0), MANIFEST, 3)
    mx.save_safetensors(str(info.path / "adapters.safetensors"), {"w": mx.zeros((4,))})
    with pytest.raises(FailedPrecondition, match="does not match its sha256"):
        checkpoints.verify(info.path)
    (info.path / "manifest.json").unlink()
    with pytest.raises(FailedPrecondition, match="not a complete checkpoint"):
        checkpoints.verify(info.path)


def test_publish_final_links_files_without_trainer_state(tmp_path: Path) -> None:
    info = checkpoints.save(
        tmp_path / "checkpoints", 9, _writer(3.0), {**MANIFEST, "metrics": {"a": 1.0}}, 3
    )
    final = checkpoints.publish(info.path, tmp_path, {"val_loss": 1.5})
    assert final.path == tmp_path / "final" and final.step == 9
    assert final.metrics == {"a": 1.0, "val_loss": 1.5}
    assert final.sha256 == info.sha256  # same weight files
    assert not (final.path / checkpoints.TRAINER_STATE).exists()
    assert (final.path / "adapters.safetensors").stat().st_ino == (
        info.path / "adapters.safetensors"
    ).stat().st_ino
    manifest = checkpoints.read_manifest(final.path)
    assert manifest["source_checkpoint"] == str(info.path) and manifest["job_id"] == "job-1"
    assert checkpoints.verify(final.path).sha256 == info.sha256
