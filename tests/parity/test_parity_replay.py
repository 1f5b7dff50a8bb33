"""Replays every committed reference curve with our trainer alone (no torch needed).

Each tests/parity/curves/<case>.json was written by bench/parity_<family>.py: the per-step
loss of the *reference* implementation (transformers + peft + torch.optim, TRL's loss code,
or a paper's formula in plain PyTorch) on the committed tiny model, the data under
tests/parity/data and the config stored in the file. Our trainer must reproduce that curve
within the file's relative tolerance at every step, so a change that makes a trainer drift
from its reference fails CI even though CI has no torch. Regenerate a curve only with its
stored ``command`` and say why in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import services  # noqa: F401  (OpenBLAS before mlx)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import parity_common as pc  # noqa: E402

CURVES = sorted((REPO / "tests" / "parity" / "curves").glob("*.json"))


def test_curves_exist_for_every_family() -> None:
    names = {p.stem for p in CURVES}
    for prefix in ("sft_",):
        assert any(n.startswith(prefix) for n in names), f"no {prefix}* reference curve"


@pytest.mark.parametrize("curve", CURVES, ids=[p.stem for p in CURVES])
def test_trainer_reproduces_reference_curve(curve: Path, tmp_path: Path) -> None:
    doc = json.loads(curve.read_text())
    assert pc.weights_sha(pc.model_dir()) == doc["model_sha256"], (
        "tests/parity/model changed since this curve was made; rerun: " + doc["command"]
    )
    config = pc.resolve_paths(doc["config"])
    ours = pc.run_ours(
        pc.load_trainer(doc["trainer"]),
        config,
        tmp_path / "out",
        accum=doc.get("accum", 1),
        record=False,
        loss_key=doc.get("loss_key", "train_loss"),
    )
    ref = doc["reference_losses"]
    assert len(ours.losses) == len(ref), (len(ours.losses), len(ref))
    cmp = pc.compare(ours.losses, ref)
    assert cmp["max_rel_dloss"] <= doc["rtol"], (
        f"{doc['name']} drifted from its reference ({doc['reference']}): max relative "
        f"|dloss| {cmp['max_rel_dloss']:.2e} at step {cmp['worst_step']} > {doc['rtol']:g}; "
        f"ours {ours.losses} vs reference {ref}"
    )
    # The curve must be informative: the loss moves well beyond the tolerance.
    assert abs(ref[0] - ref[-1]) > 20 * doc["rtol"] * abs(ref[0]), "a flat curve checks nothing"


def test_replay_catches_mlx_default_adam(tmp_path: Path) -> None:
    """The check is sharp enough to see the bug issue 10 was filed for: MLX's default
    (no bias correction) leaves the reference curve within a few steps."""
    doc = json.loads((REPO / "tests" / "parity" / "curves" / "sft_lora.json").read_text())
    config = pc.resolve_paths(doc["config"])
    config["optimizer"]["bias_correction"] = False
    ours = pc.run_ours(pc.load_trainer(doc["trainer"]), config, tmp_path / "o", record=False)
    assert pc.compare(ours.losses, doc["reference_losses"])["max_rel_dloss"] > 10 * doc["rtol"]
