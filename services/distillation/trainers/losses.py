"""Distillation losses: divergences, temperatures, top-k buckets and feature matching.

Pure MLX on one chunk of positions at a time. Everything is computed in float32 whatever the
model dtype, and every function returns per-position values so that the caller can mask with
`loss_mask` and sum chunk by chunk (kd.py), never holding more than one chunk of full-vocabulary
float32 log-probabilities.

Conventions: `t_*` is the teacher (P), `s_*` the student (Q); log-probabilities are over the last
axis; `temperature` is a scalar or an array broadcastable to the positions with a trailing axis
of 1 ([B, C, 1] for per-token temperatures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "total_variation")
TEMPERATURE_MODES = ("fixed", "annealed", "adaptive")
FEATURE_LOSSES = ("mse", "cosine")

# Stand-in for log(0): finite, so that 0 * (log p - log q) stays 0 and gradients stay finite.
LOG_ZERO = -1e30


def log_probs(logits: mx.array, temperature: float | mx.array = 1.0) -> mx.array:
    """float32 log-softmax of logits / temperature over the last axis."""
    z = logits.astype(mx.float32) / temperature
    return z - mx.logsumexp(z, axis=-1, keepdims=True)


def _kl(lp: mx.array, lq: mx.array) -> mx.array:
    return mx.sum(mx.exp(lp) * (lp - lq), axis=-1)


def divergence(t_logp: mx.array, s_logp: mx.array, kind: str, beta: float = 0.5) -> mx.array:
    """D(teacher || student) per position, from log-probabilities over the last axis.

    forward_kl        KL(P || Q)                       mode-covering (Hinton et al. 2015)
    reverse_kl        KL(Q || P)                       mode-seeking (MiniLLM, Gu et al. 2024)
    jsd               b KL(P || M) + (1-b) KL(Q || M),  M = b P + (1-b) Q
                      (generalised JSD of GKD, Agarwal et al. 2024; b = 0.5 is the usual JSD)
    total_variation   1/2 sum |P - Q|
    """
    if kind == "forward_kl":
        return _kl(t_logp, s_logp)
    if kind == "reverse_kl":
        return _kl(s_logp, t_logp)
    if kind == "jsd":
        m = mx.logaddexp(t_logp + math.log(beta), s_logp + math.log(1.0 - beta))
        return beta * _kl(t_logp, m) + (1.0 - beta) * _kl(s_logp, m)
    if kind == "total_variation":
        return 0.5 * mx.sum(mx.abs(mx.exp(t_logp) - mx.exp(s_logp)), axis=-1)
    raise ValueError(f"unknown divergence {kind!r}; expected one of {DIVERGENCES}")


# --- temperature -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Temperature:
    """fixed: T = initial. annealed: cosine from `initial` to `final` over training.
    adaptive: per token in [low, high] from the teacher's normalised entropy (see `adaptive`)."""

    mode: str = "fixed"
    initial: float = 2.0
    final: float = 1.0
    low: float = 1.0
    high: float = 2.0

    @classmethod
    def from_dict(cls, d: dict | None) -> Temperature:
        d = d or {}
        mode = d.get("mode") or "fixed"
        if mode == "unspecified":
            mode = "fixed"
        initial = float(d.get("initial") or 2.0)
        final = float(d.get("final") or (initial if mode == "adaptive" else 1.0))
        low = float(d.get("min") or min(1.0, final))
        return cls(mode=mode, initial=initial, final=final, low=low, high=final)

    def scheduled(self, step: int, total_steps: int) -> float:
        """The global temperature at optimiser step `step` (0-based) of `total_steps`.
        For adaptive mode this is the upper bound (the per-token value comes from the teacher)."""
        if self.mode == "fixed":
            return self.initial
        if self.mode == "annealed":
            frac = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
            return self.final + 0.5 * (self.initial - self.final) * (1.0 + math.cos(math.pi * frac))
        return self.high


def normalized_entropy(t_logp: mx.array) -> mx.array:
    """H(P) / log V in [0, 1] per position, trailing axis kept."""
    v = t_logp.shape[-1]
    h = -mx.sum(mx.exp(t_logp) * t_logp, axis=-1, keepdims=True)
    return h / math.log(v)


def adaptive(h_norm: mx.array, low: float, high: float) -> mx.array:
    """Inverse-difficulty temperature: T = high - (high - low) * h_norm.

    A confident teacher token (low entropy: an "easy" token) gets a high temperature, so that the
    student sees the teacher's whole ranking of the alternatives ("dark knowledge") instead of a
    near one-hot target; an uncertain teacher token is already soft and gets a temperature near
    `low`. docs/distillation.md gives the rule, its sources and its limits.
    """
    return mx.stop_gradient(high - (high - low) * mx.clip(h_norm, 0.0, 1.0))


# --- top-k buckets (teacher cache) -------------------------------------------------------------


def topk_buckets(t_logp: mx.array, k: int) -> tuple[mx.array, mx.array, mx.array]:
    """Teacher top-k (indices int32, log-probs) and log of the mass outside them, per position."""
    idx = mx.argpartition(-t_logp, kth=k - 1, axis=-1)[..., :k].astype(mx.int32)
    top = mx.take_along_axis(t_logp, idx, axis=-1)
    return idx, top, _rest_logmass(t_logp, idx)


def _rest_logmass(logp: mx.array, idx: mx.array) -> mx.array:
    # Masking the top-k and summing what is left is exact where 1 - sum(top) would cancel.
    hit = mx.put_along_axis(mx.zeros(logp.shape, dtype=mx.bool_), idx, mx.array(True), axis=-1)
    return mx.logsumexp(mx.where(hit, LOG_ZERO, logp), axis=-1)


def teacher_buckets(
    top: mx.array, rest: mx.array, vocab: int, temperature: float | mx.array = 1.0
) -> mx.array:
    """Tempered teacher distribution over k + 1 buckets from cached T=1 top-k log-probs.

    The tempered top-k values are exact up to normalisation; the remainder is tempered as if
    its mass were spread evenly over the other V - k tokens (the cache does not know how it is
    spread), which is exact for T = 1 and for k = V.
    """
    k = top.shape[-1]
    m = vocab - k
    if m > 0:
        rest_t = math.log(m) + (rest.astype(mx.float32) - math.log(m)) / _squeeze(temperature)
    else:
        rest_t = mx.full(rest.shape, LOG_ZERO, dtype=mx.float32)
    z = mx.concatenate([top.astype(mx.float32) / temperature, rest_t[..., None]], axis=-1)
    z = mx.maximum(z, LOG_ZERO)
    return z - mx.logsumexp(z, axis=-1, keepdims=True)


def student_buckets(s_logp: mx.array, idx: mx.array) -> mx.array:
    """Student log-probs gathered at the teacher's top-k, plus the log-mass of the rest."""
    top = mx.take_along_axis(s_logp, idx, axis=-1)
    rest = mx.maximum(_rest_logmass(s_logp, idx), LOG_ZERO)
    return mx.concatenate([top, rest[..., None]], axis=-1)


def bucket_entropy(top: mx.array, rest: mx.array, vocab: int) -> mx.array:
    """Normalised entropy of a cached teacher distribution (remainder spread evenly)."""
    m = vocab - top.shape[-1]
    top = top.astype(mx.float32)
    h = -mx.sum(mx.exp(top) * top, axis=-1, keepdims=True)
    if m > 0:
        r = rest.astype(mx.float32)[..., None]
        h = h - mx.exp(r) * (r - math.log(m))
    return h / math.log(vocab)


def _squeeze(t: float | mx.array) -> float | mx.array:
    return t[..., 0] if isinstance(t, mx.array) and t.ndim > 0 else t


# --- teacher mixtures --------------------------------------------------------------------------


def mix(t_logps: list[mx.array], log_w: mx.array | None) -> mx.array:
    """log sum_i w_i P_i: mixture in probability space. `log_w` is [B, N] (rows may differ:
    routing is a one-hot row) or None for a single teacher."""
    if len(t_logps) == 1:
        return t_logps[0]
    stacked = mx.stack(t_logps, axis=0)  # [N, B, C, V]
    lw = mx.maximum(log_w.T, LOG_ZERO)[:, :, None, None]
    return mx.logsumexp(stacked + lw, axis=0)


def log_weights(weights: mx.array) -> mx.array:
    """[B, N] row weights (each row sums to 1) -> log, with log 0 kept finite."""
    return mx.log(mx.maximum(weights, 1e-38)).astype(mx.float32)


# --- per-position objective terms --------------------------------------------------------------


@dataclass(frozen=True)
class KDSettings:
    alpha: float = 0.5
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    temperature: Temperature = Temperature()


def cross_entropy(s_logits: mx.array, targets: mx.array) -> mx.array:
    # logsumexp - target logit: no second full-vocabulary log-prob array per chunk.
    z = s_logits.astype(mx.float32)
    picked = mx.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return mx.logsumexp(z, axis=-1) - picked


def token_terms(
    s_logits: mx.array,
    t_logits: list[mx.array],
    weights: mx.array,
    targets: mx.array,
    temperature: mx.array,
    cfg: KDSettings,
) -> dict[str, mx.array]:
    """Per-position CE, T^2 * D(teacher mixture || student), per-teacher T^2 * D and T.

    `t_logits` are sliced to the shared vocabulary V (the student's logits are cut to the same
    V for the divergence; CE uses all of them); `weights` [B, N] are the row mixture weights
    (normalised weights, or one-hot rows when routing); `temperature` is the scheduled scalar
    (ignored in adaptive mode).
    """
    ce = cross_entropy(s_logits, targets)
    s_logits = s_logits[..., : t_logits[0].shape[-1]]
    log_w = log_weights(weights)
    if cfg.temperature.mode == "adaptive":
        t1 = mix([log_probs(t) for t in t_logits], log_w)
        temp = adaptive(normalized_entropy(t1), cfg.temperature.low, cfg.temperature.high)
    else:
        temp = mx.broadcast_to(temperature.astype(mx.float32), (*targets.shape, 1))
    s_lp = log_probs(s_logits, temp)
    t_lps = [mx.stop_gradient(log_probs(t, temp)) for t in t_logits]
    scale = mx.square(temp[..., 0])
    kd = scale * divergence(mix(t_lps, log_w), s_lp, cfg.divergence, cfg.jsd_beta)
    if len(t_lps) == 1:
        per_teacher = [kd]
    else:
        s_fixed = mx.stop_gradient(s_lp)
        per_teacher = [scale * divergence(t, s_fixed, cfg.divergence, cfg.jsd_beta) for t in t_lps]
    return {
        "ce": ce,
        "kd": kd,
        "kd_teachers": mx.stop_gradient(mx.stack(per_teacher, axis=-1)),  # [B, C, N]
        "temperature": temp[..., 0],
    }


def cached_token_terms(
    s_logits: mx.array,
    t_idx: mx.array,
    t_top: mx.array,
    t_rest: mx.array,
    targets: mx.array,
    temperature: mx.array,
    cfg: KDSettings,
    vocab: int | None = None,
) -> dict[str, mx.array]:
    """Like `token_terms`, with the (already mixed) teacher given as cached T=1 top-k log-probs
    plus the remainder mass over the shared vocabulary `vocab` (default: the student's): the
    divergence is taken over the k + 1 buckets."""
    ce = cross_entropy(s_logits, targets)
    vocab = vocab or s_logits.shape[-1]
    s_logits = s_logits[..., :vocab]
    if cfg.temperature.mode == "adaptive":
        h = bucket_entropy(t_top, t_rest, vocab)
        temp = adaptive(h, cfg.temperature.low, cfg.temperature.high)
    else:
        temp = mx.broadcast_to(temperature.astype(mx.float32), (*targets.shape, 1))
    s_b = student_buckets(log_probs(s_logits, temp), t_idx)
    t_b = mx.stop_gradient(teacher_buckets(t_top, t_rest, vocab, temp))
    kd = mx.square(temp[..., 0]) * divergence(t_b, s_b, cfg.divergence, cfg.jsd_beta)
    return {
        "ce": ce,
        "kd": kd,
        "kd_teachers": mx.stop_gradient(kd)[..., None],
        "temperature": temp[..., 0],
    }


# --- feature matching --------------------------------------------------------------------------


def feature_distance(s_h: mx.array, t_h: mx.array, kind: str) -> mx.array:
    """Per-position distance between (projected) student and teacher hidden states, float32.
    mse: mean over the hidden axis of the squared difference; cosine: 1 - cos(s, t)."""
    s_h = s_h.astype(mx.float32)
    t_h = mx.stop_gradient(t_h.astype(mx.float32))
    if kind == "mse":
        return mx.mean(mx.square(s_h - t_h), axis=-1)
    if kind == "cosine":
        num = mx.sum(s_h * t_h, axis=-1)
        den = mx.linalg.norm(s_h, axis=-1) * mx.linalg.norm(t_h, axis=-1)
        return 1.0 - num / mx.maximum(den, 1e-8)
    raise ValueError(f"unknown feature loss {kind!r}; expected one of {FEATURE_LOSSES}")


def masked_sums(terms: dict[str, mx.array], mask: mx.array, weights: mx.array) -> dict:
    """Sum the per-position terms over counted positions (mask [B, C]). Per-teacher sums count a
    row for teacher i when its weight is > 0 (all rows for a mixture, its rows when routing)."""
    mask = mask.astype(mx.float32)
    used = (weights > 0).astype(mx.float32)[:, None, :] * mask[..., None]  # [B, C, N]
    return {
        "ce": mx.sum(terms["ce"] * mask),
        "kd": mx.sum(terms["kd"] * mask),
        "temperature": mx.sum(terms["temperature"] * mask),
        "kd_teachers": mx.sum(terms["kd_teachers"] * used, axis=(0, 1)),
        "teacher_tokens": mx.sum(used, axis=(0, 1)),
        "tokens": mx.sum(mask),
    }


# --- sequence chunking -------------------------------------------------------------------------


def chunked_sum(fn, params: dict, diff: list, seq: list, consts: list, length: int, chunk: int):
    """sum_c fn(params, [x[:, c] for x in diff], [y[:, c] for y in seq], consts) over chunks c of
    the sequence axis (1), forward and backward one chunk after another.

    `fn` returns a dict of arrays (sums). Gradients flow to `params` and `diff` only. The
    backward recomputes each chunk (as mx.checkpoint would) and `mx.depends` chains the chunks,
    so that the graph scheduler cannot run them side by side: peak memory holds one chunk's
    full-vocabulary intermediates, whatever the sequence length.
    """
    keys = sorted(params)
    n_p, n_d, n_s = len(keys), len(diff), len(seq)
    starts = list(range(0, length, chunk))
    out_keys: list[str] = []

    def one(flat: list, i: int, dep: list | None) -> list:
        p = dict(zip(keys, flat[:n_p], strict=True))
        sl = slice(starts[i], starts[i] + chunk)
        xs = [x[:, sl] for x in flat[n_p : n_p + n_d + n_s]]
        if dep:
            xs = list(mx.depends(xs, dep))
        out = fn(p, xs[:n_d], xs[n_d:], flat[n_p + n_d + n_s :])
        out_keys[:] = sorted(out)
        return [out[k] for k in out_keys]

    @mx.custom_function
    def run(*flat):
        total: list = []
        for i in range(len(starts)):
            vals = one(list(flat), i, total)
            total = [a + b for a, b in zip(total, vals, strict=True)] if total else vals
        return total

    @run.vjp
    def run_vjp(primals, cotangents, _outputs):
        primals = list(primals)
        grads = [mx.zeros_like(x) for x in primals[:n_p]]
        pieces: list[list] = []
        dep: list = []
        for i in range(len(starts)):
            sl = slice(starts[i], starts[i] + chunk)
            xs = [x[:, sl] for x in primals[n_p : n_p + n_d]]
            if dep:
                xs = list(mx.depends(xs, dep))

            def f(*args, i=i):
                flat = [*args[:n_p], *primals[n_p : n_p + n_d], *primals[n_p + n_d :]]
                p = dict(zip(keys, args[:n_p], strict=True))
                sl = slice(starts[i], starts[i] + chunk)
                ys = [y[:, sl] for y in flat[n_p + n_d : n_p + n_d + n_s]]
                out = fn(p, list(args[n_p:]), ys, flat[n_p + n_d + n_s :])
                return [out[k] for k in out_keys]

            _, g = mx.vjp(f, [*primals[:n_p], *xs], list(cotangents))
            grads = [a + b for a, b in zip(grads, g[:n_p], strict=True)]
            pieces.append(g[n_p:])
            dep = grads + g[n_p:]
        diff_grads = [mx.concatenate([pc[j] for pc in pieces], axis=1) for j in range(n_d)]
        rest = [mx.zeros_like(x) for x in primals[n_p + n_d :]]
        return [*grads, *diff_grads, *rest]

    vals = run(*[params[k] for k in keys], *diff, *seq, *consts)
    return dict(zip(out_keys, vals, strict=True))
