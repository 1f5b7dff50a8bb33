"""PPO / GRPO rollouts: the sampling key, prompt batches, and training rows from samples.

The batched sampler itself is services.runtime.sampler (the GenerationService's
SampleTokens runs the same code). Sampling draws from an explicit ``mx.random`` key: the
key is the whole RNG state, is saved in every checkpoint, and a resumed run samples
exactly the completions an uninterrupted one would have.

Also what turns a prompt batch into training rows (``sample``: generate, decode, ``pack``),
the prompt stream itself (``prompt_data``) and the reference model's log-probs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from services.rlhf.trainers import Policy, eos_ids, pad_id
from services.rlhf.trainers.data_parallel import rank_key
from services.rlhf.trainers.losses import token_logps
from services.rlhf.trainers.rollout_backends import LocalBackend, RolloutBackend, staleness_error
from services.runtime import datasets, linear_ce
from services.runtime.errors import FailedPrecondition
from services.runtime.sampler import Rollout
from services.runtime.sampler import generate as generate  # re-exported
from services.schema.rollouts import RolloutSampling as RolloutSampling  # re-exported
from services.schema.rollouts import RolloutSettings


class RolloutRNG:
    """A splittable key; ``state()`` is two uint32s, enough to continue the same stream."""

    def __init__(self, seed: int) -> None:
        self.key = mx.random.key(int(seed) % 2**63)

    def next(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub

    def state(self) -> dict:
        return {"key": [int(x) for x in self.key.tolist()]}

    def restore(self, state: dict) -> None:
        self.key = mx.array(state["key"], dtype=mx.uint32)


# -- from rollouts to training arrays ----------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def pack(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, multiple: int = 32
) -> dict[str, mx.array]:
    """Prompt + completion rows for one forward pass, with completion-aligned indices.

    ``inputs`` / ``targets`` are ``[B, L]`` (right-padded; L a multiple of ``multiple`` so a
    compiled step sees few shapes). ``positions [B, T]`` holds, for completion token j, the
    index of the input position whose logits predict it (and whose hidden state is the value
    of that state); ``tokens [B, T]`` the completion tokens; ``mask [B, T]`` 1 on real ones.
    """
    rows = [p + c for p, c in zip(prompts, completions, strict=True)]
    L = _round_up(max(len(r) for r in rows) - 1, multiple)
    T = _round_up(max(max((len(c) for c in completions), default=1), 1), 16)
    B = len(rows)
    seq = np.full((B, L + 1), pad_id, np.int32)
    pos = np.zeros((B, T), np.int32)
    tok = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), np.float32)
    for r, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        seq[r, : len(p) + len(c)] = p + c
        n = len(c)
        pos[r, :n] = np.arange(len(p) - 1, len(p) - 1 + n)
        tok[r, :n] = c
        mask[r, :n] = 1.0
    return {
        "inputs": mx.array(seq[:, :-1]),
        "targets": mx.array(seq[:, 1:]),
        "positions": mx.array(pos),
        "tokens": mx.array(tok),
        "mask": mx.array(mask),
    }


def gather_positions(x: mx.array, positions: mx.array) -> mx.array:
    """``x[b, positions[b, j]]`` for ``x [B, L, ...]`` -> ``[B, T, ...]``."""
    idx = positions
    while idx.ndim < x.ndim:
        idx = idx[..., None]
    return mx.take_along_axis(x, idx, axis=1)


def completion_logits(logits: mx.array, batch: dict[str, mx.array], temperature: float):
    """The logits that predicted each completion token, scaled as they were sampled."""
    return _tempered(gather_positions(logits, batch["positions"]), temperature)


def _tempered(logits: mx.array, temperature: float) -> mx.array:
    lg = logits.astype(mx.float32)
    return lg / temperature if temperature > 0 else lg


def model_completion_logits(model: nn.Module, batch: dict[str, mx.array], temperature: float):
    """``completion_logits(model(inputs), batch, temperature)`` with the LM head run only at
    the positions that predict completion tokens, where the head is a plain matrix
    (services.runtime.linear_ce.head_weight): the prompt's positions never reach it."""
    w = linear_ce.head_weight(model) if linear_ce.ENABLED else None
    if w is None:
        return completion_logits(model(batch["inputs"]), batch, temperature)
    return _tempered(
        gather_positions(model.model(batch["inputs"]), batch["positions"]) @ w.T, temperature
    )


def strip_eos(ids: list[int], eos_ids) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos_ids else ids


# -- from prompts to sampled rows (PPO, GRPO) --------------------------------------------------


@dataclass
class Sampled:
    batch: dict[str, mx.array]  # pack() arrays
    ids: list[list[int]]  # completion ids, end-of-sequence stripped
    texts: list[str]
    prompts: list[Any]  # the raw prompt of each row (repeated per group)
    seconds: float
    rollout: Rollout | None = None  # the token ids as sampled (completions keep their EOS)
    version: int = 0  # the policy version (step) that sampled them


class StaleRollouts(FailedPrecondition):
    """The backend kept answering with a policy version older than the staleness bound."""


RESAMPLE_TRIES = 3


def sample(
    policy: Policy,
    rollout: RolloutSettings,
    rng: RolloutRNG,
    prompt_batch: dict,
    group: int = 1,
    world=None,
    backend: RolloutBackend | None = None,
    step: int = 0,
) -> Sampled:
    """Sample ``group`` completions per prompt of a PromptBatches batch (this rank's) with
    ``backend`` (default: local). Rollouts more than ``rollout.max_staleness`` steps behind
    ``step`` are re-sampled (same key), then refused."""
    tic = time.perf_counter()
    prompts = [list(p) for p in prompt_batch["tokens"]]
    raw = [p for p in prompt_batch["prompts"] for _ in range(group)]
    key = rank_key(rng.next(), world or mx.distributed.init())
    backend = backend or LocalBackend(policy, rollout.sampling)
    for _ in range(RESAMPLE_TRIES):
        got = backend.sample(prompts, group, key, step)
        if step - got.version <= rollout.max_staleness:
            break
    else:
        raise StaleRollouts(staleness_error(step, got.version, rollout.max_staleness))
    tokens = [p for p in prompts for _ in range(group)]
    out = Rollout(tokens, got.completion_ids, got.logprobs, got.finished)
    eos = eos_ids(policy.tokenizer)
    ids = [strip_eos(c, eos) for c in out.completion_ids]
    texts = [policy.tokenizer.decode(c) for c in ids]
    batch = pack(out.prompt_ids, out.completion_ids, pad_id(policy.tokenizer))
    return Sampled(batch, ids, texts, raw, time.perf_counter() - tic, out, got.version)


def rollout_metrics(got: Sampled, step: int, recomputed: mx.array) -> dict[str, float]:
    """How far the backend's log-probs are from the policy's own (``recomputed [B, T]``,
    which the update uses), and how many steps its policy version lags ``step``."""
    rec = np.array(recomputed, np.float64)
    gaps = []
    for r, lp in enumerate(got.rollout.logprobs if got.rollout is not None else []):
        d = np.abs(np.asarray(lp, np.float64) - rec[r, : len(lp)])
        gaps.append(d[~np.isnan(d)])
    gap = np.concatenate(gaps) if gaps else np.zeros(0)
    return {
        "rollout_logprob_gap": float(gap.mean()) if gap.size else 0.0,
        "rollout_logprob_gap_max": float(gap.max()) if gap.size else 0.0,
        "rollout_version_lag": float(step - got.version),
    }


def reference_logps(reference: nn.Module, batch: dict, temperature: float) -> mx.array:
    logits = model_completion_logits(reference, batch, temperature)
    return mx.stop_gradient(token_logps(logits, batch["tokens"]))


def prompt_data(cfg, tokenizer, world) -> Any:
    """Prompt batches over every prompt row: rollouts hold nothing out for validation."""
    loop = cfg.loop
    ref = {**cfg.dataset.to_dict(), "valid_fraction": 0.0, "valid_path": ""}
    data = datasets.prepare(
        ref,
        tokenizer,
        allowed_formats=("prompt",),
        max_seq_length=loop.max_seq_length,  # prompts keep their last tokens
        mask_prompt=None,
        seed=loop.seed,
    )
    return data.batches(
        "train",
        cfg.rollout.batch_size,
        seed=loop.seed,
        rank=world.rank(),
        world_size=world.size(),
        field="spec.rollout.batch_size",
    )


# -- recording (the parity harness) ------------------------------------------------------------

# PPO and GRPO updates run inside their iteration (RolloutStrategy), not through the batch
# step, so the loop's batch hook never sees them. A caller that sets ``ctx.extra[RECORD]`` to
# a callable gets, as plain numpy, what every update consumed: ``{"event": "start",
# "params": {...}}`` once (the trainable weights before the first update: LoRA A, the value
# head), then per step ``{"event": "step",
# "step": k, "batch": pack() arrays, "scores": [B], "updates": [(row indices, loss), ...],
# ...the trainer's own intermediates}``. bench/parity_rl.py replays those rollouts through
# TRL's update; jobs never set it.
RECORD = "rl_record"


def recorder(ctx) -> Callable[[dict], None] | None:
    extra = getattr(ctx, "extra", None) or {}
    return extra.get(RECORD)


def record(hook, **data) -> None:
    """Call ``hook`` (if any) with ``data``, arrays converted to numpy."""
    if hook is None:
        return

    def plain(x):
        if isinstance(x, mx.array):  # numpy has no bfloat16: widen it (exact)
            return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [plain(v) for v in x]
        return x

    hook(plain(data))
