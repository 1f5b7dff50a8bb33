"""Our optimizers against independent NumPy transcriptions of their reference definitions
(torch.optim's documented algorithms, torch.nn.utils.clip_grad_norm_), at fp32 precision.
The committed parity curves (tests/parity) check the same against torch itself."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

import services  # noqa: F401
from services.runtime.adapters import LoraSettings
from services.runtime.optim import OptimizerSettings, build_optimizer


def torch_adamw(p, grads, lr, b1, b2, eps, wd, amsgrad=False):
    """torch.optim.AdamW, as its docs write the algorithm (maximize=False, no amsgrad)."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * wd)  # decoupled weight decay
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(p.copy())
    return out


def torch_adam(p, grads, lr, b1, b2, eps):
    return torch_adamw(p, grads, lr, b1, b2, eps, 0.0)


def _run(opt_settings: OptimizerSettings, p0: np.ndarray, grads: list[np.ndarray]):
    opt = build_optimizer(opt_settings, len(grads))
    params = {"w": mx.array(p0)}
    opt.init(params)
    out = []
    for g in grads:
        params = opt.apply_gradients({"w": mx.array(g)}, params)
        mx.eval(params)
        out.append(np.array(params["w"]))
    return out


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(16, 8)).astype(np.float32)
    # Small, varied gradients: where bias correction matters most.
    grads = [(rng.normal(size=(16, 8)) * 10 ** rng.uniform(-4, -1)).astype(np.float32)
             for _ in range(12)]  # fmt: skip
    return p0, grads


def test_default_adamw_is_torch_adamw(problem) -> None:
    p0, grads = problem
    s = OptimizerSettings.from_dict({"learning_rate": 1e-3, "schedule": "constant"})
    assert s.bias_correction and s.weight_decay == 0.01 and s.eps == 1e-8
    ours = _run(s, p0, grads)
    ref = torch_adamw(p0.astype(np.float64), grads, 1e-3, 0.9, 0.999, 1e-8, 0.01)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


def test_adam_and_custom_betas(problem) -> None:
    p0, grads = problem
    s = OptimizerSettings.from_dict(
        {
            "name": "adam",
            "learning_rate": 3e-3,
            "beta1": 0.8,
            "beta2": 0.95,
            "eps": 1e-6,
            "schedule": "constant",
        }  # fmt: skip
    )
    ours = _run(s, p0, grads)
    ref = torch_adam(p0.astype(np.float64), grads, 3e-3, 0.8, 0.95, 1e-6)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


def test_mlx_default_is_not_torch_and_the_switch_says_so() -> None:
    # bias_correction=False (MLX's and mlx-lm's default): the first update is
    # lr * (1 - b1) / sqrt(1 - b2) ~ 3.16 lr per weight instead of torch's lr.
    p0 = np.zeros((4, 4), np.float32)
    g = np.full((4, 4), 0.5, np.float32)
    s = {"learning_rate": 1e-3, "schedule": "constant", "weight_decay": 0.0}
    torch_like = _run(OptimizerSettings.from_dict(s), p0, [g])[0]
    mlx_like = _run(OptimizerSettings.from_dict({**s, "bias_correction": False}), p0, [g])[0]
    np.testing.assert_allclose(torch_like, -1e-3, rtol=1e-5)
    np.testing.assert_allclose(mlx_like / torch_like, 0.1 / math.sqrt(0.001), rtol=1e-4)


def test_clip_grad_norm_is_torch_global_norm() -> None:
    rng = np.random.default_rng(1)
    grads = {
        "a": rng.normal(size=(4, 5)).astype(np.float32),
        "b": rng.normal(size=7).astype(np.float32),
    }
    total = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    coef = min(1.0, 1.0 / (total + 1e-6))  # torch: max_norm / (total_norm + 1e-6), clamped to 1
    clipped, norm = optim.clip_grad_norm({k: mx.array(v) for k, v in grads.items()}, 1.0)
    assert float(norm) == pytest.approx(total, rel=1e-6)
    for k, g in grads.items():
        np.testing.assert_allclose(np.array(clipped[k]), g * coef, rtol=1e-6)


def test_lora_alpha_is_peft_scaling() -> None:
    assert LoraSettings.from_dict({"rank": 16, "alpha": 32}).scale == 2.0
    assert LoraSettings.from_dict({"rank": 8}).scale == 20.0  # mlx-lm's default
    layer = nn.Linear(8, 8)
    from mlx_lm.tuner.lora import LoRALinear

    lora = LoRALinear.from_base(
        layer, r=4, scale=LoraSettings.from_dict({"rank": 4, "alpha": 8}).scale
    )
    lora.lora_b = mx.ones_like(lora.lora_b)
    x = mx.ones((1, 8))
    delta = lora(x) - layer(x)
    expected = 2.0 * (x @ lora.lora_a) @ lora.lora_b  # peft: base + (alpha/r) * B(A(x))
    np.testing.assert_allclose(np.array(delta), np.array(expected), rtol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_adam_step_sizes_match_float64_bias_correction(name) -> None:
    """Each update, not just the parameters, as torch.optim's (bias corrections in float64).

    mlx computes ``1 - beta2 ** t`` in float32 (0.999 is 0.99900001): its first steps were
    6e-6 too large, invisible next to the rounding of O(1) parameters but enough to move a
    PPO run 1e-2 off torch's in 80 updates (bench/parity_rl.py). Small parameters (ulp
    ~4e-9) make a 6e-8 error in a 1e-2 step visible."""
    rng = np.random.default_rng(2)
    p0 = (rng.normal(size=(8, 8)) * 1e-3).astype(np.float32)
    grads = [rng.normal(size=(8, 8)).astype(np.float32) for _ in range(6)]
    s = OptimizerSettings.from_dict(
        {"name": name, "learning_rate": 1e-2, "weight_decay": 0.0, "schedule": "constant"}
    )
    ours = [p0, *_run(s, p0, grads)]
    p64 = p0.astype(np.float64)
    ref = [p64, *torch_adamw(p64, grads, 1e-2, 0.9, 0.999, 1e-8, 0.0)]
    for t in range(1, len(ours)):
        step_ours = ours[t].astype(np.float64) - ours[t - 1]
        np.testing.assert_allclose(step_ours, ref[t] - ref[t - 1], rtol=0, atol=1.5e-8)
