"""Reward model: a scalar head on a base LM, trained on preference pairs (Bradley-Terry).

``run(config, ctx)`` takes a resolved RewardModelSpec dict::

    {"model": {"model": "/path", "adapter_path": ""}, "dataset": {"path": "prefs.jsonl"},
     "method": "lora", "lora": {...}, "optimizer": {...}, "loop": {...},
     "use_margin": false, "center_rewards_coef": 0.0}

The reward of a (prompt, answer) is the head's output at its last real token (TRL's
``AutoModelForSequenceClassification`` reads the rightmost token that is not the pad id: the
same position unless an answer ends in the pad token). The loss is
``-log sigmoid(r_chosen - r_rejected [- margin])`` (+ centering), averaged over pairs, as
TRL 1.16's RewardTrainer; its default learning rate is TRL's 1e-4. The head's bias stays 0
(TRL's score layer has none). Trained with the shared loop; the checkpoint is the LM
(adapter or full) plus ``value_head.safetensors``.

    uv run python -m services.rlhf.trainers.reward_model config.json /tmp/rm-out
"""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn

from services.rlhf.trainers import heads, load_policy, run_cli
from services.rlhf.trainers.losses import aux, bradley_terry_loss
from services.rlhf.trainers.pairs import train_on_pairs
from services.runtime.contract import CheckpointInfo, JobContext
from services.schema.preference import RewardModelConfig


def attach_reward_head(lm: nn.Module, seed: int = 0) -> nn.Module:
    """The scalar head, its bias frozen at 0.

    TRL's reward model (``AutoModelForSequenceClassification``) scores with a bias-free
    Linear. The bias cancels in ``r_c - r_r``, so its gradient is rounding noise (or the
    centering term's alone), which Adam scales up to lr-sized steps: trainable, it drifted
    to ~1e-2 in 20 steps at lr 2e-3 and the centered loss left TRL's by 1.3e-3 (relative)."""
    heads.attach_head(lm, seed=seed)
    lm.value_head.freeze(keys=["bias"])
    return lm


def make_loss(use_margin: bool, center_coef: float):
    def loss_fn(model: nn.Module, batch: dict[str, mx.array]):
        r = heads.rewards(model, batch["inputs"], batch["lengths"])
        b = r.shape[0] // 2
        # Empty rows pad the last validation batch: they are no pairs.
        real = (batch["lengths"][:b] > 0).astype(mx.float32)
        margin = batch.get("margin") if use_margin else None
        loss, metrics = bradley_terry_loss(r[:b], r[b:], margin, center_coef, mask=real)
        metrics["tokens"] = batch["lengths"].sum().astype(mx.float32)
        return loss, aux(real.sum()), {k: aux(v) for k, v in metrics.items()}

    return loss_fn


def run(config: dict, ctx: JobContext) -> CheckpointInfo:
    cfg = RewardModelConfig.rehydrate(config)
    loop = cfg.loop
    world = mx.distributed.init()
    mx.random.seed(loop.seed)

    policy = load_policy(cfg.model, cfg.method, cfg.lora, loop.dtype, field="spec.model")
    attach_reward_head(policy.model, seed=loop.seed)
    loss_fn = make_loss(cfg.use_margin, cfg.center_rewards_coef)
    return train_on_pairs(
        "reward_model", cfg, policy, loss_fn, ctx, world, head_kind="reward", title="reward model"
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, sys.argv[1:] if argv is None else argv, __name__)


if __name__ == "__main__":
    raise SystemExit(main())
