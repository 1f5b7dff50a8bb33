"""ORPO (Hong et al. 2024) on preference pairs, reference-free, through the shared loop.

``run(config, ctx)`` takes a resolved ORPO spec dict::

    {"policy": {"model": "/path", "adapter_path": ""}, "dataset": {"path": "prefs.jsonl"},
     "method": "lora", "lora": {...}, "optimizer": {...}, "loop": {...}, "beta": 0.1}

The loss is TRL 1.16 ORPOTrainer's (trl.experimental.orpo)::

    loss = NLL(chosen) - mean_pairs(beta * log s(log_odds))
    log_odds = (c - r) - (log(1 - e^c) - log(1 - e^r))

with ``c`` / ``r`` the *mean* per-token log-probs of the chosen / rejected completions and
``log(1 - e^x)`` in TRL's stable two-branch form. As in TRL, the NLL is the token mean of
cross-entropy over every real token of the chosen rows, prompt included (TRL: "orpo chosen
nll loss is computed over the full prompt and response"), not the completion alone.
Defaults are TRL's ORPOConfig: beta 0.1 (the paper's lambda), learning rate 1e-6 for full
training (adapters 1e-5, as our DPO). No reference model: the checkpoint is the policy.

    uv run python -m services.rlhf.trainers.orpo config.json /tmp/orpo-out
"""

from __future__ import annotations

import math
import sys

import mlx.core as mx
import mlx.nn as nn

from services.rlhf.trainers import load_policy, run_cli
from services.rlhf.trainers.losses import aux, model_token_logps
from services.rlhf.trainers.pairs import train_on_pairs
from services.runtime.contract import CheckpointInfo, JobContext
from services.schema.preference import ORPOConfig

_LN2 = math.log(2.0)


# ---- the loss ----


def log1mexp(x: mx.array) -> mx.array:
    """``log(1 - exp(x))`` for ``x < 0``, branching at -ln 2 as TRL (no cancellation)."""
    return mx.where(x < -_LN2, mx.log1p(-mx.exp(x)), mx.log(-mx.expm1(x)))


def orpo_loss(
    chosen_logps: mx.array, rejected_logps: mx.array, beta: float
) -> tuple[mx.array, mx.array, mx.array]:
    """TRL's ``odds_ratio_loss`` on mean per-token log-probs ``[B]``: returns
    ``(beta * log s(log_odds), log s(log_odds), log_odds)``, all ``[B]``; the ORPO loss is
    the chosen NLL minus the mean of the first."""
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    ratio = nn.log_sigmoid(log_odds)
    return beta * ratio, ratio, log_odds


def make_loss(beta: float):
    def loss_fn(model: nn.Module, batch: dict[str, mx.array]):
        lp = model_token_logps(model, batch["inputs"], batch["targets"])
        mask, lengths = batch["loss_mask"], batch["lengths"]
        b = lp.shape[0] // 2
        real = (lengths[:b] > 0).astype(mx.float32)
        # Empty rows (padding a validation batch) get a harmless -1: log1mexp(0) is -inf.
        avg = (lp * mask).sum(axis=1) / mx.maximum(mask.sum(axis=1), 1.0)
        avg = mx.where(lengths > 0, avg, -1.0)
        c, r = avg[:b], avg[b:]
        # TRL's NLL target: every real token of the chosen rows (attention_mask == 1).
        full = (mx.arange(lp.shape[1])[None, :] < (lengths[:b, None] - 1)).astype(mx.float32)
        nll = -(lp[:b] * full).sum() / mx.maximum(full.sum(), 1.0)
        losses, ratio, log_odds = orpo_loss(c, r, beta)
        n = real.sum()
        denom = mx.maximum(n, 1.0)

        def mean(x):
            return (x * real).sum() / denom

        r_c, r_r = beta * mx.stop_gradient(c), beta * mx.stop_gradient(r)
        metrics = {
            "rewards_chosen": mean(r_c),
            "rewards_rejected": mean(r_r),
            "accuracies": mean((r_c > r_r).astype(mx.float32)),
            "margins": mean(r_c - r_r),
            "logps_chosen": mean(mx.stop_gradient(c)),
            "logps_rejected": mean(mx.stop_gradient(r)),
            "nll_loss": mx.stop_gradient(nll),
            "log_odds_ratio": mean(mx.stop_gradient(ratio)),
            "log_odds_chosen": mean(mx.stop_gradient(log_odds)),
            "tokens": lengths.sum().astype(mx.float32),
        }
        return nll - mean(losses), aux(n), {k: aux(v) for k, v in metrics.items()}

    return loss_fn


# ---- the trainer ----


def run(config: dict, ctx: JobContext) -> CheckpointInfo:
    cfg = ORPOConfig.rehydrate(config)
    loop = cfg.loop
    world = mx.distributed.init()
    mx.random.seed(loop.seed)

    policy = load_policy(cfg.policy, cfg.method, cfg.lora, loop.dtype)
    return train_on_pairs("orpo", cfg, policy, make_loss(cfg.beta), ctx, world)


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, sys.argv[1:] if argv is None else argv, __name__)


if __name__ == "__main__":
    raise SystemExit(main())
