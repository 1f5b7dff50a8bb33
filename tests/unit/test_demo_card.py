"""The demo's scorecard: held-out figures before -> after and the first step's time, from
the same job events the progress display reads."""

from __future__ import annotations

from clients import demo
from mlx_unified.v1 import common_pb2 as cpb


def _progress(step: int, **metrics: float) -> cpb.JobEvent:
    return cpb.JobEvent(progress=cpb.Progress(step=step, total_steps=30, metrics=metrics))


def test_scorecard_keeps_first_and_last_held_out_figures(capsys) -> None:
    card = demo.Scorecard()
    card.job_event("sft", _progress(0, val_loss=4.45))
    assert card.first_step is None  # step 0 is the "before" validation, not training
    card.job_event("sft", _progress(1, train_loss=4.6))
    assert card.first_step is not None and "first training step" in capsys.readouterr().err
    card.job_event("sft", _progress(30, train_loss=0.2, val_loss=0.42))
    card.job_event("dpo", _progress(0, val_loss=0.693, val_accuracies=0.0))
    card.job_event("dpo", _progress(4, val_loss=0.533, val_accuracies=0.875))
    card.job_event("dpo", cpb.JobEvent(log=cpb.LogMessage(text="not progress")))
    assert card.lines() == [
        "sft held-out loss: 4.450 -> 0.420",
        "dpo held-out loss: 0.693 -> 0.533",
        "dpo held-out preference accuracy: 0.000 -> 0.875",
    ]


def test_the_demo_stages_validate_only_before_and_after() -> None:
    sft, dpo = demo.sft_stage(30)["loop"], demo.dpo_stage(4)["loop"]
    assert sft["steps_per_eval"] == 30 and dpo["steps_per_eval"] == 4
    assert sft["steps_per_report"] == 1  # the first step shows as soon as it is done
