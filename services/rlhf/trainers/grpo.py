"""GRPO (Shao et al. 2024): PPO without a critic, advantages from groups of samples.

``run(config, ctx)`` takes a resolved GRPOSpec dict::

    {"policy": {"model": "/path"}, "dataset": {"path": "prompts.jsonl"},
     "reward": {"reward_function": "length"}, "method": "lora",
     "rollout": {"batch_size": 8, "sampling": {"max_tokens": 64}},
     "group_size": 8, "beta": 0.0, "clip_range": 0.2, "loss_type": "dapo",
     "scale_rewards": "group", "num_iterations": 1, "loop": {"batch_size": 4}}

One *step*: ``group_size`` completions for each prompt of a rollout batch, rewards
normalised within each group (``(r - mean) / (std + 1e-4)``), then ``num_iterations``
passes of clipped-ratio updates over the same shuffled minibatches of ``loop.batch_size``
completions (one optimizer step each), with the importance-weighted per-token ``k3``
estimate of KL(policy || reference) weighted by ``beta`` (no reference is loaded when
``beta`` is 0). The update is TRL GRPOTrainer's (``_compute_loss``, its defaults: loss_type
"dapo", beta 0, scale_rewards "group", num_generations 8, num_iterations 1), with our
minibatches as its ``per_device_train_batch_size`` and ``steps_per_generation`` = minibatches
per rollout batch; bench/parity_rl.py checks it step by step. The rollout machinery,
checkpoints and exact resume are PPO's.

Data parallel (``resources.num_processes`` > 1): ``rollout.batch_size`` prompts and
``loop.batch_size`` completions per minibatch are global; each rank samples whole groups for
its share of the prompts (so group advantages need nothing from other ranks), gradients are
averaged over ranks in the compiled update, and rewards and metrics are reduced over ranks.

    uv run python -m services.rlhf.trainers.grpo config.json /tmp/grpo-out
"""

from __future__ import annotations

import math
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from services.rlhf.trainers import (
    RLState,
    RolloutStrategy,
    load_policy,
    load_reference,
    run_cli,
    train_rollouts,
)
from services.rlhf.trainers.data_parallel import (
    gather_rows,
    mean_over_ranks,
)
from services.rlhf.trainers.losses import (
    aux,
    entropy,
    group_advantages,
    grpo_loss,
    masked_mean,
    token_logps,
)
from services.rlhf.trainers.ppo import (
    make_update,
    minibatches,
    reward_fn,
    take,
)
from services.rlhf.trainers.rollout import (
    RolloutRNG,
    model_completion_logits,
    prompt_data,
    record,
    recorder,
    reference_logps,
    rollout_metrics,
    sample,
)
from services.rlhf.trainers.rollout_backends import make_backend
from services.runtime.contract import CheckpointInfo, JobContext
from services.runtime.optim import (
    build_optimizer,
    learning_rate,
)
from services.schema.rollouts import GRPOConfig


def make_loss(cfg: GRPOConfig):
    temp = cfg.rollout.sampling.temperature

    def loss_fn(model: nn.Module, mb: dict[str, mx.array]):
        lg = model_completion_logits(model, mb, temp)
        logps = token_logps(lg, mb["tokens"])
        loss, stats = grpo_loss(
            logps,
            mb["old_logps"],
            mb["ref_logps"],
            mb["advantages"],
            mb["mask"],
            clip=cfg.clip_range,
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            normalizer=mb["normalizer"],
            max_completion_length=cfg.rollout.sampling.max_tokens,
        )
        return loss, {k: aux(v) for k, v in stats.items()}

    return loss_fn


def run(config: dict, ctx: JobContext) -> CheckpointInfo:
    cfg = GRPOConfig.rehydrate(config)
    loop = cfg.loop
    world = mx.distributed.init()
    mx.random.seed(loop.seed)
    temp = cfg.rollout.sampling.temperature
    G = cfg.group_size

    policy = load_policy(cfg.policy, cfg.method, cfg.lora, loop.dtype)
    model, tokenizer = policy.model, policy.tokenizer
    reference, ref_cfg = None, None
    if cfg.beta > 0:
        reference, ref_cfg = load_reference(cfg.reference, cfg.policy, loop.dtype)
    score = reward_fn(cfg.reward, tokenizer, loop.dtype)
    prompts = prompt_data(cfg, tokenizer, world)
    total = loop.max_steps or loop.epochs * prompts.steps_per_epoch
    per_step = math.ceil(cfg.rollout.batch_size * G / loop.batch_size) * cfg.num_iterations
    optimizer = build_optimizer(cfg.optimizer, total * per_step)
    optimizer.init(model.trainable_parameters())
    seed = loop.seed if cfg.rollout.sampling.seed is None else cfg.rollout.sampling.seed
    extra = RLState(RolloutRNG(seed))
    resolved = {"trainer": "grpo", **cfg.to_dict(), "resolved_reference": ref_cfg}
    clip = cfg.optimizer.grad_clip_norm
    update, _ = make_update(model, make_loss(cfg), optimizer, clip, world)
    minibatch = loop.batch_size // world.size()  # this rank's share
    hook = recorder(ctx)
    backend = make_backend(cfg.rollout, policy, ctx.output_dir)

    def record_start() -> None:  # after any restore: the weights the first update starts from
        record(hook, event="start", params=dict(tree_flatten(model.trainable_parameters())))

    def iteration(step: int, prompt_batch: dict) -> tuple[dict[str, float], int]:
        got = sample(policy, cfg.rollout, extra.rng, prompt_batch, G, world, backend, step)
        batch, ids = got.batch, got.ids
        tic = time.perf_counter()
        rewards = np.asarray(score(got.prompts, ids, got.texts), np.float32)
        t_reward = time.perf_counter() - tic
        tic = time.perf_counter()
        model.eval()
        lg = model_completion_logits(model, batch, temp)
        old_logps = mx.stop_gradient(token_logps(lg, batch["tokens"]))
        ent = masked_mean(entropy(lg), batch["mask"])
        model.train()
        ref = reference_logps(reference, batch, temp) if reference is not None else old_logps
        # Advantages from every rank's rewards (TRL gathers them too): "batch" scaling needs
        # the std of the whole rollout batch; this rank keeps its own rows.
        everyone = gather_rows(mx.array(rewards), world)
        adv = group_advantages(everyone, G, scale=cfg.scale_rewards)
        adv = adv.reshape(world.size(), -1)[world.rank()]
        mx.eval(old_logps, ref, adv, ent)
        t_score = time.perf_counter() - tic + t_reward

        tic = time.perf_counter()
        data = {**batch, "old_logps": old_logps, "ref_logps": ref, "advantages": adv}
        # TRL shuffles a generation batch once and reuses that split for every iteration.
        order = minibatches(len(ids), minibatch, loop.seed, step, 0)
        # "dapo" divides each minibatch's token sum by the rollout batch's token count (all
        # ranks) over the minibatches it is split into: TRL's num_items_in_batch / processes
        # / steps_per_generation.
        n_tokens = float(batch["mask"].sum().item())
        if world.size() > 1:
            n_tokens = mx.distributed.all_sum(mx.array(n_tokens), stream=mx.cpu).item()
        normalizer = mx.array(n_tokens / world.size() / len(order), mx.float32)
        sums: dict[str, float] = {}
        done: list[tuple[np.ndarray, float]] = []
        n = 0
        for _ in range(cfg.num_iterations):
            for idx in order:
                mx.random.seed((loop.seed * 1_000_003 + step * 1009 + n) % 2**63)
                loss, m = update({**take(data, idx), "normalizer": normalizer})
                for k, v in {"loss": loss, **m}.items():
                    sums[k] = sums.get(k, 0.0) + v
                done.append((idx, loss))
                n += 1
        record(
            hook, event="step", step=step, prompt_ids=got.rollout.prompt_ids,
            completion_ids=got.rollout.completion_ids, mask=batch["mask"], scores=rewards,
            updates=done, old_logps=old_logps, ref_logps=ref, advantages=adv,
            normalizer=normalizer,
        )  # fmt: skip
        t_update = time.perf_counter() - tic
        metrics = {k: v / n for k, v in sums.items()}
        metrics.update(rollout_metrics(got, step, old_logps))
        metrics.update(
            entropy=ent.item(),
            completion_length=batch["mask"].sum(axis=1).mean().item(),
            tokens=batch["mask"].sum().item() * world.size(),
        )
        # Equal shares: the mean over ranks is the mean over the whole rollout batch.
        metrics = mean_over_ranks(metrics, world)
        groups = np.array(everyone).reshape(-1, G)
        metrics.update(
            reward_mean=float(groups.mean()),
            reward_std=float(groups.std(axis=1).mean()),
            frac_groups_without_signal=float((groups.std(axis=1) == 0).mean()),
            learning_rate=learning_rate(optimizer),
            time_generation=got.seconds,
            time_scoring=t_score,
            time_update=t_update,
        )
        return metrics, int(round(metrics.pop("tokens")))

    strategy = RolloutStrategy(iteration, prompts, extra, on_start=record_start)
    try:
        return train_rollouts(strategy, ctx, policy, optimizer, cfg, total, resolved, None)
    finally:
        backend.close()


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, sys.argv[1:] if argv is None else argv, __name__)


if __name__ == "__main__":
    raise SystemExit(main())
