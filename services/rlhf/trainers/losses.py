"""The RLHF objectives as pure MLX functions (no models, no I/O).

Shapes: ``[B]`` per sequence, ``[B, T]`` per token with a float ``mask`` that is 1 where a
token counts. Every function is differentiable where training needs it and is checked
against hand-computed values / a numpy reference in tests/unit/test_rlhf_losses.py.

References: Bradley-Terry reward loss and centering (Ouyang et al. 2022; TRL RewardTrainer),
DPO (Rafailov et al. 2023), IPO (Azar et al. 2023), hinge / SLiC (Zhao et al. 2023),
robust DPO (Chowdhury et al. 2024), PPO-for-LMs (Ziegler et al. 2019; Schulman et al. 2017),
GAE (Schulman et al. 2016), GRPO (Shao et al. 2024).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from services.runtime import linear_ce
from services.schema.preference import DPO_LOSSES
from services.schema.rollouts import GRPO_LOSSES, REWARD_SCALES

# -- log-probabilities -------------------------------------------------------------------------


def token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    """log p(target) per position: ``[B, T, V], [B, T] -> [B, T]`` (fp32)."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return picked - mx.logsumexp(logits, axis=-1)


def model_token_logps(model: nn.Module, inputs: mx.array, targets: mx.array) -> mx.array:
    """``token_logps(model(inputs), targets)``, fused with the LM head where the model allows
    (services.runtime.linear_ce): the [B, T, V] logits are never held."""
    return -linear_ce.token_nll(model, inputs, targets, lambda lg, t: -token_logps(lg, t))


def entropy(logits: mx.array) -> mx.array:
    """Entropy of the categorical over the last axis: ``[..., V] -> [...]``."""
    logits = logits.astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -(mx.exp(logp) * logp).sum(axis=-1)


def aux(x: mx.array) -> mx.array:
    """A non-differentiated side output (weight, metric) of a loss function.

    The ``+ 0.0`` makes it a node of its own: with mlx 0.32, a compiled value_and_grad whose
    auxiliary output *is* a node of the loss graph (e.g. ``mask.sum()`` returned as the weight
    and also used in the loss) fails with ``IndexError: _Map_base::at``."""
    return mx.stop_gradient(x) + 0.0


def masked_sum(x: mx.array, mask: mx.array, axis: int | None = None) -> mx.array:
    return (x * mask).sum(axis=axis)


def masked_mean(x: mx.array, mask: mx.array, axis: int | None = None) -> mx.array:
    return (x * mask).sum(axis=axis) / mx.maximum(mask.sum(axis=axis), 1.0)


def masked_var(x: mx.array, mask: mx.array) -> mx.array:
    """Unbiased (Bessel-corrected) variance over the masked entries."""
    n = mask.sum()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / mx.maximum(n - 1.0, 1.0)


def whiten(x: mx.array, mask: mx.array, shift_mean: bool = True, eps: float = 1e-8) -> mx.array:
    """Normalise the masked entries to unit variance (and zero mean); masked-out stay 0."""
    mean = masked_mean(x, mask)
    out = (x - mean) * mx.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# -- reward model ------------------------------------------------------------------------------


def bradley_terry_loss(
    r_chosen: mx.array,
    r_rejected: mx.array,
    margin: mx.array | None = None,
    center_coef: float = 0.0,
    mask: mx.array | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """``-log sigmoid(r_c - r_r - margin)`` averaged, plus ``center_coef * mean((r_c + r_r)^2)``.

    The margin asks the chosen reward to beat the rejected one by at least that much
    (Llama-2 style); centering keeps rewards near zero so that they are comparable between
    reward models and do not drift (the loss is invariant to a shared offset otherwise).
    ``mask`` [B] leaves out pairs (e.g. the empty rows that pad a last validation batch).
    """
    mask = mx.ones_like(r_chosen) if mask is None else mask.astype(r_chosen.dtype)
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = masked_mean(-nn.log_sigmoid(diff), mask)
    if center_coef:
        loss = loss + center_coef * masked_mean((r_chosen + r_rejected) ** 2, mask)
    metrics = {
        "accuracy": masked_mean((r_chosen > r_rejected).astype(mx.float32), mask),
        "margin": masked_mean(r_chosen - r_rejected, mask),
        "reward_chosen": masked_mean(r_chosen, mask),
        "reward_rejected": masked_mean(r_rejected, mask),
    }
    return loss, metrics


# -- DPO family --------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    ref_chosen: mx.array,
    ref_rejected: mx.array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[mx.array, mx.array, mx.array]:
    """Per-pair DPO-family losses and implicit rewards, all ``[B]``.

    Inputs are sequence log-probs (summed over completion tokens; IPO callers pass the
    per-token mean, as TRL does). ``h = (pi_c - pi_r) - (ref_c - ref_r)``, as TRL 1.16's
    ``DPOTrainer``:

    - sigmoid: ``-log s(b h)``
    - ipo:     ``(h - 1/(2 b))^2`` (``b`` is the paper's tau)
    - hinge:   ``max(0, 1 - b h)``
    - robust:  ``(-(1-e) log s(b h) + e log s(-b h)) / (1 - 2e)`` (unbiased under label
      noise e; needs e < 0.5)

    ``label_smoothing`` belongs to the robust loss only: TRL 1.16's sigmoid loss no longer
    smooths (the older "conservative DPO" form), so a smoothing given to another loss is an
    error here rather than a silently different objective.

    Returns ``(losses, chosen_rewards, rejected_rewards)`` with rewards ``b (pi - ref)``.
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    e = label_smoothing
    if e and loss_type != "robust":
        raise ValueError(f"label_smoothing applies to the robust DPO loss, not {loss_type!r}")
    if loss_type == "sigmoid":
        losses = -nn.log_sigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = nn.relu(1 - beta * h)
    elif loss_type == "robust":
        losses = (-(1 - e) * nn.log_sigmoid(beta * h) + e * nn.log_sigmoid(-beta * h)) / (1 - 2 * e)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {DPO_LOSSES}")
    chosen_rewards = beta * mx.stop_gradient(policy_chosen - ref_chosen)
    rejected_rewards = beta * mx.stop_gradient(policy_rejected - ref_rejected)
    return losses, chosen_rewards, rejected_rewards


# -- PPO ---------------------------------------------------------------------------------------


def gae(
    rewards: mx.array, values: mx.array, mask: mx.array, gamma: float, lam: float
) -> tuple[mx.array, mx.array]:
    """Generalised advantage estimation over completion tokens, ``[B, T]`` each.

    ``mask`` marks the real tokens of each completion (a prefix of the row); the value after
    the last real token is 0 (the episode ends). Returns ``(advantages, returns)`` with
    ``returns = advantages + values``, both 0 on masked positions.
    """
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    last = mx.zeros(rewards.shape[:1], dtype=mx.float32)
    out = [None] * T
    for t in reversed(range(T)):
        nxt_mask = mask[:, t + 1] if t + 1 < T else mx.zeros_like(last)
        nxt_value = values[:, t + 1] * nxt_mask if t + 1 < T else mx.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt_value - values[:, t]
        last = delta + gamma * lam * nxt_mask * last
        out[t] = last
    adv = mx.stack(out, axis=1) * mask
    return mx.stop_gradient(adv), mx.stop_gradient((adv + values) * mask)


def kl_penalised_rewards(
    scores: mx.array, logps: mx.array, ref_logps: mx.array, mask: mx.array, kl_coef: float
) -> tuple[mx.array, mx.array]:
    """Per-token rewards ``-kl_coef * (logp - ref_logp)`` plus the sequence score on the last
    real token (Ziegler et al. 2019). Returns ``(rewards [B, T], kl [B, T])``."""
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    T = mask.shape[1]
    last = (mask * mx.arange(T)).max(axis=1).astype(mx.int32)
    onehot = (mx.arange(T)[None, :] == last[:, None]).astype(mx.float32) * mask
    return rewards + onehot * scores[:, None], kl


def ppo_policy_loss(
    logps: mx.array, old_logps: mx.array, advantages: mx.array, mask: mx.array, clip: float
) -> tuple[mx.array, dict[str, mx.array]]:
    """Clipped surrogate ``max(-A r, -A clip(r, 1-c, 1+c))`` averaged over real tokens."""
    log_ratio = logps - old_logps
    ratio = mx.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * mx.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(mx.maximum(pg1, pg2), mask)
    stats = {
        "clipfrac": mx.stop_gradient(masked_mean((pg2 > pg1).astype(mx.float32), mask)),
        "approx_kl": mx.stop_gradient(0.5 * masked_mean(log_ratio**2, mask)),
    }
    return loss, stats


def ppo_value_loss(
    values: mx.array, old_values: mx.array, returns: mx.array, mask: mx.array, clip: float
) -> tuple[mx.array, dict[str, mx.array]]:
    """``0.5 * max((v - R)^2, (v_clipped - R)^2)`` with ``v_clipped`` within ``clip`` of the
    value at rollout time, averaged over real tokens."""
    v_clipped = old_values + mx.clip(values - old_values, -clip, clip)
    l1 = (values - returns) ** 2
    l2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(mx.maximum(l1, l2), mask)
    return loss, {"vf_clipfrac": mx.stop_gradient(masked_mean((l2 > l1).astype(mx.float32), mask))}


# -- GRPO --------------------------------------------------------------------------------------

# TRL GRPOTrainer's loss aggregations (GRPOConfig.loss_type); "dapo" is TRL's default.


def group_advantages(
    rewards: mx.array, group_size: int, eps: float = 1e-4, scale: str = "group"
) -> mx.array:
    """``(r - mean_group) / (std + eps)`` for ``rewards [N*G]`` laid out group by group (the G
    completions of one prompt are contiguous), as TRL's GRPOTrainer: ``scale`` "group" divides
    by each group's std, "batch" by the std of every reward, "none" not at all (Dr. GRPO).
    Unbiased (Bessel-corrected) stds, as TRL's ``nanstd``."""
    r = rewards.reshape(-1, group_size)
    mean = r.mean(axis=1, keepdims=True)
    if scale == "none":
        return (r - mean).reshape(-1)
    if scale == "batch":
        n = rewards.size
        std = mx.sqrt(((rewards - rewards.mean()) ** 2).sum() / max(n - 1, 1))
    elif scale == "group":
        std = mx.sqrt(((r - mean) ** 2).sum(axis=1, keepdims=True) / max(group_size - 1, 1))
    else:
        raise ValueError(f"unknown reward scaling {scale!r}; expected one of {REWARD_SCALES}")
    return ((r - mean) / (std + eps)).reshape(-1)


def k3_kl(logps: mx.array, ref_logps: mx.array) -> mx.array:
    """Schulman's unbiased, non-negative estimator of KL(pi || ref) per token."""
    d = ref_logps - logps
    return mx.exp(d) - d - 1.0


def grpo_loss(
    logps: mx.array,
    old_logps: mx.array,
    ref_logps: mx.array,
    advantages: mx.array,
    mask: mx.array,
    *,
    clip: float,
    beta: float,
    loss_type: str = "dapo",
    normalizer: mx.array | float | None = None,
    max_completion_length: int = 0,
) -> tuple[mx.array, dict[str, mx.array]]:
    """TRL GRPOTrainer's ``_compute_loss`` (token-level importance sampling, one ``clip`` both
    sides): per token ``-min(r A, clip(r, 1-c, 1+c) A) + beta * r * k3`` with ``r`` the ratio
    to the rollout-time policy (the KL term importance-weighted by ``r``, TRL's default
    ``use_bias_correction_kl``), aggregated by ``loss_type``:

    - dapo:    sum over the minibatch's tokens / ``normalizer`` (TRL: the whole generation
               batch's token count / the number of minibatches it is split into)
    - grpo:    mean over each completion's tokens, then over completions (Shao et al. 2024)
    - bnpo:    mean over the minibatch's tokens
    - dr_grpo: sum / (completions * ``max_completion_length``) (Liu et al. 2025)
    """
    ratio = mx.exp(logps - old_logps)
    adv = advantages[:, None]
    surrogate = mx.minimum(ratio * adv, mx.clip(ratio, 1.0 - clip, 1.0 + clip) * adv)
    per_token = -surrogate
    kl = k3_kl(logps, ref_logps) * ratio if beta else None
    if kl is not None:
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = masked_mean(per_token, mask, axis=1).mean()
    elif loss_type == "bnpo":
        loss = masked_mean(per_token, mask)
    elif loss_type == "dr_grpo":
        loss = masked_sum(per_token, mask) / (per_token.shape[0] * max_completion_length)
    elif loss_type == "dapo":
        norm = mask.sum() if normalizer is None else normalizer
        loss = masked_sum(per_token, mask) / mx.maximum(norm, 1.0)
    else:
        raise ValueError(f"unknown GRPO loss {loss_type!r}; expected one of {GRPO_LOSSES}")
    clipped = ((ratio < 1.0 - clip) & (adv < 0)) | ((ratio > 1.0 + clip) & (adv > 0))
    stats = {"clipfrac": mx.stop_gradient(masked_mean(clipped.astype(mx.float32), mask))}
    if kl is not None:
        stats["kl"] = mx.stop_gradient(masked_mean(kl, mask))
    return loss, stats
