"""What the rollout trainers (PPO, GRPO) need to run data parallel.

Each rank samples, scores and trains on an equal share of every rollout batch; these helpers
are where ranks must agree: batch sizes that split evenly, per-rank sampling keys from one
saved key, and statistics (whitening, KL, rewards, metrics) over the whole rollout batch.
With one process every helper is the identity of its one-process counterpart.
"""

from __future__ import annotations

import math

import mlx.core as mx

from services.rlhf.trainers.losses import whiten


def rank_key(key: mx.array, world) -> mx.array:
    """This rank's sampling key: the shared key split per rank (different completions on
    every rank; the saved RNG state stays the same on all of them)."""
    return key if world.size() == 1 else mx.random.split(key, world.size())[world.rank()]


def mean_over_ranks(metrics: dict[str, float], world) -> dict[str, float]:
    """Each metric averaged over ranks (one all_sum); equal shares make it the global mean."""
    if world.size() == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    total = mx.distributed.all_sum(mx.array([metrics[k] for k in keys]), stream=mx.cpu)
    return dict(zip(keys, (total / world.size()).tolist(), strict=True))


def gather_rows(x: mx.array, world) -> mx.array:
    """Every rank's rows of ``x`` (equal counts), in rank order."""
    return x if world.size() == 1 else mx.distributed.all_gather(x, stream=mx.cpu)


def whiten_global(x: mx.array, mask: mx.array, world, eps: float = 1e-8) -> mx.array:
    """``whiten`` with the mean and (unbiased) variance of the masked entries of all ranks."""
    if world.size() == 1:
        return whiten(x, mask)
    s = mx.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()])
    tot, sq, n = mx.distributed.all_sum(s, stream=mx.cpu).tolist()
    mean = tot / max(n, 1.0)
    var = max(sq / max(n, 1.0) - mean * mean, 0.0) * n / max(n - 1.0, 1.0)
    return (x - mean) * (1.0 / math.sqrt(var + eps)) * mask
