"""RLHF objectives vs hand-computed values and numpy references."""

import math

import mlx.core as mx
import numpy as np
import pytest

import services  # noqa: F401  (loads the BLAS before mlx.core)
from services.rlhf.trainers import losses
from services.rlhf.trainers.kl import AdaptiveKLController, FixedKLController, make_kl_controller


def _ls(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _f(a) -> list[float]:
    return np.array(a).tolist()


# -- DPO ---------------------------------------------------------------------------------------

# policy chosen/rejected, reference chosen/rejected: h = (pc - pr) - (rc - rr) = 3, -2
PC, PR, RC, RR = [-1.0, -4.0], [-3.0, -2.0], [-3.0, -3.0], [-2.0, -3.0]
H = [3.0, -2.0]


def _dpo(loss_type: str, beta: float = 0.1, eps: float = 0.0):
    arrs = [mx.array(v) for v in (PC, PR, RC, RR)]
    return losses.dpo_loss(*arrs, beta=beta, loss_type=loss_type, label_smoothing=eps)


def test_dpo_sigmoid_matches_hand_computed():
    out, rc, rr = _dpo("sigmoid")
    assert _f(out) == pytest.approx([-_ls(0.3), -_ls(-0.2)], rel=1e-5)
    assert _f(out) == pytest.approx([0.554355, 0.798139], rel=1e-5)
    # implicit rewards beta * (pi - ref)
    assert _f(rc) == pytest.approx([0.2, -0.1], abs=1e-6)
    assert _f(rr) == pytest.approx([-0.1, 0.1], abs=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_label_smoothing_is_for_the_robust_loss_only(loss_type):
    # TRL 1.16's sigmoid loss is -logsigmoid(beta h) whatever label_smoothing says (it was
    # "conservative DPO" here, 60% off TRL's loss at label_smoothing 0.1): refuse, not
    # silently train another objective.
    with pytest.raises(ValueError, match="robust"):
        _dpo(loss_type, eps=0.1)


def _np_logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def _trl_dpo_numpy(loss_type, pc, pr, rc, rr, beta, eps, nc=None, nr=None):
    """TRL 1.16 DPOTrainer._compute_loss, per pair, written out in numpy (float64)."""
    pc, pr, rc, rr = (np.asarray(v, np.float64) for v in (pc, pr, rc, rr))
    cs, rs = pc - rc, pr - rr
    d = cs - rs
    if loss_type == "sigmoid":
        return -_np_logsigmoid(beta * d)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * d)
    if loss_type == "ipo":  # scores averaged over each completion's tokens
        return (cs / nc - rs / nr - 1 / (2 * beta)) ** 2
    clean = -(1 - eps) * _np_logsigmoid(beta * d)
    flipped = -eps * _np_logsigmoid(-beta * d)
    return (clean - flipped) / (1 - 2 * eps)


@pytest.mark.parametrize(
    "loss_type,beta,eps",
    [("sigmoid", 0.1, 0.0), ("sigmoid", 2.0, 0.0), ("hinge", 0.1, 0.0), ("hinge", 0.7, 0.0),
     ("robust", 0.1, 0.1), ("robust", 0.5, 0.3)],
)  # fmt: skip
def test_dpo_losses_match_trl_formula(loss_type, beta, eps):
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (-rng.uniform(5, 60, 16) for _ in range(4))
    want = _trl_dpo_numpy(loss_type, pc, pr, rc, rr, beta, eps)
    got, _, _ = losses.dpo_loss(
        *(mx.array(v, mx.float32) for v in (pc, pr, rc, rr)),
        beta=beta, loss_type=loss_type, label_smoothing=eps,
    )  # fmt: skip
    np.testing.assert_allclose(np.array(got), want, rtol=2e-5, atol=2e-5)


def test_dpo_and_reward_defaults_are_trl_configs():
    """TRL 1.16: DPOConfig beta 0.1, loss sigmoid, label_smoothing 0, lr 1e-6 (adapters: x10,
    as TRL's LoRA example); RewardConfig lr 1e-4; no centering. Smoothing is robust-only."""
    from services.rlhf.trainers.dpo import DPOConfig
    from services.rlhf.trainers.reward_model import RewardModelConfig
    from services.runtime.errors import InvalidArgument

    pol = {"policy": {"model": "m"}}
    d = DPOConfig.from_dict({**pol, "method": "full"})
    assert (d.beta, d.loss, d.label_smoothing) == (0.1, "sigmoid", 0.0)
    assert d.optimizer.learning_rate == 1e-6
    assert DPOConfig.from_dict(pol).optimizer.learning_rate == 1e-5
    for method in ("full", "lora"):
        r = RewardModelConfig.from_dict({"model": {"model": "m"}, "method": method})
        assert r.optimizer.learning_rate == 1e-4 and r.center_rewards_coef == 0.0
    assert DPOConfig.from_dict({**pol, "loss": "robust", "label_smoothing": 0.1})
    with pytest.raises(InvalidArgument, match="robust loss only"):
        DPOConfig.from_dict({**pol, "loss": "sigmoid", "label_smoothing": 0.1})


def test_dpo_trainer_ipo_averages_over_completion_tokens():
    """The trainer's loss on a fake model equals TRL's IPO: each answer's log-ratio divided
    by its own completion-token count, then (d - 1/(2 tau))^2, mean over pairs."""
    from services.rlhf.trainers.dpo import make_loss

    rng = np.random.default_rng(2)
    V, L, b = 11, 7, 3
    logits = rng.normal(size=(2 * b, L, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(2 * b, L)).astype(np.int32)
    counts = np.array([2, 5, 7, 3, 6, 1])
    mask = (np.arange(L)[None, :] >= L - counts[:, None]).astype(np.float32)
    ref = -rng.uniform(1, 20, 2 * b).astype(np.float32)

    def fake_model(_inputs):
        return mx.array(logits)

    batch = {"inputs": mx.zeros((2 * b, L), mx.int32), "targets": mx.array(targets),
             "loss_mask": mx.array(mask), "lengths": mx.full((2 * b,), L, mx.int32),
             "ref_logps": mx.array(ref)}  # fmt: skip
    loss, n, _ = make_loss("ipo", 0.1, 0.0)(fake_model, batch)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    seq = (np.take_along_axis(lp, targets[..., None], -1)[..., 0] * mask).sum(1)
    want = _trl_dpo_numpy(
        "ipo", seq[:b], seq[b:], ref[:b], ref[b:], 0.1, 0.0, counts[:b], counts[b:]
    ).mean()
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert n.item() == b


def test_dpo_ipo_matches_hand_computed():
    out, _, _ = _dpo("ipo", beta=0.5)
    # (h - 1/(2*0.5))^2 = (3-1)^2, (-2-1)^2
    assert _f(out) == pytest.approx([4.0, 9.0], rel=1e-6)


def test_dpo_hinge_matches_hand_computed():
    out, _, _ = _dpo("hinge", beta=0.5)
    # max(0, 1 - 0.5*h): 1 - 1.5 < 0 -> 0 ; 1 + 1 = 2
    assert _f(out) == pytest.approx([0.0, 2.0], abs=1e-6)


def test_dpo_robust_matches_hand_computed():
    out, _, _ = _dpo("robust", beta=0.1, eps=0.2)
    want = [(-(0.8) * _ls(0.1 * h) + 0.2 * _ls(-0.1 * h)) / 0.6 for h in H]
    assert _f(out) == pytest.approx(want, rel=1e-5)
    # with no label noise robust == sigmoid
    a, _, _ = _dpo("robust", eps=0.0)
    b, _, _ = _dpo("sigmoid", eps=0.0)
    assert _f(a) == pytest.approx(_f(b), rel=1e-6)


def test_dpo_unknown_loss_raises():
    with pytest.raises(ValueError, match="unknown DPO loss"):
        _dpo("kto")


def test_dpo_gradient_raises_chosen_lowers_rejected():
    def f(pc, pr):
        out, _, _ = losses.dpo_loss(pc, pr, mx.array([-2.0]), mx.array([-2.0]), beta=0.1)
        return out.sum()

    gc, gr = mx.grad(f, argnums=(0, 1))(mx.array([-2.0]), mx.array([-2.0]))
    # at h = 0: d/dpc = -beta * sigmoid(0) = -0.05
    assert gc.item() == pytest.approx(-0.05, rel=1e-5)
    assert gr.item() == pytest.approx(0.05, rel=1e-5)


# -- reward model ------------------------------------------------------------------------------


def test_bradley_terry_with_margin_and_centering():
    rc, rr = mx.array([2.0, 0.5]), mx.array([1.0, 1.0])
    loss, m = losses.bradley_terry_loss(rc, rr)
    assert loss.item() == pytest.approx(-(_ls(1.0) + _ls(-0.5)) / 2, rel=1e-6)
    loss, m = losses.bradley_terry_loss(rc, rr, margin=mx.array([0.5, 1.0]))
    assert loss.item() == pytest.approx(-(_ls(0.5) + _ls(-1.5)) / 2, rel=1e-6)
    loss_c, _ = losses.bradley_terry_loss(rc, rr, margin=mx.array([0.5, 1.0]), center_coef=0.01)
    # centering: 0.01 * mean((3)^2, (1.5)^2)
    assert loss_c.item() - loss.item() == pytest.approx(0.01 * (9 + 2.25) / 2, rel=1e-5)
    assert m["accuracy"].item() == 0.5
    assert m["margin"].item() == pytest.approx(0.25)
    assert m["reward_chosen"].item() == pytest.approx(1.25)
    assert m["reward_rejected"].item() == pytest.approx(1.0)


def test_bradley_terry_matches_trl_reward_trainer_formula():
    """TRL 1.16 RewardTrainer.compute_loss: -logsigmoid(r_c - r_r - margin).mean()
    + coef * mean((r_c + r_r)^2); masked-out pairs (padding rows) do not count."""
    rng = np.random.default_rng(3)
    rc, rr, margin = rng.normal(0, 2, 12), rng.normal(0, 2, 12), rng.uniform(0, 2, 12)
    mask = np.ones(12)
    mask[-3:] = 0.0  # padding pairs of a last validation batch
    k = mask > 0
    for m, coef in ((None, 0.0), (margin, 0.0), (margin, 0.05), (None, 0.01)):
        d = rc - rr - (0.0 if m is None else m)
        want = -_np_logsigmoid(d[k]).mean() + coef * ((rc[k] + rr[k]) ** 2).mean()
        got, _ = losses.bradley_terry_loss(
            mx.array(rc, mx.float32), mx.array(rr, mx.float32),
            None if m is None else mx.array(m, mx.float32), coef, mask=mx.array(mask),
        )  # fmt: skip
        assert got.item() == pytest.approx(want, rel=1e-5)


def test_reward_head_trains_its_weight_not_its_bias():
    """As TRL's bias-free score layer: the bias (gradient only rounding noise or centering)
    is not a trainable parameter, and stays 0 after Adam steps on a centered loss."""
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from services.rlhf.trainers import heads
    from services.rlhf.trainers.reward_model import attach_reward_head

    args = llama.ModelArgs(
        model_type="llama", hidden_size=16, num_hidden_layers=1, intermediate_size=32,
        num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5, vocab_size=32,
    )  # fmt: skip
    lm = llama.Model(args)
    lm.freeze()
    attach_reward_head(lm, seed=0)
    assert sorted(k for k, _ in tree_flatten(lm.trainable_parameters())) == ["value_head.weight"]

    inputs, lengths = mx.array([[1, 2, 3, 4], [5, 6, 7, 0]]), mx.array([4, 3])

    def loss(model):
        r = heads.rewards(model, inputs, lengths)
        return losses.bradley_terry_loss(r[:1], r[1:], center_coef=0.5)[0]

    opt = optim.Adam(1e-2, bias_correction=True)
    w0 = np.array(lm.value_head.weight)
    for _ in range(3):
        _, g = nn.value_and_grad(lm, loss)(lm)
        opt.update(lm, g)
    assert np.array(lm.value_head.bias).tolist() == [0.0]
    assert np.abs(np.array(lm.value_head.weight) - w0).max() > 1e-3


# -- PPO pieces --------------------------------------------------------------------------------


def _gae_numpy(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = np.zeros((B, T))
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            nv = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * nv - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    ret = (adv + values) * mask
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_numpy_reference(gamma, lam):
    rng = np.random.default_rng(0)
    B, T = 4, 9
    rewards = rng.normal(size=(B, T))
    values = rng.normal(size=(B, T))
    lengths = [9, 5, 1, 7]
    mask = np.array([[1.0] * n + [0.0] * (T - n) for n in lengths])
    want_adv, want_ret = _gae_numpy(rewards, values, mask, gamma, lam)
    adv, ret = losses.gae(
        mx.array(rewards, dtype=mx.float32),
        mx.array(values, dtype=mx.float32),
        mx.array(mask, dtype=mx.float32),
        gamma,
        lam,
    )
    np.testing.assert_allclose(np.array(adv), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(ret), want_ret, rtol=1e-5, atol=1e-5)


def test_gae_single_token_is_td_error():
    adv, ret = losses.gae(mx.array([[2.0]]), mx.array([[0.5]]), mx.array([[1.0]]), 1.0, 0.95)
    assert adv.item() == pytest.approx(1.5)
    assert ret.item() == pytest.approx(2.0)


def test_whiten_masked():
    x = mx.array([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, 0.0]])
    m = mx.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    w = np.array(losses.whiten(x, m))
    vals = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    want = (vals - vals.mean()) / vals.std(ddof=1)
    np.testing.assert_allclose(w[np.array(m) > 0], want, rtol=1e-5)
    assert w[0, 3] == 0.0 and w[1, 2] == 0.0


def test_kl_penalised_rewards_put_score_on_last_token():
    logp = mx.array([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = mx.array([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = mx.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r, kl = losses.kl_penalised_rewards(mx.array([10.0, 20.0]), logp, ref, mask, kl_coef=0.2)
    np.testing.assert_allclose(np.array(kl), [[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(np.array(r), [[-0.1, 0.0, 10.2], [-0.2, 20.0, 0.0]], atol=1e-6)


def test_ppo_policy_loss_clipping():
    old = mx.zeros((1, 3))
    # ratios e^0.5 = 1.65 (clipped, A > 0), e^-0.5 = 0.61 (clipped, A < 0), 1.0
    logp = mx.array([[0.5, -0.5, 0.0]])
    adv = mx.array([[1.0, -1.0, 2.0]])
    mask = mx.ones((1, 3))
    loss, st = losses.ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # max(-A r, -A clip(r)): [-1.2, 0.8, -2.0] -> mean
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.0) / 3, rel=1e-5)
    assert st["clipfrac"].item() == pytest.approx(2 / 3)
    assert st["approx_kl"].item() == pytest.approx(0.5 * (0.25 + 0.25) / 3, rel=1e-5)
    # gradient only through the unclipped token
    g = mx.grad(lambda lp: losses.ppo_policy_loss(lp, old, adv, mask, 0.2)[0])(logp)
    np.testing.assert_allclose(np.array(g), [[0.0, 0.0, -2.0 / 3]], atol=1e-6)


def test_ppo_value_loss_clipping():
    v = mx.array([[1.0, 0.0]])
    old = mx.array([[0.0, 0.0]])
    ret = mx.array([[2.0, 1.0]])
    loss, st = losses.ppo_value_loss(v, old, ret, mx.ones((1, 2)), clip=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24 ; token 1: 1 and 1
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2, rel=1e-6)
    assert st["vf_clipfrac"].item() == pytest.approx(0.5)


def test_entropy_of_uniform_and_token_logps():
    logits = mx.zeros((1, 2, 8))
    np.testing.assert_allclose(np.array(losses.entropy(logits)), [[math.log(8)] * 2], rtol=1e-6)
    logits = mx.array([[[0.0, math.log(3.0)]]])
    lp = losses.token_logps(logits, mx.array([[1]]))
    assert lp.item() == pytest.approx(math.log(0.75), rel=1e-6)


# -- GRPO --------------------------------------------------------------------------------------


def test_group_advantages():
    r = mx.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    a = np.array(losses.group_advantages(r, group_size=3))
    np.testing.assert_allclose(a[:3], [-1.0 / 1.0001, 0.0, 1.0 / 1.0001], rtol=1e-5)
    np.testing.assert_allclose(a[3:], [0.0, 0.0, 0.0], atol=1e-6)


def test_k3_and_grpo_loss():
    lp = mx.array([[-1.0, -2.0]])
    ref = mx.array([[-1.0, -1.0]])
    k3 = np.array(losses.k3_kl(lp, ref))
    np.testing.assert_allclose(k3, [[0.0, math.e - 2.0]], rtol=1e-6)
    loss, st = losses.grpo_loss(
        lp, lp, ref, mx.array([2.0]), mx.array([[1.0, 1.0]]), clip=0.2, beta=0.1
    )
    # ratio 1: surrogate = A = 2 per token; loss = mean(-(2 - 0.1*k3))
    assert loss.item() == pytest.approx(-(2.0 + 2.0 - 0.1 * (math.e - 2.0)) / 2, rel=1e-6)
    assert st["clipfrac"].item() == 0.0


def _trl_grpo_numpy(logps, old, ref, adv, mask, clip, beta, loss_type, norm=None, max_len=0):
    """TRL 1.16 GRPOTrainer._compute_loss (token-level IS, use_bias_correction_kl=True, one
    micro-batch, no accumulation), written out in numpy float64."""
    logps, old, ref, mask = (np.asarray(x, np.float64) for x in (logps, old, ref, mask))
    a = np.asarray(adv, np.float64)[:, None]
    coef_1 = np.exp(logps - old)
    coef_2 = np.clip(coef_1, 1 - clip, 1 + clip)
    per_token = -np.minimum(coef_1 * a, coef_2 * a)
    if beta:
        kl = (np.exp(ref - logps) - (ref - logps) - 1) * coef_1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / max(mask.sum(), 1)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * max_len)
    return (per_token * mask).sum() / max(norm, 1)  # dapo


@pytest.mark.parametrize("loss_type", losses.GRPO_LOSSES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_trl_formulas(loss_type, beta):
    rng = np.random.default_rng(3)
    B, T = 5, 6
    lengths = [6, 3, 1, 0, 4]  # an empty completion (cut before a stop string) included
    mask = np.array([[1.0] * n + [0.0] * (T - n) for n in lengths])
    old = rng.normal(-2, 0.5, size=(B, T))
    logps = old + rng.normal(0, 0.3, size=(B, T))  # ratios well off 1: both clip sides
    ref = old + rng.normal(0, 0.3, size=(B, T))
    adv = rng.normal(size=B)
    norm = 7.0  # e.g. 14 tokens in the rollout batch over 2 minibatches
    want = _trl_grpo_numpy(logps, old, ref, adv, mask, 0.2, beta, loss_type, norm, T)
    args = [mx.array(x, dtype=mx.float32) for x in (logps, old, ref, adv, mask)]
    loss, st = losses.grpo_loss(
        *args, clip=0.2, beta=beta, loss_type=loss_type, normalizer=mx.array(norm),
        max_completion_length=T,
    )  # fmt: skip
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert ("kl" in st) == bool(beta)
    assert 0 < st["clipfrac"].item() < 1


def test_grpo_dapo_minibatches_add_up_to_the_token_mean():
    """TRL's dapo normaliser (rollout tokens / minibatches): the mean over a rollout batch's
    minibatch losses is its token-weighted mean, whatever the minibatches' lengths."""
    rng = np.random.default_rng(4)
    mask = np.array([[1.0] * n + [0.0] * (5 - n) for n in (5, 1, 2, 4)], np.float32)
    lp = mx.array(rng.normal(-2, 0.3, size=(4, 5)), dtype=mx.float32)
    adv = mx.array(rng.normal(size=4), dtype=mx.float32)
    norm = mx.array(float(mask.sum()) / 2)
    parts = [
        losses.grpo_loss(
            lp[i], lp[i], lp[i], adv[i], mx.array(mask)[i], clip=0.2, beta=0.0, normalizer=norm
        )[0].item()  # fmt: skip
        for i in (mx.array([0, 1]), mx.array([2, 3]))
    ]
    want = -(np.array(adv)[:, None] * mask).sum() / mask.sum()
    assert np.mean(parts) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("scale", losses.REWARD_SCALES)
def test_group_advantages_scalings_match_trl(scale):
    r = np.array([1.0, 2.0, 4.0, 0.0, 0.0, 3.0])
    g = r.reshape(-1, 3)
    centred = (g - g.mean(axis=1, keepdims=True)).reshape(-1)
    if scale == "group":
        want = centred / (np.repeat(g.std(axis=1, ddof=1), 3) + 1e-4)
    elif scale == "batch":
        want = centred / (r.std(ddof=1) + 1e-4)
    else:
        want = centred
    got = losses.group_advantages(mx.array(r, dtype=mx.float32), 3, scale=scale)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-6)


# -- KL controllers ----------------------------------------------------------------------------


def test_adaptive_kl_controller_update():
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 9 > target: error clip(0.5, +-0.2) = 0.2 ; 256 samples
    assert c.update(9.0, 256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    # KL 5.4: error -0.1
    v = c.value
    assert c.update(5.4, 100) == pytest.approx(v * (1 - 0.1 * 100 / 10000))
    # round-trips through its state
    d = make_kl_controller(0.2, True, 6.0, 10000)
    d.restore(c.state())
    assert d.value == c.value


def test_fixed_kl_controller_never_moves():
    c = FixedKLController(0.05)
    assert c.update(100.0, 1000) == 0.05
    assert c.state() == {"type": "fixed", "value": 0.05}
