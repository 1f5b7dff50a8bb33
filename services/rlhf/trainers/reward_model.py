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
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from services.rlhf.trainers import heads, load_policy, run_cli, write_policy
from services.rlhf.trainers.losses import aux, bradley_terry_loss
from services.runtime import checkpoints, datasets
from services.runtime.contract import CheckpointInfo, JobContext
from services.runtime.loop import (
    Artifact,
    train,
)
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
    loop, opt = cfg.loop, cfg.optimizer
    world = mx.distributed.init()
    mx.random.seed(loop.seed)

    policy = load_policy(cfg.model, cfg.method, cfg.lora, loop.dtype, field="spec.model")
    attach_reward_head(policy.model, seed=loop.seed)
    model, tokenizer = policy.model, policy.tokenizer

    data = datasets.prepare(
        cfg.dataset.to_dict(),
        tokenizer,
        allowed_formats=("preference",),
        max_seq_length=loop.max_seq_length,
        mask_prompt=True,
        seed=loop.seed,
    )
    ctx.log(f"reward model: {data.stats.rows} training pairs, {data.stats.valid_rows} held out")
    dp = {"rank": world.rank(), "world_size": world.size()}
    train_batches = data.batches("train", loop.micro_batch_size, seed=loop.seed, **dp)
    valid_batches = None
    if data.valid and loop.steps_per_eval != -1:
        limit = None if loop.val_batches < 0 else loop.val_batches
        valid_batches = data.batches(
            "valid", loop.micro_batch_size, seed=loop.seed, shuffle=False, limit=limit, **dp
        )

    artifact = Artifact(
        kind=policy.kind,
        write=lambda dst: write_policy(dst, policy, head_kind="reward"),
        base_model=policy.base,
        config={"trainer": "reward_model", **cfg.to_dict()},
    )
    loss_fn = make_loss(cfg.use_margin, cfg.center_rewards_coef)
    result = train(model, loss_fn, train_batches, valid_batches, loop, opt, ctx, artifact)

    metrics = dict(result.metrics)  # the loop's last validation: val_loss, val_accuracy, ...
    if result.checkpoint is None:  # a non-main rank of a data-parallel job
        return CheckpointInfo(Path(ctx.output_dir) / checkpoints.FINAL, policy.kind, result.step)
    final = checkpoints.publish(result.checkpoint.path, Path(ctx.output_dir), metrics)
    ctx.checkpoint_written(final)
    return final


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, sys.argv[1:] if argv is None else argv, __name__)


if __name__ == "__main__":
    raise SystemExit(main())
