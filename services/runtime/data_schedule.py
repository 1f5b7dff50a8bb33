"""Which rows form each batch, and where a run is: the seeded schedule and resumable position.

Split from data_batches.py, which turns these row indices into padded arrays. The schedule
only orders indices (numpy, no MLX, no tokens): it is what makes resume exact (any position
can be recomputed from (seed, epoch) alone) and what keeps data-parallel ranks on the same
global batch, so it reads on its own. Every batch kind in data_batches.py subclasses
``Resumable`` and supplies ``_collate``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from services.runtime.errors import InvalidArgument


class Schedule:
    """Which item indices form global batch ``index`` of epoch ``epoch``.

    Shuffling permutes with an RNG seeded by (seed, epoch) alone, so any position can be
    recomputed from scratch: that is what makes resume exact. Training epochs drop the
    remainder (a different one each epoch); a validation pass keeps it, padded with -1
    (an empty row) so every batch has the same number of rows.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int,
        shuffle: bool,
        rank: int,
        world_size: int,
        sort_chunk: int,
        field: str,
    ) -> None:
        n = len(lengths)
        if batch_size < 1:
            raise InvalidArgument.one(field, f"must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} for world_size {world_size}")
        if batch_size % world_size:
            raise InvalidArgument.one(
                field,
                f"batch_size {batch_size} must be divisible by the number of processes "
                f"({world_size})",
            )
        if shuffle and n < batch_size:
            raise InvalidArgument.one(
                field, f"batch_size {batch_size} is larger than the dataset ({n} rows)"
            )
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.sort_chunk = max(0, sort_chunk)
        self.local = batch_size // world_size
        self.lo = rank * self.local
        self.steps_per_epoch = n // batch_size if shuffle else -(-n // batch_size)
        self._cache: tuple[int, list[list[int]]] | None = None

    def order(self, epoch: int) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n, bs = len(self.lengths), self.batch_size
        if self.shuffle:
            # SeedSequence wants non-negative entropy; proto seeds are int64.
            rng = np.random.default_rng([self.seed % 2**64, epoch])
            idx = rng.permutation(n)[: self.steps_per_epoch * bs].tolist()
        else:
            rng = None
            idx = list(range(n))
        chunk = self.sort_chunk * bs or len(idx)
        out: list[list[int]] = []
        for c in range(0, len(idx), chunk):
            part = idx[c : c + chunk]
            if self.sort_chunk:
                # Neighbours of similar length share a bucket: less padding.
                part = sorted(part, key=lambda i: self.lengths[i])
            group = [part[i : i + bs] for i in range(0, len(part), bs)]
            if rng is not None and self.sort_chunk:
                group = [group[i] for i in rng.permutation(len(group))]
            out.extend(group)
        if out and len(out[-1]) < bs:
            out[-1] = out[-1] + [-1] * (bs - len(out[-1]))
        self._cache = (epoch, out)
        return out

    def local_slice(self, global_idx: list[int]) -> list[int]:
        return global_idx[self.lo : self.lo + self.local]


class Resumable:
    """Position keeping shared by every batch kind: state(), restore(), epoch, iteration."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int,
        shuffle: bool,
        rank: int,
        world_size: int,
        sort_chunk: int,
        limit: int | None,
        field: str,
    ) -> None:
        self._sched = Schedule(
            lengths,
            batch_size,
            seed=seed,
            shuffle=shuffle,
            rank=rank,
            world_size=world_size,
            sort_chunk=sort_chunk,
            field=field,
        )
        self.shuffle = shuffle
        self.limit = limit
        self.batch_size = batch_size
        self._epoch = 0
        self._index = 0

    @property
    def steps_per_epoch(self) -> int:
        return self._sched.steps_per_epoch

    @property
    def epoch(self) -> float:
        """Progress in epochs, e.g. 1.25 = a quarter into the second epoch."""
        return self._epoch + self._index / max(1, self.steps_per_epoch)

    def __len__(self) -> int:
        """Batches in one epoch (one validation pass, after ``limit``)."""
        n = self.steps_per_epoch
        return n if self.limit is None or self.limit < 0 else min(n, self.limit)

    def state(self) -> dict[str, int]:
        """Position of the *next* batch: pass to restore() to continue with it."""
        return {"epoch": self._epoch, "index": self._index}

    def restore(self, state: dict[str, Any]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
            raise ValueError(f"batch state {state} out of range ({self.steps_per_epoch}/epoch)")
        if index == self.steps_per_epoch:
            epoch, index = epoch + 1, 0
        self._epoch, self._index = epoch, index

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.shuffle:
            # A validation pass: always from the start, once.
            for k, idx in enumerate(self._sched.order(0)):
                if k >= len(self):
                    return
                yield self._collate(idx)
            return
        while True:
            # Read the position afresh each step, so restore() applies mid-iteration too.
            idx = self._sched.order(self._epoch)[self._index]
            self._index += 1
            if self._index >= self.steps_per_epoch:
                self._epoch, self._index = self._epoch + 1, 0
            yield self._collate(idx)

    def _collate(self, global_idx: list[int]) -> dict[str, Any]:
        raise NotImplementedError
