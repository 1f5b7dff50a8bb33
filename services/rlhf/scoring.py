"""The Score RPC's work: reward checkpoints kept loaded between calls, every item bounded in
tokens, and the caller's deadline checked between batches.

Loading a reward model is most of a small Score call's time, so the service keeps the last
``capacity`` checkpoints loaded, keyed by path and the head file's size and mtime (a
checkpoint rewritten in place is loaded again). An item longer than the prompt-token limit
is refused, naming it, rather than scored truncated: a reward read at a cut-off last token
is not the reward of the text that was sent.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from services.rlhf.trainers import heads
from services.rlhf.trainers.rewards import RewardModelScorer, render, score_tokens
from services.runtime.errors import InvalidArgument
from services.runtime.generation import Stopped  # the same signal as Generate's


class ScorerCache:
    """The last ``capacity`` reward checkpoints, loaded (thread-safe)."""

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = max(capacity, 1)
        self._lock = threading.Lock()
        self._items: collections.OrderedDict[tuple, RewardModelScorer] = collections.OrderedDict()
        self.loads = 0

    @staticmethod
    def _key(path: str) -> tuple:
        st = (Path(path) / heads.HEAD_FILE).stat()
        return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)

    def get(self, path: str) -> RewardModelScorer:
        key = self._key(path)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            scorer = RewardModelScorer.load(path, max_seq_length=1 << 30)
            self.loads += 1
            self._items[key] = scorer
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return scorer


def score(
    cache: ScorerCache,
    path: str,
    items: Sequence[tuple[Any, str]],
    *,
    max_tokens: int,
    should_stop: Callable[[], str | None] = lambda: None,
    batch_size: int = 8,
) -> list[float]:
    """One reward per (prompt, completion), as the reward model's training rendered them."""
    scorer = cache.get(path)
    seqs = [render(scorer.tokenizer, p, c, 1 << 30) for p, c in items]
    for n, seq in enumerate(seqs):
        if len(seq) > max_tokens:
            raise InvalidArgument.one(
                f"items[{n}]",
                f"is {len(seq)} tokens long; at most {max_tokens} "
                "(MLXU_GENERATE_MAX_PROMPT_TOKENS)",
            )
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        why = should_stop()
        if why:
            raise Stopped(why)
        out.extend(score_tokens(scorer.model, seqs[i : i + batch_size], scorer.pad_id))
    return out
