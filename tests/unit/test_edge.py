"""The gRPC edge's pure pieces: spec conversion, path confinement, keys, status mapping."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2

from mlx_unified.v1 import common_pb2, distillation_pb2, rlhf_pb2, training_pb2
from services.runtime import errors, specs
from services.runtime.paths import check_name, confine
from services.runtime.rpc.auth import key_matches
from services.runtime.rpc.status import to_status
from services.runtime.settings import Settings
from services.schema.training import SFTConfig


def test_to_dict_keeps_set_fields_and_short_enum_names():
    spec = training_pb2.SFTSpec(
        model=common_pb2.ModelRef(model="m"),
        method=common_pb2.FINETUNE_METHOD_QLORA,
        optimizer=common_pb2.OptimizerConfig(name=common_pb2.OPTIMIZER_NAME_LION),
        loop=common_pb2.LoopConfig(max_steps=7, mask_prompt=False),
        labels={"team": "a"},
        lora=common_pb2.LoraConfig(keys=["self_attn.q_proj"]),
    )
    assert specs.to_dict(spec) == {
        "model": {"model": "m"},
        "method": "qlora",
        "lora": {"keys": ["self_attn.q_proj"]},
        "optimizer": {"name": "lion"},
        "loop": {"max_steps": 7, "mask_prompt": False},
        "labels": {"team": "a"},
    }
    # Acronym enum types keep their value names intact (DPO_LOSS_IPO -> "ipo").
    assert specs.to_dict(rlhf_pb2.DPOSpec(loss=rlhf_pb2.DPO_LOSS_IPO)) == {"loss": "ipo"}
    d = specs.to_dict(
        distillation_pb2.DistillationSpec(
            divergence=distillation_pb2.DIVERGENCE_TOTAL_VARIATION,
            teachers=[distillation_pb2.Teacher(weight=2.0)],
        )
    )
    assert d == {"teachers": [{"weight": 2.0}], "divergence": "total_variation"}


def test_schema_bounds_absurd_values_but_accepts_sentinels():
    spec = training_pb2.SFTSpec(
        model=common_pb2.ModelRef(model="m"),
        dataset=common_pb2.DatasetRef(path="d"),
        loop=common_pb2.LoopConfig(
            batch_size=10**6, steps_per_checkpoint=-1, keep_last_checkpoints=-1, steps_per_eval=-1
        ),
        optimizer=common_pb2.OptimizerConfig(learning_rate=50.0),
    )
    with pytest.raises(errors.InvalidArgument) as e:
        SFTConfig.from_dict(specs.to_dict(spec), prefix="spec")
    # Both sections' problems at once, named by the request's own field paths.
    assert {x.field for x in e.value.violations} == {
        "spec.loop.batch_size",
        "spec.optimizer.learning_rate",
    }


def test_confine_resolves_symlinks_and_refuses_escapes(tmp_path: Path):
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "link").symlink_to("/etc")
    assert confine(str(root / "data"), (root,), "f") == root / "data"
    for bad in ("/etc/passwd", str(root / ".." / "x"), str(root / "link" / "passwd")):
        with pytest.raises(errors.InvalidArgument) as e:
            confine(bad, (root,), "spec.dataset.path")
        assert e.value.violations[0].field == "spec.dataset.path"
    with pytest.raises(errors.InvalidArgument):
        confine("", (root,), "f")
    assert check_name("run-1.v2", "n") == "run-1.v2"
    for bad in ("../x", "a/b", ".", "", "x" * 200):
        with pytest.raises(errors.InvalidArgument):
            check_name(bad, "spec.output_name")


def test_key_matching():
    assert key_matches("k2", ["k1", "k2"])
    assert not key_matches("k3", ["k1", "k2"])
    assert not key_matches("", ["k1"])
    assert not key_matches("k1", [])


def test_errors_map_to_codes_with_field_violations():
    status = to_status(errors.InvalidArgument([errors.Violation("spec.x", "must be > 0")]))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    md = dict(status.trailing_metadata)
    from google.rpc import status_pb2

    parsed = status_pb2.Status.FromString(md["grpc-status-details-bin"])
    assert parsed.code == code_pb2.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    parsed.details[0].Unpack(bad)
    assert [(f.field, f.description) for f in bad.field_violations] == [("spec.x", "must be > 0")]
    assert to_status(errors.NotFound("job x")).code == grpc.StatusCode.NOT_FOUND
    assert to_status(errors.FailedPrecondition("no")).code == grpc.StatusCode.FAILED_PRECONDITION
    internal = to_status(RuntimeError("secret stack detail"))
    assert internal.code == grpc.StatusCode.INTERNAL
    assert "secret" not in internal.details and "incident" in internal.details


def test_settings_from_env(monkeypatch, tmp_path: Path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nfile-key\n")
    monkeypatch.setenv("MLXU_API_KEYS", "a, b")
    monkeypatch.setenv("MLXU_API_KEYS_FILE", str(keys))
    monkeypatch.setenv("MLXU_ALLOWED_ROOTS", f"/{':'}{tmp_path}")
    monkeypatch.setenv("MLXU_TRAINING_PORT", "9999")
    s = Settings.from_env("training", home=str(tmp_path / "h"))
    assert s.api_keys == frozenset({"a", "b", "file-key"})
    assert s.port == 9999 and s.home == (tmp_path / "h").resolve()
    assert s.allowed_roots == (s.home, tmp_path.resolve())  # "/" is never a root
    assert s.db_path == s.home / "state" / "training.db"
