"""Datasets for every trainer: load, validate, tokenize, split; batches in data_batches.py.

Row formats (one per dataset, detected from row 1 unless the caller names it):

    text        {"text": str}
    chat        {"messages": [{"role", "content"}, ...], "tools"?: [...]}
    completion  {"prompt": str | messages, "completion": str | messages, "tools"?: [...]}
    preference  {"prompt", "chosen", "rejected": str | messages, "system"?: str, "margin"?: num}
    unpaired_preference  {"prompt", "completion": str | messages, "label": bool, "system"?: str}
                (TRL's unpaired preference rows, for KTO: label true = desirable)
    prompt      {"prompt": str | messages, ...anything else is kept for reward functions}

Files are JSONL, a JSON list, or {"examples": [...]}; a directory holds train.jsonl and
optionally valid.jsonl / test.jsonl (as mlx-lm). Rendering follows mlx_lm/tuner/datasets.py:
chat and completion go through the chat template, and with mask_prompt the loss starts after
the template of all but the last message (plus the generation prompt), as mlx-lm computes it.

This module is the entry point (split, prepare, PreparedData, unpair). Reading and checking
rows lives in data_rows.py, rendering and tokenizing in data_tokenize.py, batching in
data_batches.py; every name in ``__all__`` stays importable from here.

    data = prepare({"path": "data/"}, tokenizer, allowed_formats=("chat", "completion"),
                   max_seq_length=512, mask_prompt=None, seed=0)
    for batch in data.batches("train", 8, seed=0): ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from services.runtime.data_batches import (
    Batches,
    PreferenceBatches,
    PreferencePair,
    PromptBatches,
    PromptItem,
    Tokenized,
    UnpairedBatches,
    UnpairedItem,
    bucket_for,
    buckets,
)
from services.runtime.data_rows import (
    FORMATS,
    _fail,
    detect_format,
    load_dir,
    load_rows,
    normalize_format,
    validate_rows,
)
from services.runtime.data_tokenize import has_chat_template, tokenize_rows

__all__ = [
    "FORMATS",
    "Batches",
    "DataStats",
    "PreferenceBatches",
    "PreferencePair",
    "PreparedData",
    "PromptBatches",
    "PromptItem",
    "Tokenized",
    "UnpairedBatches",
    "UnpairedItem",
    "bucket_for",
    "buckets",
    "detect_format",
    "has_chat_template",
    "load_dir",
    "load_rows",
    "normalize_format",
    "prepare",
    "split",
    "tokenize_rows",
    "unpair",
    "validate_rows",
]

DEFAULT_VALID_FRACTION = 0.1


# ---------------------------------------------------------------- splitting


def split(
    rows: Sequence[Any],
    valid_fraction: float,
    seed: int,
    *,
    field: str = "spec.dataset.valid_fraction",
) -> tuple[list[Any], list[Any]]:
    """Hold out round(n * fraction) rows (at least 1 when n >= 2 and fraction > 0), chosen by
    a permutation seeded with ``seed``; both parts keep the original row order."""
    if not 0.0 <= valid_fraction < 1.0:
        raise _fail(field, f"must be in [0, 1), got {valid_fraction}")
    n = len(rows)
    k = round(n * valid_fraction)
    if valid_fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    if k == 0:
        return list(rows), []
    held = set(np.random.default_rng([seed % 2**64]).permutation(n)[:k].tolist())
    train = [r for i, r in enumerate(rows) if i not in held]
    valid = [r for i, r in enumerate(rows) if i in held]
    return train, valid


# ---------------------------------------------------------------- prepare


@dataclass(frozen=True)
class DataStats:
    rows: int  # training rows (after drops)
    valid_rows: int
    tokens: int  # training tokens after truncation (both answers for preference data)
    target_tokens: int  # training tokens that carry loss
    truncated: int  # rows (train + valid) cut to max_seq_length
    dropped: int  # rows left with no token to learn from once truncated

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class PreparedData:
    format: str
    train: list[Any]  # Tokenized | PreferencePair | UnpairedItem | PromptItem, by format
    valid: list[Any]
    test: list[Any]
    mask_prompt: bool
    pad_id: int
    max_seq_length: int
    stats: DataStats

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        sort_chunk: int = 0,
        limit: int | None = None,
        field: str = "spec.loop.batch_size",
    ) -> Batches | PreferenceBatches | UnpairedBatches | PromptBatches:
        """Batches of the right kind for ``split`` ("train" shuffles and repeats by default)."""
        items = {"train": self.train, "valid": self.valid, "test": self.test}[split]
        shuffle = split == "train" if shuffle is None else shuffle
        common = {
            "seed": seed,
            "shuffle": shuffle,
            "rank": rank,
            "world_size": world_size,
            "limit": limit,
            "field": field,
        }
        if self.format == "prompt":
            return PromptBatches(items, batch_size, **common)
        kind = {"preference": PreferenceBatches, "unpaired_preference": UnpairedBatches}.get(
            self.format, Batches
        )
        return kind(
            items,
            batch_size,
            pad_id=self.pad_id,
            max_seq_length=self.max_seq_length,
            sort_chunk=sort_chunk,
            **common,
        )


def unpair(data: PreparedData) -> PreparedData:
    """Preference pairs as unpaired rows, chosen desirable and rejected not (TRL's
    ``unpair_preference_dataset``). A completion cut by max_seq_length stays cut in the KL
    rows it lends (TRL cuts those afresh from the whole completion)."""

    def rows(pairs: list[PreferencePair]) -> list[UnpairedItem]:
        return [
            UnpairedItem(s, tuple(s.tokens[s.prompt_len :]), label)
            for p in pairs
            for s, label in ((p.chosen, True), (p.rejected, False))
        ]

    return replace(
        data,
        format="unpaired_preference",
        train=rows(data.train),
        valid=rows(data.valid),
        test=rows(data.test),
    )


def _resolve_format(
    rows: list[dict[str, Any]], requested: str, allowed: Sequence[str], field: str
) -> str:
    path_f = f"{field}.path"
    if requested:
        if requested not in allowed:
            raise _fail(
                f"{field}.format",
                f"format {requested!r} is not accepted here; expected one of "
                + ", ".join(repr(a) for a in allowed),
            )
        return requested
    fmt = detect_format(rows, path_f)
    if fmt not in allowed:
        # Prompt-only methods can take the prompts of richer rows when the caller allows it.
        if "prompt" in allowed and "prompt" in rows[0]:
            return "prompt"
        # A "label" that is no KTO label (not a bool) is just another column of completions.
        label = rows[0].get("label")
        if fmt == "unpaired_preference" and "completion" in allowed and not isinstance(label, bool):
            return "completion"
        raise _fail(
            path_f,
            f"rows are {fmt!r} data (detected from row 1) but this method needs "
            + " or ".join(repr(a) for a in allowed),
        )
    return fmt


def _usable(item: Any) -> bool:
    if isinstance(item, UnpairedItem):
        return item.seq.ntargets > 0
    if isinstance(item, PreferencePair):
        return item.chosen.ntargets > 0 and item.rejected.ntargets > 0
    if isinstance(item, Tokenized):
        return item.ntargets > 0
    return bool(item.tokens)


def _truncated(item: Any) -> bool:
    if isinstance(item, UnpairedItem):
        return item.seq.truncated
    if isinstance(item, PreferencePair):
        return item.chosen.truncated or item.rejected.truncated
    return item.truncated


def _counts(items: list[Any]) -> tuple[int, int]:
    seqs: list[Any] = []
    for it in items:
        if isinstance(it, UnpairedItem):
            seqs.append(it.seq)
        else:
            seqs += [it.chosen, it.rejected] if isinstance(it, PreferencePair) else [it]
    tokens = sum(len(s.tokens) for s in seqs)
    targets = sum(s.ntargets for s in seqs if isinstance(s, Tokenized))
    return tokens, targets


def prepare(
    dataset_ref: dict[str, Any],
    tokenizer: Any,
    *,
    allowed_formats: Sequence[str],
    max_seq_length: int,
    mask_prompt: bool | None,
    seed: int,
    field: str = "spec.dataset",
) -> PreparedData:
    """Load, validate, split and tokenize a dataset reference for one trainer.

    dataset_ref: {"path", "format" ("" = detect), "valid_path", "valid_fraction"}. The
    validation rows come from valid_path, else the directory's valid.jsonl, else a seeded
    hold-out of valid_fraction (default 0.1; 0 = none) of the training rows. mask_prompt None
    means the default: True for chat and completion. Rows that keep no token to learn from
    after truncation are dropped (stats.dropped); none left is an error.
    """
    path_f = f"{field}.path"
    raw = dataset_ref.get("path") or ""
    if not raw:
        raise _fail(path_f, "is required")
    path = Path(raw)
    requested = normalize_format(dataset_ref.get("format") or "", f"{field}.format")
    parts = load_dir(path, path_f) if path.is_dir() else {"train": load_rows(path, path_f)}
    fmt = _resolve_format(parts["train"], requested, allowed_formats, field)
    source = "train.jsonl: " if path.is_dir() else ""
    validate_rows(parts["train"], fmt, path_f, source=source)
    train_rows, valid_rows = parts["train"], parts.get("valid", [])
    if dataset_ref.get("valid_path"):
        valid_f = f"{field}.valid_path"
        valid_rows = load_rows(Path(dataset_ref["valid_path"]), valid_f)
        validate_rows(valid_rows, fmt, valid_f)
    elif "valid" in parts:
        validate_rows(valid_rows, fmt, path_f, source="valid.jsonl: ")
    else:
        frac = dataset_ref.get("valid_fraction")
        frac = DEFAULT_VALID_FRACTION if frac is None else float(frac)
        if not 0.0 <= frac < 0.5:
            raise _fail(f"{field}.valid_fraction", f"must be in [0, 0.5), got {frac}")
        train_rows, valid_rows = split(train_rows, frac, seed)
    test_rows = parts.get("test", [])
    if test_rows:
        validate_rows(test_rows, fmt, path_f, source="test.jsonl: ")

    mask = fmt in ("chat", "completion") if mask_prompt is None else bool(mask_prompt)
    kw = {"max_seq_length": max_seq_length, "mask_prompt": mask, "field": path_f}
    tokenized = {
        name: tokenize_rows(rows, fmt, tokenizer, **kw)
        for name, rows in (("train", train_rows), ("valid", valid_rows), ("test", test_rows))
    }
    truncated = sum(_truncated(t) for t in tokenized["train"] + tokenized["valid"])
    kept = {name: [t for t in items if _usable(t)] for name, items in tokenized.items()}
    dropped = sum(len(tokenized[n]) - len(kept[n]) for n in ("train", "valid"))
    if not kept["train"]:
        raise _fail(
            path_f,
            f"no row keeps a token to learn from within max_seq_length={max_seq_length} "
            "(the prompts fill it); raise max_seq_length or shorten the prompts",
        )
    tokens, targets = _counts(kept["train"])
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stats = DataStats(len(kept["train"]), len(kept["valid"]), tokens, targets, truncated, dropped)
    return PreparedData(
        format=fmt,
        train=kept["train"],
        valid=kept["valid"],
        test=kept["test"],
        mask_prompt=mask,
        pad_id=int(pad),
        max_seq_length=max_seq_length,
        stats=stats,
    )
