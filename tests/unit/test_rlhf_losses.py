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


def test_dpo_sigmoid_label_smoothing_is_conservative_dpo():
    out, _, _ = _dpo("sigmoid", eps=0.1)
    want = [-(0.9 * _ls(0.1 * h) + 0.1 * _ls(-0.1 * h)) for h in H]
    assert _f(out) == pytest.approx(want, rel=1e-5)


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
