"""The knowledge-distillation batch stream: batches plus what the KD loss needs per row.

Split from kd.py (which builds the streams in ``_streams`` and re-exports these names):
IndexedBatches says which dataset rows a batch holds; KDStream adds each batch's teacher
mixture weights, the scheduled temperature and the cached teacher top-k, and swaps in
student-generated completions for on-policy batches. It keeps its own position (state /
restore), so the annealed temperature and the seeded on-policy coin flips continue exactly
on resume; that bookkeeping reads on its own, apart from the run's setup.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx
import numpy as np

from services.distillation.trainers import losses, student, teacher_backends, teachers
from services.runtime.data_batches import Batches


class IndexedBatches(Batches):
    """Batches that also say which items they hold ("rows", -1 = padding row), so routing and
    the teacher cache can find each row's teacher data."""

    def _collate(self, global_idx: list[int]) -> dict[str, Any]:
        batch = super()._collate(global_idx)
        batch["rows"] = self._sched.local_slice(global_idx)
        return batch


@dataclasses.dataclass
class StreamParts:
    weights: np.ndarray  # [N] normalised mixture weights
    route: list[int] | None  # teacher index of every item when routing
    temperature: losses.Temperature
    total: int
    accum: int
    cache: teachers.TeacherCache | None = None
    vocab: int = 0
    top_k: int = 0
    # Scores batches the cache does not hold (on-policy ones; every batch when a remote
    # teacher runs without the cache). None: the loss runs the local teachers live.
    scorer: teachers.Scorer | None = None


class KDStream:
    """Wraps IndexedBatches: resumable (the loop saves state()), and counts micro-batches so the
    annealed temperature and the seeded on-policy coin flips continue exactly on resume."""

    def __init__(
        self,
        inner: IndexedBatches,
        parts: StreamParts,
        *,
        policy: student.OnPolicy | None = None,
        seed: int = 0,
        step_of: Callable[[], int] | None = None,
        rank: int = 0,
    ) -> None:
        self.inner, self.parts, self.policy, self.seed = inner, parts, policy, seed
        # Data parallel: each rank completes its own rows; the same coin flips on every rank
        # (all take on-policy steps together), a different sampling seed on each.
        self.rank = rank
        self.served = 0
        self.step_of = step_of  # valid stream: the train stream's step

    steps_per_epoch = property(lambda self: self.inner.steps_per_epoch)
    epoch = property(lambda self: self.inner.epoch)

    @property
    def step(self) -> int:
        return self.served // self.parts.accum

    def state(self) -> dict:
        return {"batches": self.inner.state(), "served": self.served}

    def restore(self, state: dict) -> None:
        self.inner.restore(state["batches"])
        self.served = int(state["served"])

    def __iter__(self) -> Iterator[dict]:
        for batch in self.inner:
            yield self.decorate(batch)

    def decorate(self, batch: dict) -> dict:
        p = self.parts
        rows = batch.pop("rows")
        step = self.step_of() if self.step_of else self.step
        counter, self.served = self.served, self.served + (0 if self.step_of else 1)
        fresh = False
        if self.policy is not None:
            coin = np.random.default_rng([self.seed % 2**63, counter]).random()
            if coin < self.policy.fraction:
                seed = self.seed * 1_000_003 + counter + self.rank * 0x9E3779B1
                batch = self.policy.replace(rows, seed=seed)
                fresh = True
        batch["teacher_weights"] = mx.array(teachers.row_weights(p.route, p.weights, rows))
        batch["temperature"] = mx.array(p.temperature.scheduled(step, p.total), mx.float32)
        if p.cache is not None and not fresh:
            batch.update(p.cache.lookup(rows, batch["inputs"].shape[1]))
        elif p.scorer is not None:  # scored now (new completions, or no cache), same format
            where = teacher_backends.positions_of(batch)
            idx, top, rest = p.scorer(batch["teacher_weights"], batch["inputs"], where)
            batch.update(t_idx=mx.array(idx), t_top=mx.array(top), t_rest=mx.array(rest))
        return batch
