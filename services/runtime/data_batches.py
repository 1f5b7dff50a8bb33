"""Batches for the trainers: deterministic, resumable, bucketed and data-parallel.

Every rank computes the same global batch (same seed, same epoch permutation) and keeps its
contiguous slice, so a data-parallel run sees exactly the batches of a one-process run. The
padded length is the smallest bucket (32, 64, 128, ... up to ``max_seq_length``) that holds the
longest sequence of the *global* batch, so all ranks agree on shapes and a compiled step sees
only a handful of them.

Layout of one batch (``L`` = bucket, ``b`` = ``batch_size // world_size``)::

    inputs    int32   [b, L]   tokens[:L], padded with pad_id
    targets   int32   [b, L]   tokens[1:L+1] (inputs shifted by one)
    loss_mask float32 [b, L]   1 where targets[i, t] counts: a real token, not a masked prompt
    lengths   int32   [b]      real tokens per row (all of them fit in ``inputs``)
    target_index, target_weight    [N] the counted positions, where they are at most 3/4 of
                               b * L (SFT and preference batches; see with_target_index)
    ntokens        python int  sum(loss_mask) of this rank's slice
    global_ntokens python int  the same over the whole global batch (normalise by this for
                               a loss identical to the one-process run)

This module holds the item types, the buckets and the collation into arrays; which rows form
each batch, and the resumable position, live in data_schedule.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from services.runtime.data_schedule import Resumable


@dataclass(frozen=True)
class Tokenized:
    """One training sequence. The loss covers tokens[prompt_len:] (never token 0)."""

    tokens: list[int]
    prompt_len: int = 0
    truncated: bool = False

    @property
    def ntargets(self) -> int:
        return max(0, len(self.tokens) - max(self.prompt_len, 1))


@dataclass(frozen=True)
class PreferencePair:
    chosen: Tokenized
    rejected: Tokenized
    margin: float | None = None


@dataclass(frozen=True)
class UnpairedItem:
    """A KTO row: prompt + completion as ``seq``, the completion's full token list (to pair
    with other rows' prompts for the KL estimate) and whether it is desirable."""

    seq: Tokenized
    completion: tuple[int, ...]
    label: bool

    def with_completion_of(self, other: UnpairedItem, max_seq_length: int) -> Tokenized:
        """This row's prompt followed by ``other``'s completion, cut as TRL's collator cuts."""
        p = self.seq.prompt_len
        tokens = [*self.seq.tokens[:p], *other.completion]
        return Tokenized(
            tokens[:max_seq_length], min(p, max_seq_length), len(tokens) > max_seq_length
        )


@dataclass(frozen=True, eq=False)
class PromptItem:
    """A rollout prompt: its tokens (generation prompt included) and the raw row."""

    tokens: list[int]
    prompt: str | list[dict[str, Any]]
    row: dict[str, Any]
    truncated: bool = False


# Padded lengths grow in steps of 32 up to 512 (as mlx-lm pads), then 128 up to 2048, then
# 512: padding stays within a few percent of the longest row while the compiled step sees a
# bounded number of shapes (at most ~40 below 8k). Powers of two padded a 130-token batch to
# 256 (1.6x the compute on variable-length chat data, measured against mlx-lm).
_STEPS = ((512, 32), (2048, 128), (1 << 30, 512))


def buckets(max_seq_length: int) -> tuple[int, ...]:
    """The padded lengths below max_seq_length, then max_seq_length itself."""
    out: list[int] = []
    b = 0
    while True:
        step = next(s for limit, s in _STEPS if b < limit)
        b += step
        if b >= max_seq_length:
            break
        out.append(b)
    out.append(max_seq_length)
    return tuple(out)


def bucket_for(length: int, max_seq_length: int) -> int:
    for b in buckets(max_seq_length):
        if b >= length:
            return b
    return max_seq_length


def _pack(
    seqs: list[Tokenized | None], length: int, pad_id: int, max_seq_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded token matrix [n, length + 1], loss mask [n, length], real lengths [n]."""
    toks = np.full((len(seqs), length + 1), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.float32)
    lengths = np.zeros((len(seqs),), np.int32)
    for r, item in enumerate(seqs):
        if item is None:
            continue
        t = item.tokens[:max_seq_length]
        toks[r, : len(t)] = t
        # Target t is token t + 1: it counts from the first completion token to the last.
        mask[r, max(item.prompt_len, 1) - 1 : len(t) - 1] = 1.0
        lengths[r] = len(t)
    return toks, mask, lengths


def _targets(item: Tokenized | None, max_seq_length: int) -> int:
    if item is None:
        return 0
    return max(0, min(len(item.tokens), max_seq_length) - max(item.prompt_len, 1))


def _arrays(toks: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": mx.array(toks[:, :-1]),
        "targets": mx.array(toks[:, 1:]),
        "loss_mask": mx.array(mask),
        "lengths": mx.array(lengths),
        "ntokens": int(mask.sum()),
    }


# The switch (benchmarks compare both: bench/bench_sft.py's side "mlxu-dense").
TARGET_INDEX = True


def with_target_index(batch: dict[str, Any]) -> dict[str, Any]:
    """Adds ``target_index`` int32 [N] (the flat positions in [b * L] whose loss_mask counts,
    N padded to a bucket, the padding pointing at position 0) and ``target_weight`` float32
    [N] (the mask there, 0 for the padding) when they leave out at least a quarter of the
    positions: the SFT and DPO losses then run the LM head on those rows only
    (linear_ce.masked_nll_rows). Chat rows with their prompts masked are the common case:
    on the quick start's FAQ (SmolLM2-135M, LoRA, 4 x 64, CPU) a step fell from 2.19 s to
    1.61 s and a validation forward from 1.18 s to 0.95 s."""
    if not TARGET_INDEX:
        return batch
    mask = np.asarray(batch["loss_mask"]).reshape(-1)
    counted = np.flatnonzero(mask)
    n = bucket_for(max(len(counted), 1), mask.size)
    if 4 * n > 3 * mask.size:
        return batch
    idx = np.zeros(n, np.int32)
    idx[: len(counted)] = counted
    weight = np.zeros(n, np.float32)
    weight[: len(counted)] = mask[counted]
    batch["target_index"] = mx.array(idx)
    batch["target_weight"] = mx.array(weight)
    return batch


def _padded(
    every: list[Tokenized | None], mine: list[Tokenized | None], pad_id: int, max_seq_length: int
) -> dict[str, Any]:
    """This rank's rows ``mine`` as inputs / targets / loss_mask / lengths / ntokens, padded
    to the bucket of the longest row of the whole global batch ``every`` (so all ranks agree
    on the shape). Every batch kind over Tokenized rows collates through this."""
    longest = max((len(t.tokens) for t in every if t is not None), default=1)
    length = bucket_for(min(longest, max_seq_length), max_seq_length)
    return _arrays(*_pack(mine, length, pad_id, max_seq_length))


class Batches(Resumable):
    """Language-model batches over Tokenized items (see the module docstring for the layout).

    shuffle=True: endless, reshuffled each epoch, resumable with state()/restore().
    shuffle=False: one pass in dataset order (validation), at most ``limit`` batches; the
    last batch is filled up with empty rows (loss_mask 0) to keep the shape.
    sort_chunk=k: sort each run of k batches by length before batching (less padding).
    """

    def __init__(
        self,
        items: list[Tokenized],
        batch_size: int,
        *,
        pad_id: int,
        max_seq_length: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        sort_chunk: int = 0,
        limit: int | None = None,
        field: str = "spec.loop.batch_size",
    ) -> None:
        super().__init__(
            [len(t.tokens) for t in items],
            batch_size,
            seed=seed,
            shuffle=shuffle,
            rank=rank,
            world_size=world_size,
            sort_chunk=sort_chunk,
            limit=limit,
            field=field,
        )
        self.items = items
        self.pad_id = pad_id
        self.max_seq_length = max_seq_length

    def _collate(self, global_idx: list[int]) -> dict[str, Any]:
        msl = self.max_seq_length
        every = [self.items[i] if i >= 0 else None for i in global_idx]
        batch = _padded(every, self._sched.local_slice(every), self.pad_id, msl)
        batch["global_ntokens"] = sum(_targets(t, msl) for t in every)
        return with_target_index(batch)


def _halves(pairs: list[PreferencePair | None]) -> list[Tokenized | None]:
    """The chosen answers of ``pairs``, then the rejected ones (None for an empty row)."""
    return [p.chosen if p else None for p in pairs] + [p.rejected if p else None for p in pairs]


class PreferenceBatches(Resumable):
    """DPO / reward-model batches: chosen and rejected of the same pairs, stacked.

    inputs / targets / loss_mask are [2b, L]: rows [0:b] chosen, rows [b:2b] the rejected
    answers of the same pairs; lengths [2b]; "margin" float32 [b] when the dataset has
    margins (rows without one get 0). ntokens / global_ntokens count both halves.
    """

    def __init__(
        self,
        pairs: list[PreferencePair],
        batch_size: int,
        *,
        pad_id: int,
        max_seq_length: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        sort_chunk: int = 0,
        limit: int | None = None,
        field: str = "spec.loop.batch_size",
    ) -> None:
        super().__init__(
            [max(len(p.chosen.tokens), len(p.rejected.tokens)) for p in pairs],
            batch_size,
            seed=seed,
            shuffle=shuffle,
            rank=rank,
            world_size=world_size,
            sort_chunk=sort_chunk,
            limit=limit,
            field=field,
        )
        self.pairs = pairs
        self.pad_id = pad_id
        self.max_seq_length = max_seq_length
        self.has_margin = any(p.margin is not None for p in pairs)

    def _collate(self, global_idx: list[int]) -> dict[str, Any]:
        msl = self.max_seq_length
        every = [self.pairs[i] if i >= 0 else None for i in global_idx]
        mine = self._sched.local_slice(every)
        seqs = _halves(every)
        batch = _padded(seqs, _halves(mine), self.pad_id, msl)
        batch["global_ntokens"] = sum(_targets(t, msl) for t in seqs)
        if self.has_margin:
            margins = [float(p.margin or 0.0) if p else 0.0 for p in mine]
            batch["margin"] = mx.array(np.asarray(margins, np.float32))
        return with_target_index(batch)


class UnpairedBatches(Resumable):
    """KTO batches over UnpairedItems: the module docstring's layout for the rows themselves,
    plus ``label`` float32 [b] (1 desirable, 0 undesirable or an empty row) and the KL rows
    ``kl_inputs`` / ``kl_targets`` / ``kl_loss_mask`` [b, L'] and ``kl_lengths`` [b]: row k's
    prompt with the completion of the previous real row of the *global* batch (the first
    takes the last's), TRL KTOTrainer's rotation by one. Built at batching time, the
    mismatched completions are always the batch's own, whatever the sampling order (TRL
    builds them once over consecutive rows and so needs sequential sampling).
    """

    def __init__(
        self,
        items: list[UnpairedItem],
        batch_size: int,
        *,
        pad_id: int,
        max_seq_length: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        sort_chunk: int = 0,
        limit: int | None = None,
        field: str = "spec.loop.batch_size",
    ) -> None:
        super().__init__(
            [len(it.seq.tokens) for it in items],
            batch_size,
            seed=seed,
            shuffle=shuffle,
            rank=rank,
            world_size=world_size,
            sort_chunk=sort_chunk,
            limit=limit,
            field=field,
        )
        self.items = items
        self.pad_id = pad_id
        self.max_seq_length = max_seq_length

    def _collate(self, global_idx: list[int]) -> dict[str, Any]:
        msl = self.max_seq_length
        every = [self.items[i] if i >= 0 else None for i in global_idx]
        real = [k for k, it in enumerate(every) if it is not None]
        kl: list[Tokenized | None] = [None] * len(every)
        for n, k in enumerate(real):
            kl[k] = every[k].with_completion_of(every[real[n - 1]], msl)
        seqs = [it.seq if it else None for it in every]
        local = self._sched.local_slice
        out = _padded(seqs, local(seqs), self.pad_id, msl)
        kl_arrays = _padded(kl, local(kl), self.pad_id, msl)
        kl_arrays.pop("ntokens")
        out.update({"kl_" + k: v for k, v in kl_arrays.items()})
        labels = [1.0 if it is not None and it.label else 0.0 for it in local(every)]
        out["label"] = mx.array(np.asarray(labels, np.float32))
        out["global_ntokens"] = sum(_targets(t, msl) for t in seqs)
        return out


class PromptBatches(Resumable):
    """Rollout prompts, unpadded: {"tokens": [[int]], "prompts": [raw], "rows": [dict]}.

    In a validation pass (shuffle=False) the last batch may be short, or empty on a rank.
    """

    def __init__(
        self,
        items: list[PromptItem],
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        limit: int | None = None,
        field: str = "spec.rollout.batch_size",
    ) -> None:
        super().__init__(
            [len(p.tokens) for p in items],
            batch_size,
            seed=seed,
            shuffle=shuffle,
            rank=rank,
            world_size=world_size,
            sort_chunk=0,
            limit=limit,
            field=field,
        )
        self.items = items

    def _collate(self, global_idx: list[int]) -> dict[str, Any]:
        mine = [self.items[i] for i in self._sched.local_slice(global_idx) if i >= 0]
        return {
            "tokens": [list(p.tokens) for p in mine],
            "prompts": [p.prompt for p in mine],
            "rows": [p.row for p in mine],
        }
