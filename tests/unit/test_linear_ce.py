"""The head-fused cross entropy (services.runtime.linear_ce) takes the same step as the
logits path: same loss and gradients, over several blocks, for a tied and an untied head;
heads it cannot fuse fall back to the logits."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from services.runtime import linear_ce
from services.runtime.model_build import build_tiny_model
from services.runtime.models import load_model
from services.training.trainers.sft import cross_entropy


def _loss_and_grads(model: nn.Module, fused: bool, x, t, m) -> tuple[float, dict]:  # noqa: ANN001
    def loss(mdl: nn.Module) -> mx.array:
        ce = linear_ce.token_nll(mdl, x, t, cross_entropy)
        return (ce * m).sum() / m.sum()

    old = linear_ce.ENABLED
    linear_ce.ENABLED = fused
    try:
        value, grads = nn.value_and_grad(model, loss)(model)
        mx.eval(value, grads)
    finally:
        linear_ce.ENABLED = old
    return value.item(), dict(tree_flatten(grads))


def _assert_same_grads(g0: dict, g1: dict, atol: float, rtol: float) -> None:
    for k in g0:
        assert mx.allclose(g0[k], g1[k], atol=atol, rtol=rtol).item(), k


@pytest.mark.parametrize("tied", [True, False])
def test_fused_head_matches_the_logits_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tied: bool
) -> None:
    path = build_tiny_model(tmp_path / "m", vocab_size=600, tie_word_embeddings=tied)
    model, _ = load_model(str(path), None, "float32", field="m")
    assert linear_ce.head_weight(model) is not None
    monkeypatch.setattr(linear_ce, "BLOCK_ELEMENTS", 600 * 7)  # 7 tokens a block: 9 blocks
    mx.random.seed(0)
    x = mx.random.randint(0, 600, (3, 20))
    t = mx.random.randint(0, 600, (3, 20))
    m = (mx.random.uniform(shape=(3, 20)) > 0.3).astype(mx.float32)
    l0, g0 = _loss_and_grads(model, False, x, t, m)
    l1, g1 = _loss_and_grads(model, True, x, t, m)
    assert l1 == pytest.approx(l0, rel=1e-6)
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert mx.abs(g0[head]).max().item() > 0
    _assert_same_grads(g0, g1, atol=1e-6, rtol=1e-5)


def test_bf16_fused_head_is_close_and_quantized_heads_fall_back(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "m", vocab_size=600)
    model, _ = load_model(str(path), None, "float32", field="m")
    x = mx.random.randint(0, 600, (2, 16))
    exact = linear_ce.token_nll(model, x, x, cross_entropy)
    model.set_dtype(mx.bfloat16)
    fused = linear_ce.token_nll(model, x, x, cross_entropy)
    assert fused.dtype == mx.float32
    assert mx.allclose(fused, exact, rtol=2e-2, atol=5e-2).item()
    nn.quantize(model, group_size=32, bits=4)
    assert linear_ce.head_weight(model) is None  # quantized embedding: the logits path
    assert linear_ce.token_nll(model, x, x, cross_entropy).shape == (2, 16)


def test_the_head_at_the_counted_targets_only_takes_the_same_step(tmp_path: Path) -> None:
    """SFT's loss and DPO's sequence log-probs with ``target_index`` (chat rows whose prompts
    are masked) equal the dense ones, gradients included; dense batches carry no index."""
    from services.rlhf.trainers.dpo import sequence_logps
    from services.runtime.data_batches import with_target_index
    from services.training.trainers import sft

    path = build_tiny_model(tmp_path / "m", vocab_size=600)
    model, _ = load_model(str(path), None, "float32", field="m")
    mx.random.seed(1)
    x = mx.random.randint(0, 600, (4, 32))
    t = mx.random.randint(0, 600, (4, 32))
    m = mx.zeros((4, 32))
    for r, (a, b) in enumerate([(10, 20), (3, 31), (25, 32), (0, 0)]):  # row 3: empty
        m[r, a:b] = 1.0
    dense = {"inputs": x, "targets": t, "loss_mask": m}
    sparse = with_target_index(dict(dense))
    assert sparse["target_index"].shape == (64,)  # 45 of 128 positions count: bucket 64
    assert with_target_index({**dense, "loss_mask": mx.ones((4, 32))}).keys() == dense.keys()

    def grads(fn, batch):  # noqa: ANN001, ANN202
        value, g = nn.value_and_grad(model, lambda mdl: fn(mdl, batch))(model)
        mx.eval(value, g)
        return value, dict(tree_flatten(g))

    l0, g0 = grads(lambda mdl, b: sft.loss_fn(mdl, b)[0], dense)
    l1, g1 = grads(lambda mdl, b: sft.loss_fn(mdl, b)[0], sparse)
    assert l1.item() == pytest.approx(l0.item(), rel=1e-6)
    _assert_same_grads(g0, g1, atol=1e-6, rtol=1e-5)
    s0, n0 = sequence_logps(model, dense)
    s1, n1 = sequence_logps(model, sparse)
    assert mx.allclose(s0, s1, atol=1e-4, rtol=1e-6).item() and mx.array_equal(n0, n1).item()
    assert s1[3].item() == 0.0
    _, dg0 = grads(lambda mdl, b: sequence_logps(mdl, b)[0].sum(), dense)
    _, dg1 = grads(lambda mdl, b: sequence_logps(mdl, b)[0].sum(), sparse)
    _assert_same_grads(dg0, dg1, atol=1e-5, rtol=1e-5)


def test_grpo_completion_logits_run_the_head_at_completion_positions_only(tmp_path: Path) -> None:
    from services.rlhf.trainers.rollout import completion_logits, model_completion_logits

    path = build_tiny_model(tmp_path / "m", vocab_size=600)
    model, _ = load_model(str(path), None, "float32", field="m")
    x = mx.random.randint(0, 600, (3, 24))
    batch = {"inputs": x, "positions": mx.array([[9, 10, 11, 12], [4, 5, 6, 7], [19, 20, 21, 22]])}
    for temp in (0.0, 0.7):
        want = completion_logits(model(x), batch, temp)
        got = model_completion_logits(model, batch, temp)
        assert got.shape == want.shape == (3, 4, 600)
        assert mx.allclose(got, want, atol=1e-5, rtol=1e-5).item()
