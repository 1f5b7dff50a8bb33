"""Per-token cross entropy fused with the LM head, a block of tokens at a time, so that
neither the forward nor the backward pass holds the [tokens, vocab] logits (the design of
Apple's Cut Cross-Entropy and Liger's fused linear cross entropy).

Forward: for each block of tokens, logits = h @ W.T, then their log-sum-exp (in float32) and
the target's logit; only the per-token log-sum-exp survives the block. Backward: each block's
logits are recomputed and turned into dL/dh = G @ W and dL/dW = G.T @ h, with
G = softmax(logits) * dce - onehot(target) * dce. MLX evaluates lazily, so dL/dW costs nothing
when the head is frozen (LoRA): only what something consumes is computed.

The price is one more [block, vocab] matmul per block (the recompute): measured in
docs/benchmarks.md. ``token_nll`` takes the fused path for llama-layout models whose head is
a plain (unquantized, un-adapted) matrix and falls back to the model's logits otherwise.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

__all__ = [
    "BLOCK_ELEMENTS",
    "ENABLED",
    "head_weight",
    "linear_cross_entropy",
    "masked_nll_rows",
    "token_nll",
]

# Logit elements per block (tokens per block = this // vocab): 2^25 is 64 MB of bf16, 262
# tokens of a 128k vocabulary. Measured on the CPU (SmolLM2-135M, LoRA, 4 x 512, fp32): the
# peak over the weights falls from 3.53 GB (logits) to 3.40 / 3.03 / 2.82 GB at 2^27 / 2^25 / 2^23.
BLOCK_ELEMENTS = 1 << 25
# The switch (benchmarks and tests compare both paths).
ENABLED = True
# Families whose Model.__call__ is exactly head(model.model(x)) (mlx-lm's llama layout).
_PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2")


def head_weight(model: nn.Module) -> mx.array | None:
    """The LM head's [vocab, hidden] weight when the fused path reproduces ``model(x)``,
    else None (quantized or adapted heads, families that scale or cap their logits)."""
    if getattr(model, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
        return None
    head = getattr(model, "lm_head", None)
    if head is None:
        emb = inner.embed_tokens
        return emb.weight if type(emb) is nn.Embedding else None
    if type(head) is nn.Linear and "bias" not in head:
        return head.weight
    return None


def _blocks(n: int, vocab: int) -> list[tuple[int, int]]:
    rows = max(1, BLOCK_ELEMENTS // max(vocab, 1))
    return [(s, min(s + rows, n)) for s in range(0, n, rows)]


@mx.custom_function
def _fused(h: mx.array, w: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    lses, picked = [], []
    for s, e in _blocks(h.shape[0], w.shape[0]):
        z = h[s:e] @ w.T
        lses.append(mx.logsumexp(z.astype(mx.float32), axis=-1))
        picked.append(mx.take_along_axis(z, targets[s:e, None], axis=-1)[:, 0])
    lse = mx.concatenate(lses)
    return lse - mx.concatenate(picked).astype(mx.float32), lse


@_fused.vjp
def _fused_vjp(primals, cotangents, outputs):  # noqa: ANN001, ANN202 - MLX's vjp signature
    h, w, targets = primals
    d_ce, d_lse = cotangents
    lse = outputs[1]
    dt = h.dtype
    dh, dw = [], None
    for s, e in _blocks(h.shape[0], w.shape[0]):
        hb, t, ce_b = h[s:e], targets[s:e], d_ce[s:e]
        # softmax = exp(z - hi) * exp(hi - lse), hi = lse rounded to the logits' dtype, so the
        # [block, vocab] part stays in that dtype (bf16 on a GPU) and the factor is exact.
        hi = lse[s:e].astype(dt)
        scale = (mx.exp(hi.astype(mx.float32) - lse[s:e]) * (ce_b + d_lse[s:e])).astype(dt)
        g = mx.exp(hb @ w.T - hi[:, None]) * scale[:, None]
        at_target = mx.take_along_axis(g, t[:, None], axis=-1) - ce_b.astype(dt)[:, None]
        g = mx.put_along_axis(g, t[:, None], at_target, axis=-1)
        dh.append(g @ w)
        part = (g.T @ hb).astype(mx.float32)
        dw = part if dw is None else dw + part
    assert dw is not None
    return mx.concatenate(dh), dw.astype(w.dtype), mx.zeros_like(targets)


def linear_cross_entropy(h: mx.array, weight: mx.array, targets: mx.array) -> mx.array:
    """-log softmax(h @ weight.T)[target] per token, float32: ``[..., D], [V, D], [...] ->
    [...]``, without ever holding all the logits."""
    lead = targets.shape
    ce, _ = _fused(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1))
    return ce.reshape(lead)


def token_nll(model: nn.Module, inputs: mx.array, targets: mx.array, logits_ce) -> mx.array:  # noqa: ANN001
    """Per-token negative log-likelihood [B, T] (float32) of ``targets`` under ``model``: fused
    with the head where ``head_weight`` allows, else ``logits_ce(model(inputs), targets)``."""
    w = head_weight(model) if ENABLED else None
    if w is None:
        return logits_ce(model(inputs), targets)
    return linear_cross_entropy(model.model(inputs), w, targets)


def masked_nll_rows(model: nn.Module, batch: dict[str, mx.array], logits_ce) -> mx.array:  # noqa: ANN001
    """Per row, -log p(target) summed over the positions ``loss_mask`` counts: ``[B]`` float32
    (SFT's loss sums it; DPO's sequence log-probs are its negative).

    Where the batch carries ``target_index`` / ``target_weight`` (services/runtime/
    data_batches.py adds them when the mask leaves out a quarter or more of the positions) and
    the head can be fused, the LM head runs on those rows of hidden states only: chat SFT with
    its prompts masked, and DPO's answers, skip the head's matmul and log-sum-exp where the
    mask would zero them. Otherwise ``token_nll`` at every position, then the mask."""
    mask = batch["loss_mask"]
    idx = batch.get("target_index")
    w = head_weight(model) if ENABLED and idx is not None else None
    if w is None:
        return (token_nll(model, batch["inputs"], batch["targets"], logits_ce) * mask).sum(axis=1)
    h = model.model(batch["inputs"])
    h = mx.take(h.reshape(-1, h.shape[-1]), idx, axis=0)
    nll = linear_cross_entropy(h, w, mx.take(batch["targets"].reshape(-1), idx))
    rows = idx // mask.shape[1]
    return mx.zeros(mask.shape[0]).at[rows].add(nll * batch["target_weight"])
