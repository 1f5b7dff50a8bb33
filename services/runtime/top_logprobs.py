"""Top-k next-token log-probabilities of given token sequences, no gRPC: what a remote
distillation teacher serves (GenerationService.TopLogprobs, docs/remote.md).

The values are the ones a local teacher puts in its top-k cache (services/distillation/
trainers/teachers.py): float32 log-softmax at T = 1 over the first ``vocab`` ids, the top-k
ids and log-probs, and the log of the mass outside them, computed exactly by masking the
top-k and summing the rest (never as 1 - sum, which cancels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from services.runtime.errors import InvalidArgument
from services.runtime.generation import ModelCache, Stopped
from services.runtime.tokenizer_sig import fingerprint, tokenizer_json, tokenizer_signature

MAX_TOP_K = 1024
LOG_ZERO = -1e30  # as services.distillation.trainers.losses.LOG_ZERO
BATCH_TOKENS = 2048  # padded tokens per forward: bounds the [tokens, vocab] fp32 logits


@dataclass
class TopK:
    idx: np.ndarray  # int32 [n, k], highest first
    top: np.ndarray  # float32 [n, k]
    rest: np.ndarray  # float32 [n]


@dataclass
class ModelInfo:
    fingerprint: str
    vocab_size: int
    num_layers: int
    hidden_size: int
    tokenizer_json: str | None


def output_width(model) -> int:  # noqa: ANN001
    size = getattr(getattr(model, "args", None), "vocab_size", None)
    if size:
        return int(size)
    return int(model(mx.array([[0]])).shape[-1])


def describe(cache: ModelCache, path: str, adapter: str | None) -> ModelInfo:
    with cache.lock:
        model, tokenizer = cache.get(path, adapter)
        args = getattr(model, "args", None)
        return ModelInfo(
            fingerprint(tokenizer_signature(tokenizer)),
            output_width(model),
            int(getattr(args, "num_hidden_layers", 0) or len(getattr(model, "layers", []))),
            int(getattr(args, "hidden_size", 0) or 0),
            tokenizer_json(tokenizer),
        )


def buckets(logits: mx.array, k: int) -> tuple[mx.array, mx.array, mx.array]:
    """Top-k (sorted, highest first) and rest log-mass of float32 log-softmax(logits)."""
    z = logits.astype(mx.float32)
    logp = z - mx.logsumexp(z, axis=-1, keepdims=True)
    idx = mx.argpartition(-logp, kth=k - 1, axis=-1)[..., :k]
    top = mx.take_along_axis(logp, idx, axis=-1)
    order = mx.argsort(-top, axis=-1)
    idx, top = mx.take_along_axis(idx, order, axis=-1), mx.take_along_axis(top, order, axis=-1)
    hit = mx.put_along_axis(mx.zeros(logp.shape, dtype=mx.bool_), idx, mx.array(True), axis=-1)
    rest = mx.logsumexp(mx.where(hit, LOG_ZERO, logp), axis=-1)
    return idx.astype(mx.int32), top, rest


def check_request(
    seqs: Sequence[Sequence[int]],
    k: int,
    vocab: int,
    max_tokens: int,
    max_items: int,
    vocab_limit: int = 0,
) -> None:
    """``vocab``: the model's width (ids must be below it); top_k must fit the vocabulary the
    distribution is over (``vocab_limit`` when set)."""
    if vocab_limit < 0:
        raise InvalidArgument.one("vocab_limit", "must be >= 0 (0 = the whole vocabulary)")
    over = min(vocab_limit, vocab) if vocab_limit else vocab
    if not seqs:
        raise InvalidArgument.one("sequences", "must not be empty")
    if len(seqs) > max_items:
        raise InvalidArgument.one(
            "sequences", f"{len(seqs)} sequences; at most {max_items} (MLXU_SCORE_MAX_ITEMS)"
        )
    if not 1 <= k <= min(MAX_TOP_K, over):
        raise InvalidArgument.one("top_k", f"must be in [1, {min(MAX_TOP_K, over)}]")
    for i, s in enumerate(seqs):
        if not s:
            raise InvalidArgument.one(f"sequences[{i}].token_ids", "is empty")
        if len(s) > max_tokens:
            raise InvalidArgument.one(
                f"sequences[{i}].token_ids",
                f"is {len(s)} tokens; at most {max_tokens} (MLXU_GENERATE_MAX_PROMPT_TOKENS)",
            )
        if min(s) < 0 or max(s) >= vocab:
            raise InvalidArgument.one(
                f"sequences[{i}].token_ids", f"holds an id outside [0, {vocab})"
            )


def top_logprobs(
    cache: ModelCache,
    path: str,
    adapter: str | None,
    seqs: Sequence[Sequence[int]],
    k: int,
    *,
    vocab_limit: int = 0,
    should_stop: Callable[[], str | None] = lambda: None,
    max_tokens: int = 1 << 30,
    max_items: int = 1 << 30,
) -> tuple[list[TopK], int]:
    """The top-k of every position of every sequence, and the vocabulary they are over.
    Sequences are batched by length (right padding: causal attention keeps the real
    positions exact) up to BATCH_TOKENS padded tokens per forward."""
    with cache.lock:
        model, _tok = cache.get(path, adapter)
        width = output_width(model)
        check_request(seqs, k, width, max_tokens, max_items, vocab_limit)
        vocab = min(vocab_limit, width) if vocab_limit > 0 else width
        out: list[TopK | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        start = 0
        while start < len(order):
            if reason := should_stop():
                raise Stopped(reason)
            longest = len(seqs[order[start]])
            end = start + 1
            while end < len(order) and (end - start + 1) * len(seqs[order[end]]) <= BATCH_TOKENS:
                end += 1
            rows = order[start:end]
            longest = len(seqs[rows[-1]])
            toks = np.zeros((len(rows), longest), np.int32)
            for r, i in enumerate(rows):
                toks[r, : len(seqs[i])] = seqs[i]
            logits = model(mx.array(toks))[..., :vocab]
            idx, top, rest = buckets(logits, k)
            mx.eval(idx, top, rest)
            idx_np, top_np, rest_np = np.array(idx), np.array(top), np.array(rest)
            for r, i in enumerate(rows):
                n = len(seqs[i])
                out[i] = TopK(idx_np[r, :n], top_np[r, :n], rest_np[r, :n])
            start = end
        return out, vocab  # type: ignore[return-value]
