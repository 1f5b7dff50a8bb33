"""PPO for language models (Ziegler et al. 2019; the InstructGPT recipe).

``run(config, ctx)`` takes a resolved PPOSpec dict (see docs/rlhf.md for every field)::

    {"policy": {"model": "/path"}, "dataset": {"path": "prompts.jsonl"},
     "reward": {"reward_function": "token_count:!"} | {"reward_model": {"model": "/rm"}},
     "method": "lora", "rollout": {"batch_size": 8, "sampling": {"max_tokens": 64}},
     "ppo_epochs": 4, "minibatch_size": 4, "init_kl_coef": 0.2, "adaptive_kl": true, ...}

One *step* is one PPO iteration: sample a completion per prompt of a rollout batch, score
it, add the per-token KL penalty ``-kl_coef * (log pi - log ref)`` to the rewards, run GAE
on the value head's estimates, then ``ppo_epochs`` passes of clipped policy + clipped value
updates over shuffled minibatches. The policy and the value share the trunk (a value head
on the LM). The update is TRL's classic PPOTrainer (v0.11: ``compute_rewards``,
``compute_advantages``, ``loss``, ``AdaptiveKLController``; its scheduler steps once per PPO
iteration, not per minibatch); bench/parity_rl.py checks it step by step. Checkpoints
hold the policy, its value head and the trainer state (optimizer, step, KL controller,
rollout RNG, prompt position), so a resumed job continues exactly. Rollouts come from a
backend (rollout_backends: local by default, or a remote server given the policy by
checkpoint reference); the ratio always uses the log-probs this model recomputes.

Data parallel (``resources.num_processes`` > 1): ``rollout.batch_size`` and
``minibatch_size`` are global; each rank samples, scores and trains on its share of the
prompts (batch / world), with its own sampling key split from the shared one; gradients are
averaged inside the compiled update, advantages whitened with statistics of the whole
rollout batch, and the KL that drives the adaptive controller, the rewards and the reported
metrics are reduced over all ranks, so every rank keeps the same controller state. The
per-minibatch loss is each rank's token mean, averaged over ranks (as DDP does), which
weights tokens slightly differently from one process when completion lengths differ.

    uv run python -m services.rlhf.trainers.ppo config.json /tmp/ppo-out
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from services.rlhf.trainers import (
    RLState,
    RolloutStrategy,
    heads,
    load_policy,
    load_reference,
    run_cli,
    train_rollouts,
)
from services.rlhf.trainers.data_parallel import (
    gather_rows,
    mean_over_ranks,
    whiten_global,
)
from services.rlhf.trainers.kl import make_kl_controller
from services.rlhf.trainers.losses import (
    aux,
    entropy,
    gae,
    kl_penalised_rewards,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    token_logps,
)
from services.rlhf.trainers.rewards import (
    RewardFn,
    RewardModelScorer,
    parse_reward_function,
)
from services.rlhf.trainers.rollout import (
    RolloutRNG,
    completion_logits,
    gather_positions,
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
    OptimizerSettings,
    build_lr_schedule,
    build_optimizer,
    learning_rate,
)
from services.schema.rollouts import PPOConfig, RewardSourceSettings

# ---- pieces shared with GRPO ----


def reward_fn(source: RewardSourceSettings, tokenizer: Any, dtype: str) -> RewardFn:
    if source.reward_function:
        return parse_reward_function(
            source.reward_function, tokenizer, "spec.reward.reward_function"
        )
    scorer = RewardModelScorer.load(source.reward_model.model, dtype=dtype)
    return scorer.as_reward_fn()


def make_update(model: nn.Module, loss_fn: Callable, optimizer, clip_norm: float, world=None):
    """A compiled optimizer step on one minibatch: (loss, metrics) of this rank's share.

    With several ranks every rank calls it the same number of times (equal shares) and the
    gradients are averaged over ranks before clipping and the update."""
    state = [model.state, optimizer.state, mx.random.state]
    vg = nn.value_and_grad(model, loss_fn)
    n_proc = world.size() if world is not None else 1

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch):
        (loss, metrics), grads = vg(model, batch)
        if n_proc > 1:
            grads = nn.average_gradients(grads)
        if clip_norm > 0:
            grads, _ = optim.clip_grad_norm(grads, clip_norm)
        optimizer.update(model, grads)
        return loss, metrics

    def run(batch: dict[str, mx.array]) -> tuple[float, dict[str, float]]:
        loss, metrics = step(batch)
        mx.eval(state, loss, metrics)
        return loss.item(), {k: v.item() for k, v in metrics.items()}

    return run, state


def minibatches(n: int, size: int, seed: int, step: int, epoch: int) -> list[np.ndarray]:
    """A fresh shuffle per (step, epoch), a pure function of them: resumes replay it."""
    order = np.random.default_rng([seed % 2**63, step, epoch]).permutation(n)
    return [order[i : i + size] for i in range(0, n, size)]


def take(batch: dict[str, mx.array], idx: np.ndarray) -> dict[str, mx.array]:
    rows = mx.array(idx.astype(np.int32))
    return {k: v[rows] for k, v in batch.items()}


# ---- PPO ----


def schedule_per_iteration(
    optimizer: optim.Optimizer, s: OptimizerSettings, iterations: int, updates: int
) -> None:
    """Make the LR schedule advance once per PPO iteration (``updates`` minibatch updates),
    as TRL's PPOTrainer steps its scheduler once per rollout batch: every update of
    iteration ``k`` uses ``lr * factor(k)`` over ``iterations`` scheduler steps."""
    base = build_lr_schedule(s, iterations)
    if not callable(base):  # constant: nothing to re-time
        return
    for o in getattr(optimizer, "optimizers", [optimizer]):
        # mlx evaluates each entry of _schedulers at the optimizer's update count.
        o._schedulers["learning_rate"] = lambda step: base(step // updates)
        o.learning_rate = base(mx.array(0))


def make_loss(cfg: PPOConfig) -> Callable:
    temp = cfg.rollout.sampling.temperature

    def loss_fn(model: nn.Module, mb: dict[str, mx.array]):
        logits, values = heads.logits_and_values(model, mb["inputs"])
        lg = completion_logits(logits, mb, temp)
        logps = token_logps(lg, mb["tokens"])
        v = gather_positions(values, mb["positions"])
        mask = mb["mask"]
        pg, pg_stats = ppo_policy_loss(
            logps, mb["old_logps"], mb["advantages"], mask, cfg.clip_range
        )
        vf, vf_stats = ppo_value_loss(
            v, mb["old_values"], mb["returns"], mask, cfg.clip_range_value
        )
        metrics = {"policy_loss": pg, "value_loss": vf, **pg_stats, **vf_stats}
        return pg + cfg.vf_coef * vf, {k: aux(x) for k, x in metrics.items()}

    return loss_fn


def run(config: dict, ctx: JobContext) -> CheckpointInfo:
    cfg = PPOConfig.rehydrate(config)
    loop = cfg.loop
    world = mx.distributed.init()
    mx.random.seed(loop.seed)
    temp = cfg.rollout.sampling.temperature

    policy = load_policy(cfg.policy, cfg.method, cfg.lora, loop.dtype)
    heads.attach_head(policy.model, seed=loop.seed)
    model, tokenizer = policy.model, policy.tokenizer
    reference, ref_cfg = load_reference(cfg.reference, cfg.policy, loop.dtype)
    score = reward_fn(cfg.reward, tokenizer, loop.dtype)
    prompts = prompt_data(cfg, tokenizer, world)
    total = loop.max_steps or loop.epochs * prompts.steps_per_epoch
    n_mb = math.ceil(cfg.rollout.batch_size / cfg.minibatch_size)
    optimizer = build_optimizer(cfg.optimizer, total * cfg.ppo_epochs * n_mb)
    schedule_per_iteration(optimizer, cfg.optimizer, total, cfg.ppo_epochs * n_mb)
    optimizer.init(model.trainable_parameters())
    kl_ctl = make_kl_controller(cfg.init_kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
    seed = loop.seed if cfg.rollout.sampling.seed is None else cfg.rollout.sampling.seed
    extra = RLState(RolloutRNG(seed), kl_ctl)
    resolved = {"trainer": "ppo", **cfg.to_dict(), "resolved_reference": ref_cfg}
    clip = cfg.optimizer.grad_clip_norm
    update, _ = make_update(model, make_loss(cfg), optimizer, clip, world)
    minibatch = cfg.minibatch_size // world.size()  # this rank's share
    hook = recorder(ctx)
    backend = make_backend(cfg.rollout, policy, ctx.output_dir)

    def record_start() -> None:  # after any restore: the weights the first update starts from
        record(hook, event="start", params=dict(tree_flatten(model.trainable_parameters())))

    def iteration(step: int, prompt_batch: dict) -> tuple[dict[str, float], int]:
        got = sample(policy, cfg.rollout, extra.rng, prompt_batch, 1, world, backend, step)
        batch, ids, t_gen = got.batch, got.ids, got.seconds
        tic = time.perf_counter()
        scores = mx.array(score(got.prompts, ids, got.texts), mx.float32)
        t_reward = time.perf_counter() - tic
        tic = time.perf_counter()
        model.eval()
        logits, values = heads.logits_and_values(model, batch["inputs"])
        lg = completion_logits(logits, batch, temp)
        old_logps = mx.stop_gradient(token_logps(lg, batch["tokens"]))
        old_values = mx.stop_gradient(gather_positions(values, batch["positions"]))
        ent = masked_mean(entropy(lg), batch["mask"])
        ref = reference_logps(reference, batch, temp)
        model.train()
        mask = batch["mask"]
        kl_coef = kl_ctl.value
        rewards, kl = kl_penalised_rewards(scores, old_logps, ref, mask, kl_coef)
        adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = whiten_global(adv, mask, world)
        seq_kl = kl.sum(axis=1).mean()
        mx.eval(old_logps, old_values, adv, returns, seq_kl, ent)
        t_score = time.perf_counter() - tic + t_reward

        tic = time.perf_counter()
        data = {**batch, "old_logps": old_logps, "old_values": old_values}
        data.update(advantages=adv, returns=returns)
        sums: dict[str, float] = {}
        done: list[tuple[np.ndarray, float]] = []
        n = 0
        for epoch in range(cfg.ppo_epochs):
            for idx in minibatches(len(ids), minibatch, loop.seed, step, epoch):
                mx.random.seed((loop.seed * 1_000_003 + step * 1009 + n) % 2**63)
                loss, m = update(take(data, idx))
                for k, v in {"loss": loss, **m}.items():
                    sums[k] = sums.get(k, 0.0) + v
                done.append((idx, loss))
                n += 1
        record(
            hook, event="step", step=step, prompt_ids=got.rollout.prompt_ids,
            completion_ids=got.rollout.completion_ids, mask=mask, scores=scores, updates=done,
            kl_coef=kl_coef, old_logps=old_logps, ref_logps=ref, old_values=old_values,
            advantages=adv, returns=returns,
        )  # fmt: skip
        t_update = time.perf_counter() - tic
        metrics = {k: v / n for k, v in sums.items()}
        metrics.update(rollout_metrics(got, step, old_logps))
        metrics.update(
            kl=seq_kl.item(),
            entropy=ent.item(),
            returns_mean=masked_mean(returns, mask).item(),
            completion_length=mask.sum(axis=1).mean().item(),
            tokens=mask.sum().item() * world.size(),
        )
        # Equal shares: the mean over ranks is the mean over the whole rollout batch.
        metrics = mean_over_ranks(metrics, world)
        all_scores = np.array(gather_rows(scores, world))
        kl_ctl.update(metrics["kl"], len(ids) * world.size())
        metrics.update(
            reward_mean=float(all_scores.mean()),
            reward_std=float(np.std(all_scores)),
            kl_coef=kl_coef,
            learning_rate=learning_rate(optimizer),
            time_generation=t_gen,
            time_scoring=t_score,
            time_update=t_update,
        )
        return metrics, int(round(metrics.pop("tokens")))

    strategy = RolloutStrategy(iteration, prompts, extra, on_start=record_start)
    try:
        return train_rollouts(strategy, ctx, policy, optimizer, cfg, total, resolved, "value")
    finally:
        backend.close()


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, sys.argv[1:] if argv is None else argv, __name__)


if __name__ == "__main__":
    raise SystemExit(main())
