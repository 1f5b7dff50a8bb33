"""Training on preference pairs with no reference: what the reward model and ORPO share.

Both load a policy, tokenize preference rows (prompt masked), batch them per rank, train
through the shared loop and publish the final checkpoint; they differ only in the loss, the
head the checkpoint carries and their names. DPO and KTO add a reference model and live in
their own modules.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.rlhf.trainers import Policy, write_policy
from services.runtime import checkpoints, datasets
from services.runtime.contract import CheckpointInfo, JobContext
from services.runtime.loop import Artifact, train


def train_on_pairs(
    trainer: str,
    cfg: Any,
    policy: Policy,
    loss_fn: Callable,
    ctx: JobContext,
    world: Any,
    *,
    head_kind: str | None = None,
    title: str | None = None,
) -> CheckpointInfo:
    """Train ``policy`` on ``cfg.dataset``'s preference pairs with ``loss_fn``; the final
    checkpoint (with ``head_kind``'s head, if any) and its metrics: the loop's last
    validation (val_loss and the loss's held-out metrics)."""
    loop, opt = cfg.loop, cfg.optimizer
    data = datasets.prepare(
        cfg.dataset.to_dict(),
        policy.tokenizer,
        allowed_formats=("preference",),
        max_seq_length=loop.max_seq_length,
        mask_prompt=True,
        seed=loop.seed,
    )
    ctx.log(
        f"{title or trainer}: {data.stats.rows} training pairs, {data.stats.valid_rows} held out"
    )
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
        write=lambda dst: write_policy(dst, policy, head_kind=head_kind),
        base_model=policy.base,
        config={"trainer": trainer, **cfg.to_dict()},
    )
    result = train(policy.model, loss_fn, train_batches, valid_batches, loop, opt, ctx, artifact)
    if result.checkpoint is None:  # a non-main rank of a data-parallel job
        return CheckpointInfo(Path(ctx.output_dir) / checkpoints.FINAL, policy.kind, result.step)
    final = checkpoints.publish(result.checkpoint.path, Path(ctx.output_dir), dict(result.metrics))
    ctx.checkpoint_written(final)
    return final
