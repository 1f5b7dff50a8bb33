"""Progress of a long phase outside the training steps (scoring a reference model, caching
teachers' top-k): log lines a watcher sees while minutes pass, instead of silence.

    phase = Phase(ctx.log, "scoring reference log-probs", total=len(answers), unit="answers")
    for batch in batches:
        ...
        phase.advance(len(batch))
    seconds = phase.elapsed

It logs once at the start, then at most every ``EVERY_S`` seconds while it runs (done of
total, percent, elapsed, an ETA); the caller's own closing line says what came of it. The
lines are ``JobContext.log`` events, so ``mlxu jobs watch`` and a pipeline's watch show them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["EVERY_S", "Phase", "duration"]

# Seconds between two progress lines of one phase: often enough that a watcher never waits
# long for a sign of life, rarely enough that a long phase writes a few dozen events.
EVERY_S = 10.0


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    s = max(int(round(seconds)), 0)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Phase:
    """Counts ``total`` units of work and logs how far it got (see the module docstring)."""

    def __init__(
        self,
        log: Callable[[str], None] | None,
        what: str,
        total: int,
        unit: str,
        *,
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log or (lambda _text: None)
        self.what, self.total, self.unit = what, max(int(total), 0), unit
        self.every_s = EVERY_S if every_s is None else every_s
        self.clock = clock
        self.done = 0
        self.t0 = self.last = clock()
        self.log(f"{what}: {self.total} {unit}")

    @property
    def elapsed(self) -> float:
        return self.clock() - self.t0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last < self.every_s or not 0 < self.done < self.total:
            return
        self.last = now
        spent = now - self.t0
        eta = spent * (self.total - self.done) / self.done
        self.log(
            f"{self.what}: {self.done}/{self.total} {self.unit} "
            f"({self.done / self.total:.0%}), {duration(spent)} so far, ETA {duration(eta)}"
        )
