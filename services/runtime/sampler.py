"""Batched sampling of token ids with per-token log-probs, reproducibly (no gRPC).

Prompts of different lengths are left-padded into mlx-lm's batch KV caches (the same
caches its ``batch_generate`` uses), so one forward per new token serves the whole batch.
Sampling draws from an explicit ``mx.random`` key rather than the global RNG, so the same
key, model and prompts give the same tokens in any process: PPO / GRPO sample their
rollouts with it locally, and the GenerationService's SampleTokens runs the very same code
(``key_from_seed`` / ``seed_of_key`` carry a key across the wire as one uint64).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import _merge_caches
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import apply_top_k, apply_top_p

StopCheck = Callable[[], "str | None"]


class Stopped(Exception):  # noqa: N818 - a control-flow signal, not an error to report
    """Sampling ended early: the caller's deadline passed or it went away."""


class SamplingLike(Protocol):
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    stop: tuple[str, ...]


def seed_of_key(key: mx.array) -> int:
    """The uint64 whose ``mx.random.key`` is ``key`` (two uint32s, high word first)."""
    hi, lo = (int(x) for x in key.tolist())
    return (hi << 32) | lo


def key_from_seed(seed: int) -> mx.array:
    return mx.random.key(int(seed) % 2**64)


def pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pad)


def eos_ids(tokenizer: Any) -> frozenset[int]:
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


@dataclass
class Rollout:
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    # log p(token) under the (temperature-scaled, untruncated) sampling distribution.
    logprobs: list[list[float]]
    # True when the completion ended with an end-of-sequence token or a stop string.
    finished: list[bool]


def _sample(logits: mx.array, s: SamplingLike, key: mx.array) -> tuple[mx.array, mx.array]:
    logits = logits.astype(mx.float32)
    if s.temperature <= 0:
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tok = mx.argmax(logp, axis=-1)
    else:
        scaled = logits / s.temperature
        logp = scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)
        filtered = logp
        if 0 < s.top_k < logp.shape[-1]:
            filtered = apply_top_k(filtered, s.top_k)
        if 0 < s.top_p < 1:
            filtered = apply_top_p(filtered, s.top_p)
        tok = mx.random.categorical(filtered, key=key)
    return tok, mx.take_along_axis(logp, tok[:, None], axis=-1).squeeze(-1)


def generate(
    model: nn.Module,
    prompts: list[list[int]],
    sampling: SamplingLike,
    key: mx.array,
    *,
    eos_ids: set[int] | frozenset[int],
    pad_id: int = 0,
    tokenizer=None,
    should_stop: StopCheck | None = None,
) -> Rollout:
    """Sample one completion per prompt (repeat a prompt in ``prompts`` for a group).

    The completion ends after the first end-of-sequence token (kept: learning to stop is
    part of the policy) or at ``max_tokens``; with ``sampling.stop`` and a tokenizer it is
    cut before the first stop string. ``should_stop`` (a server's deadline / cancel check)
    is asked before every new token; an answer raises Stopped.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every rollout prompt needs at least one token")
    was_training = model.training
    model.eval()
    try:
        ids, lps, done = _decode(model, prompts, sampling, key, eos_ids, pad_id, should_stop)
    finally:
        model.train(was_training)
    completions, logprobs, finished = [], [], []
    for r in range(len(prompts)):
        toks, lp = ids[r], lps[r]
        stop_at = next((i for i, t in enumerate(toks) if t in eos_ids), None)
        if stop_at is not None:
            toks, lp = toks[: stop_at + 1], lp[: stop_at + 1]
        hit = stop_at is not None
        if sampling.stop and tokenizer is not None:
            cut = _stop_cut(tokenizer, toks, sampling.stop)
            if cut is not None:
                toks, lp, hit = toks[:cut], lp[:cut], True
        completions.append(toks)
        logprobs.append(lp)
        finished.append(hit)
    return Rollout([list(p) for p in prompts], completions, logprobs, finished)


def _decode(model, prompts, sampling, key, eos_ids, pad_id, should_stop=None):
    B = len(prompts)
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    batch = mx.array([[pad_id] * n + list(p) for n, p in zip(pads, prompts, strict=True)])
    cache = _merge_caches([make_prompt_cache(model) for _ in range(B)])
    for c in cache:
        c.prepare(left_padding=pads)
    logits = model(batch, cache=cache)[:, -1, :]
    eos = mx.array(sorted(eos_ids) or [-1])
    toks, lps = [], []
    done = mx.zeros((B,), dtype=mx.bool_)
    for _ in range(sampling.max_tokens):
        if should_stop is not None and (reason := should_stop()):
            raise Stopped(reason)
        key, sub = mx.random.split(key)
        tok, lp = _sample(logits, sampling, sub)
        done = done | (tok[:, None] == eos[None, :]).any(axis=1)
        mx.eval(tok, lp, done)
        toks.append(tok)
        lps.append(lp)
        if done.all().item():
            break
        logits = model(tok[:, None], cache=cache)[:, -1, :]
    ids = mx.stack(toks, axis=1).tolist()
    logprobs = mx.stack(lps, axis=1).tolist()
    return ids, logprobs, done.tolist()


def _stop_cut(tokenizer, toks: list[int], stops: tuple[str, ...]) -> int | None:
    """Smallest token count whose decoded text contains a stop string; that token and the
    rest are dropped (the stop string's tokens included)."""
    text = tokenizer.decode(toks)
    if not any(s in text for s in stops):
        return None
    for n in range(1, len(toks) + 1):
        if any(s in tokenizer.decode(toks[:n]) for s in stops):
            return n - 1
    return None
