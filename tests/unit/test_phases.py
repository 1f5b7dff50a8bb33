"""Progress lines of long phases outside the training steps (services.runtime.phases)."""

from __future__ import annotations

from services.runtime.phases import Phase, duration


def test_phase_logs_start_then_progress_at_most_every_interval() -> None:
    now = [100.0]
    logs: list[str] = []
    phase = Phase(logs.append, "scoring reference log-probs", 400, "answers", every_s=10.0,
                  clock=lambda: now[0])  # fmt: skip
    assert logs == ["scoring reference log-probs: 400 answers"]
    phase.advance(50)  # no time passed: no line
    now[0] += 12.0
    phase.advance(50)  # 100 of 400 in 12 s: 36 s to go
    now[0] += 3.0
    phase.advance(100)  # within 10 s of the last line: quiet
    assert logs[1:] == ["scoring reference log-probs: 100/400 answers (25%), 12s so far, ETA 36s"]
    now[0] += 200.0
    phase.advance(200)  # done: the caller's closing line says so, not a "100%" line
    assert len(logs) == 2 and phase.elapsed == 215.0


def test_duration() -> None:
    assert [duration(s) for s in (0.4, 59.6, 185, 3720)] == ["0s", "1m00s", "3m05s", "1h02m"]
