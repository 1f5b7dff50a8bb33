"""The knowledge-distillation objective: ``make_loss_fn`` for the shared loop, and the
reported metrics.

loss = (1 - alpha) * CE + alpha * mean_t T_t^2 * D(teacher_T || student_T) + w_f * feature loss

Split from kd.py (which re-exports both names): losses.py holds the per-token terms and the
chunked sums; this module wires them to the student and teacher forwards (live teachers or
the cached top-k) and turns the summed terms into the loss and the reported metrics, so it
can be read and tested apart from the run's setup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from services.distillation import validate as validation
from services.distillation.trainers import losses, student, teachers
from services.distillation.trainers.student import PROJ


def make_loss_fn(
    c: validation.DistillConfig,
    ts: list[teachers.Teacher],
    vocab: int,
    pairs: list[tuple[int, int]],
    cached: bool,
    chunked: bool = True,
    blockwise: bool = True,
) -> Callable[[Any, dict[str, Any]], tuple[mx.array, mx.array, dict[str, mx.array]]]:
    """loss_fn(model, batch) -> (loss, tokens, metrics) for the shared loop. `blockwise`: the
    student has the llama layout (else its full logits feed the chunks; see student.forward)."""
    kd_cfg = losses.KDSettings(c.alpha, c.divergence, c.jsd_beta, c.temperature)
    s_cap, t_cap = [s for s, _ in pairs], [t for _, t in pairs]
    n = len(c.teachers)
    per_teacher = not (cached and n > 1 and not c.route_field)

    def loss_fn(model, batch):
        inputs, length = batch["inputs"], batch["inputs"].shape[1]
        s_h, s_feats = student.forward(model, inputs, s_cap, blockwise)
        t_hs, t_feats = [], {}
        if not cached:
            outs = [
                teachers.teacher_hidden(t, inputs, t_cap if i == 0 else ())
                for i, t in enumerate(ts)
            ]
            t_hs, t_feats = [o[0] for o in outs], outs[0][1]
        head = student.head_module(model) if blockwise else None

        seq_keys = ["targets", "loss_mask"] + (["t_idx", "t_top", "t_rest"] if cached else [])

        def chunk_sums(head_params, diff, seq, consts):
            (s_hc,) = diff
            t_hcs, x = seq[: len(t_hs)], dict(zip(seq_keys, seq[len(t_hs) :], strict=True))
            w, temp = consts
            if head_params:
                head.update(tree_unflatten(list(head_params.items())))
            s_logits = student.head(model, s_hc, blockwise)
            if cached:
                terms = losses.cached_token_terms(
                    s_logits, x["t_idx"], x["t_top"], x["t_rest"], x["targets"], temp, kd_cfg, vocab
                )
            else:
                t_logits = [
                    teachers.head_logits(t, mx.stop_gradient(h), vocab)
                    for t, h in zip(ts, t_hcs, strict=True)
                ]
                terms = losses.token_terms(s_logits, t_logits, w, x["targets"], temp, kd_cfg)
            return losses.masked_sums(terms, x["loss_mask"], w)

        params = dict(tree_flatten(head.trainable_parameters())) if head is not None else {}
        seq = [*t_hs, *(batch[k] for k in seq_keys)]
        consts = [batch["teacher_weights"], batch["temperature"]]
        if chunked:
            total = losses.chunked_sum(chunk_sums, params, [s_h], seq, consts, length, c.chunk_size)
        else:
            total = chunk_sums(params, [s_h], seq, consts)
        ntok = total["tokens"]
        denom = mx.maximum(ntok, 1.0)
        ce, kd = total["ce"] / denom, total["kd"] / denom
        feat = mx.array(0.0)
        for k, (si, ti) in enumerate(pairs):
            d = losses.feature_distance(model[PROJ](k, s_feats[si]), t_feats[ti], c.features.loss)
            feat = feat + mx.sum(d * batch["loss_mask"]) / denom / len(pairs)
        loss = (1 - c.alpha) * ce + c.alpha * kd + c.features.weight * feat
        metrics = {
            "ce_loss": ce,
            "kd_loss": kd,
            "feature_loss": feat,
            "temperature": total["temperature"] / denom,
        }
        if per_teacher:
            # Token-weighted sums the loop can average over steps; `finish_metrics` divides.
            for i in range(n):
                metrics[f"kd_teacher_{i}"] = total["kd_teachers"][i] / denom
                metrics[f"kd_teacher_{i}_tokens"] = total["teacher_tokens"][i] / denom
        return loss, ntok, metrics

    return loss_fn


def finish_metrics(m: dict[str, float], n: int) -> dict[str, float]:
    """Reported metrics: `loss` (= train_loss); `temperature` (the schedule's value, not a
    batch mean); and, for the training batches (train_) and the validation set (val_),
    kd_teacher_i as the mean over the tokens that teacher i scored (absent when it scored
    none, e.g. no routed rows), kd_teacher_i_tokens the fraction of counted tokens it
    scored. val_kd_loss is the held-out teacher-student divergence."""
    out = {"loss": m.get("train_loss", 0.0), **m}
    if "train_temperature" in out:
        out["temperature"] = out.pop("train_temperature")
    out.pop("val_temperature", None)
    for split in ("train", "val"):
        for i in range(n):
            frac = out.get(f"{split}_kd_teacher_{i}_tokens")
            if frac is None:
                continue
            if frac > 0:
                out[f"{split}_kd_teacher_{i}"] = out[f"{split}_kd_teacher_{i}"] / frac
            else:
                out.pop(f"{split}_kd_teacher_{i}", None)
    return out
