"""Teachers: loading (full, base + adapter, quantized), tokenizer checks, vocabulary slicing,
mixture weights and per-row routing, and the optional top-k teacher cache.

The cache holds, for every training row and position, the combined teacher distribution at
T = 1 (the weighted mixture, or the routed teacher) as its top-k log-probabilities plus the
log of the remaining mass (one extra bucket). See losses.cached_token_terms for the loss on it
and docs/distillation.md for what that approximates.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from services.distillation.trainers import losses, student
from services.runtime.errors import InvalidArgument
from services.runtime.phases import Phase, duration
from services.runtime.tokenizer_sig import (  # noqa: F401 - re-exported
    fingerprint,
    same_tokenizer,
    signature_from_dir,
    tokenizer_signature,
)
from services.schema.common import RemoteSettings

CACHE_DIR = "teacher_cache"
# (row weights [B, N], inputs [B, L], positions to score per row) -> idx, top, rest (numpy)
Scorer = Callable[[mx.array, mx.array, Sequence[int]], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class TeacherSpec:
    model: str
    adapter_path: str = ""
    weight: float = 1.0
    route_value: str = ""
    quantize_bits: int = 0
    remote: RemoteSettings | None = None  # None: loaded here (teacher_backends.py)

    def key_dict(self) -> dict:
        """What identifies the teacher's outputs (the cache key): a local teacher's fields as
        before; a remote one adds where it runs and the model it is asked for."""
        d = {k: v for k, v in self.__dict__.items() if k != "remote"}
        if self.remote is not None and self.remote.enabled:
            r = self.remote
            d["remote"] = {"kind": r.kind, "address": r.address, "model": r.model}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TeacherSpec:
        ref = d.get("model") or {}
        if isinstance(ref, str):
            ref = {"model": ref}
        w = d.get("weight")
        return cls(
            model=str(ref.get("model") or ""),
            adapter_path=str(ref.get("adapter_path") or ""),
            weight=1.0 if w is None or w == 0 else float(w),
            route_value=str(d.get("route_value") or ""),
            quantize_bits=int(d.get("quantize_bits") or 0),
        )


@dataclass
class Teacher:
    spec: TeacherSpec
    model: nn.Module
    tokenizer: Any
    blockwise: bool = True  # llama layout: hidden states per block, logits per chunk


def load_teacher(spec: TeacherSpec, index: int, dtype: str = "float32") -> Teacher:
    from services.runtime.models import load_model, quantize

    field = f"spec.teachers[{index}].model"
    model, tokenizer = load_model(spec.model, spec.adapter_path or None, dtype, field=field)
    if spec.quantize_bits and not _is_quantized(model):
        quantize(model, bits=spec.quantize_bits, field=f"spec.teachers[{index}].quantize_bits")
        mx.eval(model.parameters())
    model.freeze()
    model.eval()
    return Teacher(spec, model, tokenizer, student.blockwise_ok(model))


def _is_quantized(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for _, m in model.named_modules()
    )


# --- tokenizers and vocabularies ---------------------------------------------------------------


def check_tokenizers(student_sig: dict, teacher_sigs: Sequence[dict | None]) -> None:
    """InvalidArgument naming every teacher whose tokenizer is not the student's."""
    bad = [
        i
        for i, sig in enumerate(teacher_sigs)
        if sig is not None and not same_tokenizer(student_sig, sig)
    ]
    if bad:
        raise InvalidArgument(
            [
                _violation(
                    f"spec.teachers[{i}].model",
                    f"teachers[{i}] uses a different tokenizer than the student",
                )
                for i in bad
            ]
        )


def _violation(field: str, description: str):
    from services.runtime.errors import Violation

    return Violation(field, description)


def output_vocab(model: nn.Module) -> int:
    """Width of the model's logits."""
    args = getattr(model, "args", None)
    size = getattr(args, "vocab_size", None)
    if size:
        return int(size)
    head = student.head_module(model)
    return int(head.weight.shape[0])


# --- mixture weights and routing ---------------------------------------------------------------


def normalized_weights(specs: Sequence[TeacherSpec]) -> np.ndarray:
    w = np.asarray([s.weight for s in specs], np.float64)
    return (w / w.sum()).astype(np.float32)


def route_rows(
    rows: Sequence[dict], route_field: str, specs: Sequence[TeacherSpec], field: str
) -> list[int]:
    """Teacher index of every row (by `route_field` == route_value); a row that matches no
    teacher is InvalidArgument naming the row (1-based, as the dataset errors do)."""
    index = {s.route_value: i for i, s in enumerate(specs)}
    out = []
    for n, row in enumerate(rows, 1):
        value = row.get(route_field)
        key = value if isinstance(value, str) else json.dumps(value)
        if value is None or key not in index:
            known = ", ".join(repr(s.route_value) for s in specs)
            what = f"has no {route_field!r}" if value is None else f"{route_field}={value!r}"
            raise InvalidArgument.one(
                field, f"row {n}: {what} matches no teacher's route_value ({known})"
            )
        out.append(index[key])
    return out


def row_weights(
    route: Sequence[int] | None, weights: np.ndarray, rows: Sequence[int]
) -> np.ndarray:
    """[B, N] mixture weights of the batch rows (item indices, -1 = padding row): the normalised
    weights, or the one-hot routed teacher."""
    n = len(weights)
    if route is None:
        return np.tile(weights, (len(rows), 1))
    out = np.zeros((len(rows), n), np.float32)
    for r, i in enumerate(rows):
        out[r, route[i] if i >= 0 else 0] = 1.0
    return out


# --- teacher forward ---------------------------------------------------------------------------


def teacher_hidden(
    teacher: Teacher, inputs: mx.array, capture: Sequence[int] = ()
) -> tuple[mx.array, dict[int, mx.array]]:
    """Final hidden states and captured block outputs (no gradient); logits come per chunk."""
    h, feats = student.forward(teacher.model, inputs, capture, teacher.blockwise)
    return mx.stop_gradient(h), {k: mx.stop_gradient(v) for k, v in feats.items()}


def head_logits(teacher: Teacher, h: mx.array, vocab: int) -> mx.array:
    return student.head(teacher.model, h, teacher.blockwise)[..., :vocab]


def combined_topk(
    teachers: Sequence[Teacher],
    weights: mx.array,
    inputs: mx.array,
    vocab: int,
    k: int,
    chunk: int = 128,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k (indices, log-probs) and rest log-mass of the T=1 teacher mixture for [B, L]
    inputs with [B, N] row weights, computed chunk by chunk; numpy [B, L, k], [B, L, k], [B, L]."""
    hs = [teacher_hidden(t, inputs)[0] for t in teachers]
    log_w = losses.log_weights(weights)
    parts: list[tuple[np.ndarray, ...]] = []
    for s in range(0, inputs.shape[1], chunk):
        lps = [
            losses.log_probs(head_logits(t, h[:, s : s + chunk], vocab))
            for t, h in zip(teachers, hs, strict=True)
        ]
        idx, top, rest = losses.topk_buckets(losses.mix(lps, log_w), k)
        mx.eval(idx, top, rest)
        parts.append((np.array(idx), np.array(top), np.array(rest)))
    return tuple(np.concatenate([p[i] for p in parts], axis=1) for i in range(3))  # type: ignore[return-value]


class TeacherCache:
    """Top-k teacher log-probs of every row of one split, stored as safetensors.

    Layout of `<dir>/<split>.safetensors`: idx int32 [T, k], top float32 [T, k], rest float32
    [T], offsets int64 [rows + 1] (row r owns positions offsets[r]:offsets[r+1], one per
    target: position j predicts token j + 1). The metadata key fingerprints teachers, weights,
    routing, k, vocabulary and every row's tokens, so a resumed job (or a later epoch) reuses
    the file and any change rebuilds it.
    """

    def __init__(self, path: Path, arrays: dict[str, np.ndarray], vocab: int) -> None:
        self.path = path
        self.idx, self.top, self.rest = arrays["idx"], arrays["top"], arrays["rest"]
        self.offsets = arrays["offsets"]
        self.k = int(self.idx.shape[1])
        self.vocab = vocab

    @staticmethod
    def key(
        specs: Sequence[TeacherSpec],
        route: Sequence[int] | None,
        k: int,
        vocab: int,
        items: Sequence[Sequence[int]],
    ) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([[s.key_dict() for s in specs], k, vocab]).encode())
        h.update(np.asarray(route if route is not None else [], np.int64).tobytes())
        for toks in items:
            h.update(np.asarray(toks, np.int32).tobytes() + b"|")
        return h.hexdigest()

    @classmethod
    def open_or_build(
        cls,
        directory: Path,
        split: str,
        score: Scorer | None,
        specs: Sequence[TeacherSpec],
        weights: np.ndarray,
        route: Sequence[int] | None,
        items: Sequence[Sequence[int]],
        *,
        k: int,
        vocab: int,
        batch_size: int = 4,
        log: Any = None,
    ) -> TeacherCache:
        key = cls.key(specs, route, k, vocab, items)
        path = Path(directory) / f"{split}.safetensors"
        if path.exists():
            arrays, meta = mx.load(str(path), return_metadata=True)
            if meta.get("key") == key:
                return cls(path, {n: np.array(a) for n, a in arrays.items()}, vocab)
        if score is None:
            raise RuntimeError("teacher cache is stale and no teacher is loaded to rebuild it")
        what = f"caching the teachers' top-{k} of the {split} split"
        phase = Phase(log, what, len(items), "rows")
        order = sorted(range(len(items)), key=lambda i: len(items[i]))
        per_row: list[tuple[np.ndarray, ...] | None] = [None] * len(items)
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            longest = max(len(items[i]) for i in rows)
            toks = np.zeros((len(rows), max(longest - 1, 1)), np.int32)
            for r, i in enumerate(rows):
                toks[r, : len(items[i]) - 1] = items[i][:-1]
            w = mx.array(row_weights(route, weights, rows))
            idx, top, rest = score(w, mx.array(toks), [len(items[i]) - 1 for i in rows])
            for r, i in enumerate(rows):
                n = len(items[i]) - 1
                per_row[i] = (idx[r, :n], top[r, :n], rest[r, :n])
            phase.advance(len(rows))
        lengths = [len(p[0]) for p in per_row]  # type: ignore[index]
        arrays = {
            "idx": np.concatenate([p[0] for p in per_row]).astype(np.int32),  # type: ignore[index]
            "top": np.concatenate([p[1] for p in per_row]).astype(np.float32),  # type: ignore[index]
            "rest": np.concatenate([p[2] for p in per_row]).astype(np.float32),  # type: ignore[index]
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        mx.save_safetensors(
            str(tmp), {n: mx.array(a) for n, a in arrays.items()}, metadata={"key": key}
        )
        os.replace(tmp, path)
        if log:
            log(f"teacher cache: {len(items)} {split} rows in {duration(phase.elapsed)}, at {path}")
        return cls(path, arrays, vocab)

    def lookup(self, rows: Sequence[int], length: int) -> dict[str, mx.array]:
        """Batch arrays [B, length, k] / [B, length] for item indices (-1 = padding row);
        positions past a row's end hold an empty top-k and all mass in the rest bucket."""
        idx = np.zeros((len(rows), length, self.k), np.int32)
        top = np.full((len(rows), length, self.k), losses.LOG_ZERO, np.float32)
        rest = np.zeros((len(rows), length), np.float32)
        for r, i in enumerate(rows):
            if i < 0:
                continue
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            n = min(b - a, length)
            idx[r, :n], top[r, :n], rest[r, :n] = (
                self.idx[a : a + n],
                self.top[a : a + n],
                self.rest[a : a + n],
            )
        return {"t_idx": mx.array(idx), "t_top": mx.array(top), "t_rest": mx.array(rest)}


def clear_cache(output_dir: Path) -> None:
    shutil.rmtree(Path(output_dir) / CACHE_DIR, ignore_errors=True)
