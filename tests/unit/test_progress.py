"""Progress rendering: the pure line renderers and the TTY / plain writers."""

from __future__ import annotations

import io

import pytest

from clients import progress as p
from clients import progress_runs as pr
from mlx_unified.v1 import common_pb2 as c
from mlx_unified.v1 import orchestrator_pb2 as o


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # shutil.get_terminal_size reads it first


def running_job() -> c.Job:
    return c.Job(
        job_id="job-0123456789abcdef",
        kind="sft",
        state=c.JOB_STATE_RUNNING,
        step=120,
        total_steps=1000,
        eta_seconds=192,
        metrics={
            "loss": 1.23456,
            "val_loss": 1.3,
            "learning_rate": 1e-4,
            "tokens_per_second": 2150,
        },
    )


def ev(seq: int, **payload: object) -> c.JobEvent:
    return c.JobEvent(job_id="job-0123456789abcdef", seq=seq, **payload)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "--"), (-1, "--"), (0, "0s"), (59.4, "59s"), (192, "3m12s"), (3725, "1h02m")],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert p.format_duration(seconds) == text


def test_bar_and_rate() -> None:
    assert p.bar(0.5, 10, ascii_only=True) == "#####-----"
    assert p.bar(1.7, 4, ascii_only=True) == "####"  # clamped
    assert p.bar(-1, 4, ascii_only=True) == "----"
    assert p.bar(0.25, 4) == "█░░░"
    assert p.format_rate(2150) == "2.1k tok/s"
    assert p.format_rate(87.4) == "87 tok/s"


def test_job_line_running() -> None:
    line = p.job_line(running_job(), ascii_only=True)
    assert line == (
        "sft job-01234567  RUNNING    step 120/1000 ##------------------  12%  "
        "loss 1.235  val loss 1.3  lr 1.00e-04  2.1k tok/s  ETA 3m12s"
    )


def test_job_line_truncates_to_width() -> None:
    line = p.job_line(running_job(), width=40)
    assert len(line) == 40 and line.endswith("…")


def test_job_line_pending_and_unknown_total() -> None:
    pending = c.Job(job_id="j1", kind="dpo", state=c.JOB_STATE_PENDING)
    assert p.job_line(pending) == "dpo j1  PENDING    waiting for a worker"
    export = c.Job(job_id="j2", kind="export", state=c.JOB_STATE_RUNNING, step=3)
    assert p.job_line(export) == "export j2  RUNNING    step 3"


def test_event_lines() -> None:
    job = running_job()
    prog = ev(
        7, progress=c.Progress(step=130, total_steps=1000, eta_seconds=100, metrics={"loss": 1.1})
    )
    assert p.event_line(prog, job) == (
        "step 130/1000  loss 1.1  val loss 1.3  lr 1.00e-04  2.1k tok/s  ETA 1m40s"
    )
    change = ev(8, state_change=c.StateChange(from_state=2, to_state=4, reason="worker OOM"))
    assert p.event_line(change) == "state RUNNING -> FAILED: worker OOM"
    cp = ev(9, checkpoint=c.Checkpoint(path="/ck/step_100", step=100))
    assert p.event_line(cp) == "checkpoint step 100: /ck/step_100"
    log = ev(10, log=c.LogMessage(level="warning", text="val set is tiny"))
    assert p.event_line(log) == "[warning] val set is tiny"
    assert p.event_line(ev(11)) is None


def test_apply_event_updates_a_copy() -> None:
    job = running_job()
    out = p.apply_event(job, ev(3, progress=c.Progress(step=200, metrics={"loss": 0.9})))
    assert (out.step, out.total_steps, out.metrics["loss"], out.metrics["val_loss"]) == (
        200,
        1000,
        pytest.approx(0.9),
        pytest.approx(1.3),
    )
    assert job.step == 120  # the input is untouched
    failed = p.apply_event(out, ev(4, state_change=c.StateChange(to_state=4, reason="boom")))
    assert (failed.state, failed.error) == (c.JOB_STATE_FAILED, "boom")


def test_summary_success_and_failure() -> None:
    job = running_job()
    job.state, job.step = c.JOB_STATE_SUCCEEDED, 1000
    job.start_time.FromSeconds(1000)
    job.end_time.FromSeconds(1192)
    job.result.CopyFrom(
        c.Checkpoint(path="/ck/final", kind=c.CHECKPOINT_KIND_ADAPTER, base_model="tiny-llama")
    )
    lines = p.summary(job)
    assert lines[0].startswith("sft job-0123456789abcdef SUCCEEDED in 3m12s  (step 1000/1000")
    assert lines[1] == "checkpoint: /ck/final (adapter, base tiny-llama)"
    failed = c.Job(job_id="j", kind="sft", state=c.JOB_STATE_FAILED, error="dataset empty")
    assert p.summary(failed) == ["sft j FAILED", "reason: dataset empty"]


def as_progress(job: c.Job) -> c.Progress:
    return c.Progress(
        step=job.step, total_steps=job.total_steps, eta_seconds=job.eta_seconds, metrics=job.metrics
    )


def test_tty_redraws_one_line() -> None:
    out = io.StringIO()
    shown = p.JobProgress(out, tty=True)
    job = running_job()
    shown.update(ev(1, progress=as_progress(job)), job)
    first = out.getvalue()
    assert first.startswith("\r") and first.endswith("\x1b[K") and "\n" not in first
    assert "step 120/1000" in first
    shown.update(ev(2, state_change=c.StateChange(from_state=1, to_state=2)), job)
    # a state change is printed above the live line, which is then redrawn
    assert out.getvalue()[len(first) :].startswith("\r\x1b[Kstate PENDING -> RUNNING\n\r")
    job.state = c.JOB_STATE_SUCCEEDED
    job.result.path = "/ck/final"
    shown.finish(job, checkpoint=False)
    tail = out.getvalue().rsplit("\x1b[K", 1)[1]
    assert tail.startswith("sft job-0123456789abcdef SUCCEEDED") and "/ck/final" not in tail


def test_plain_appends_lines_without_escapes() -> None:
    out = io.StringIO()
    shown = p.JobProgress(out, tty=False)
    job = running_job()
    shown.update(ev(1, progress=as_progress(job)), job)
    shown.update(ev(2, log=c.LogMessage(level="info", text="hello")), job)
    shown.update(ev(3), job)  # no payload: no line
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines() == [
        "job-01234567 step 120/1000  loss 1.235  val loss 1.3  lr 1.00e-04  2.1k tok/s  ETA 3m12s",
        "job-01234567 [info] hello",
    ]


def make_run() -> o.Run:
    run = o.Run(run_id="run-1", pipeline_id="pipe-1", state=o.RUN_STATE_RUNNING)
    run.stages.add(
        name="sft", kind=o.STAGE_KIND_SFT, state=o.STAGE_STATE_SUCCEEDED
    ).result.path = "/ck/sft"
    dpo = run.stages.add(name="dpo", kind=o.STAGE_KIND_DPO, state=o.STAGE_STATE_RUNNING)
    dpo.job.CopyFrom(c.Job(job_id="j2", state=c.JOB_STATE_RUNNING, step=5, total_steps=10))
    return run


def test_stage_lines() -> None:
    run = make_run()
    assert pr.stage_line(run.stages[0], name_width=5) == "sft   sft          SUCCEEDED  /ck/sft"
    assert pr.stage_line(run.stages[1], name_width=5, ascii_only=True) == (
        "dpo   dpo          RUNNING    step 5/10 ##########----------  50%"
    )
    skipped = o.StageRun(name="rm", kind=o.STAGE_KIND_REWARD_MODEL, state=o.STAGE_STATE_SKIPPED)
    skipped.cached_from = "run-0/rm"
    assert pr.stage_line(skipped, name_width=2).endswith("SKIPPED    cached from run-0/rm")


def test_apply_run_event_and_lines() -> None:
    run = make_run()
    job_ev = o.RunEvent(
        run_id="run-1",
        seq=9,
        job_event=o.StageJobEvent(stage="dpo", event=ev(4, progress=c.Progress(step=8))),
    )
    assert pr.apply_run_event(run, job_ev).stages[1].job.step == 8
    assert run.stages[1].job.step == 5
    fail = o.RunEvent(
        stage_state_change=o.StageStateChange(stage="dpo", from_state=2, to_state=4, reason="nan")
    )
    after = pr.apply_run_event(run, fail)
    assert (after.stages[1].state, after.stages[1].error) == (o.STAGE_STATE_FAILED, "nan")
    assert pr.run_event_line(fail) == "[dpo] RUNNING -> FAILED: nan"
    assert pr.run_event_line(job_ev) == "[dpo] step 8"
    done = o.RunEvent(run_state_change=o.RunStateChange(from_state=2, to_state=3))
    assert pr.apply_run_event(run, done).state == o.RUN_STATE_SUCCEEDED
    assert pr.run_event_line(done) == "run RUNNING -> SUCCEEDED"


def test_run_progress_tty_redraws_stage_block() -> None:
    out = io.StringIO()
    shown = pr.RunProgress(make_run(), out, tty=True)
    start = o.StageStateChange(stage="dpo", from_state=1, to_state=2, job_id="j2")
    shown.update(o.RunEvent(stage_state_change=start))
    tick = o.RunEvent(
        job_event=o.StageJobEvent(
            stage="dpo", event=ev(4, progress=c.Progress(step=6, total_steps=10))
        )
    )
    shown.update(tick)
    shown.update(tick)
    text = out.getvalue()
    # second draw moves up over the two stage lines and clears them first
    assert text.count("\x1b[2F\x1b[J") == 2
    assert text.rstrip("\n").splitlines()[-1].startswith("dpo")
    assert "step 6/10" in text.splitlines()[-1]


def test_run_progress_plain_and_summary() -> None:
    out = io.StringIO()
    shown = pr.RunProgress(make_run(), out, tty=False)
    shown.update(
        o.RunEvent(
            stage_state_change=o.StageStateChange(
                stage="dpo", from_state=1, to_state=2, job_id="j2"
            )
        )
    )
    final = make_run()
    final.state = o.RUN_STATE_SUCCEEDED
    final.result.path = "/ck/dpo"
    shown.finish(final)
    assert out.getvalue().splitlines() == [
        "[dpo] PENDING -> RUNNING (job j2)",
        "run run-1 SUCCEEDED",
        "checkpoint: /ck/dpo",
    ]


# ---- what a user reads must be true (issue 14) ----------------------------------------------


def sft_metrics(**kw: float) -> dict[str, float]:
    """What the loop reports for SFT: train_loss (no "loss"), val figures, and the rest."""
    return {
        "train_loss": 2.5,
        "val_loss": 2.75,
        "val_ppl": 15.6,
        "learning_rate": 2e-4,
        "grad_norm": 1.5,
        "peak_memory_gb": 3.2,
        "steps_per_second": 1.1,
        "tokens_per_second": 2150,
        **kw,
    }


def finished_sft_log() -> tuple[c.Job, list[c.JobEvent]]:
    """A finished SFT job as WatchJob replays it: every event carries the *final* job."""
    events = [
        ev(1, state_change=c.StateChange(to_state=c.JOB_STATE_PENDING, reason="created")),
        ev(2, state_change=c.StateChange(from_state=1, to_state=2, reason="worker starting")),
        ev(3, progress=c.Progress(step=0, total_steps=50, metrics={"val_loss": 4.5})),
        ev(
            4,
            progress=c.Progress(
                step=5, total_steps=50, eta_seconds=90, metrics={"train_loss": 4.2, "val_loss": 4.5}
            ),
        ),  # fmt: skip
        ev(
            5,
            progress=c.Progress(
                step=25,
                total_steps=50,
                eta_seconds=40,
                metrics={"train_loss": 3.1, "val_loss": 3.9},
            ),
        ),  # fmt: skip
        ev(
            6,
            progress=c.Progress(
                step=50, total_steps=50, metrics={"train_loss": 2.8, "val_loss": 3.883}
            ),
        ),  # fmt: skip
        ev(7, checkpoint=c.Checkpoint(path="/ck/final", step=50)),
        ev(8, state_change=c.StateChange(from_state=2, to_state=3, reason="trainer finished")),
    ]
    final = c.Job(job_id="job-0123456789abcdef", kind="sft", state=c.JOB_STATE_SUCCEEDED,
                  step=50, total_steps=50)  # fmt: skip
    final.metrics.update({"train_loss": 2.8, "val_loss": 3.883, "steps": 50, "tokens": 9000})
    return final, events


def test_replay_shows_each_step_as_it_was_not_the_final_job() -> None:
    final, events = finished_sft_log()
    out = io.StringIO()
    shown = p.JobProgress(out, tty=False)
    for e in events:
        shown.update(e, final)
    lines = [line.removeprefix("job-01234567 ") for line in out.getvalue().splitlines()]
    assert lines == [
        "state PENDING: created",  # never "UNSPECIFIED -> PENDING"
        "state PENDING -> RUNNING: worker starting",
        "step 0/50  val loss 4.5",  # the "before" figure
        "step 5/50  loss 4.2  val loss 4.5  ETA 1m30s",  # not the final val 3.883
        "step 25/50  loss 3.1  val loss 3.9  ETA 40s",
        "step 50/50  loss 2.8  val loss 3.883",  # no stale ETA, no "steps 50"
        "checkpoint step 50: /ck/final",
        "state RUNNING -> SUCCEEDED: trainer finished",
    ]


def test_live_line_fits_80_columns_by_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    job = running_job()
    job.metrics.clear()
    job.metrics.update(sft_metrics())
    out = io.StringIO()
    p.JobProgress(out, tty=True).update(ev(1, progress=as_progress(job)), job)
    line = out.getvalue().removeprefix("\r").removesuffix("\x1b[K")
    assert len(line) <= 79, line
    assert line == "sft job-01234567  RUNNING    step 120/1000  loss 2.5  2.1k tok/s  ETA 3m12s"
    # step, loss, ETA and tok/s first; then the rest as room allows; memory and the bar last.
    for part in ("step 120/1000", "loss 2.5", "ETA 3m12s", "2.1k tok/s"):
        assert part in line, (part, line)
    assert "peak_memory_gb" not in line and "█" not in line
    # Narrower: the rest goes first, then tok/s, then ETA; the step and loss stay.
    narrow = p.job_line(job, width=64)
    assert narrow == "sft job-01234567  RUNNING    step 120/1000  loss 2.5  ETA 3m12s"
    assert p.job_line(job, width=200).count("peak_memory_gb") == 1  # wide: everything


def test_loss_is_the_training_loss_of_every_method() -> None:
    assert p.loss_of(sft_metrics()) == 2.5  # SFT, DPO, ...: train_loss
    assert p.loss_of({"loss": 0.3, "reward_mean": 1.0}) == 0.3  # PPO / GRPO: the update loss
    assert p.loss_of({"val_loss": 1.0}) is None


def test_dpo_training_batch_and_held_out_metrics_are_labelled() -> None:
    job = c.Job(job_id="j", kind="dpo", state=c.JOB_STATE_RUNNING, step=10, total_steps=20)
    job.metrics.update({
        "train_loss": 0.52, "train_accuracies": 1.0, "train_margins": 0.81,
        "train_logps_chosen": -20.0, "val_loss": 0.679, "val_accuracies": 0.75,
        "val_margins": 0.31, "tokens_per_second": 850.0,
    })  # fmt: skip
    assert p.progress_text(job, with_bar=False) == (
        "step 10/20  loss 0.52  val loss 0.679  val acc 0.75  val margin 0.31  "
        "train acc 1  train margin 0.81  850 tok/s"
    )


def test_rollout_reward_and_kl_are_named_for_what_they_are() -> None:
    job = c.Job(job_id="j", kind="ppo", state=c.JOB_STATE_RUNNING, step=3, total_steps=9)
    job.metrics.update({"loss": 0.1, "reward_mean": 0.6, "kl": 0.02, "kl_coef": 0.2})
    assert p.progress_text(job, with_bar=False) == (
        "step 3/9  loss 0.1  reward 0.6  kl(ref) 0.02  kl_coef 0.2"
    )


def test_export_checkpoint_says_what_it_is() -> None:
    cp = ev(5, checkpoint=c.Checkpoint(path="/ck/final", kind=c.CHECKPOINT_KIND_FULL))
    assert p.event_line(cp, c.Job(kind="export")) == "exported model: /ck/final (full)"
    assert p.event_line(cp) == "checkpoint: /ck/final (full)"  # no "step 0"


def test_run_stream_prints_each_transition_once() -> None:
    run = make_run()
    created = ev(1, state_change=c.StateChange(to_state=c.JOB_STATE_PENDING, reason="created"))
    started = ev(2, state_change=c.StateChange(from_state=1, to_state=2, reason="worker"))
    requeued = ev(3, state_change=c.StateChange(from_state=2, to_state=1, reason="crashed"))
    done = ev(4, state_change=c.StateChange(from_state=2, to_state=3, reason="finished"))

    def job_ev(e: c.JobEvent) -> o.RunEvent:
        return o.RunEvent(job_event=o.StageJobEvent(stage="dpo", event=e))

    # The stage's own transitions say when its job was created, started and ended.
    assert [pr.run_event_line(job_ev(e), run) for e in (created, started, done)] == [None] * 3
    assert pr.run_event_line(job_ev(requeued), run) == "[dpo] state RUNNING -> PENDING: crashed"
    first = o.RunEvent(run_state_change=o.RunStateChange(to_state=1, reason="created"))
    assert pr.run_event_line(first) == "run PENDING: created"
    export = o.StageRun(name="export", kind=o.STAGE_KIND_EXPORT)
    run.stages.append(export)
    cp = o.StageJobEvent(stage="export", event=ev(5, checkpoint=c.Checkpoint(path="/ck/q4")))
    assert pr.run_event_line(o.RunEvent(job_event=cp), run) == "[export] exported model: /ck/q4"


def test_run_replay_starts_from_the_stages_not_the_final_run() -> None:
    final = make_run()
    final.state = o.RUN_STATE_SUCCEEDED
    shown = pr.RunProgress(final, io.StringIO(), tty=False)
    assert [s.state for s in shown.run.stages] == [o.STAGE_STATE_PENDING] * 2
    assert not shown.run.stages[1].job.step and shown.run.state == o.RUN_STATE_PENDING


def failed_log() -> tuple[c.Job, list[c.JobEvent]]:
    trace = "Traceback (most recent call last):\n  File ...\nValueError: dataset empty"
    final = c.Job(
        job_id="j", kind="sft", state=c.JOB_STATE_FAILED, error="ValueError: dataset empty"
    )
    return final, [
        ev(1, state_change=c.StateChange(to_state=1, reason="created")),
        ev(2, log=c.LogMessage(level="error", text=trace)),
        ev(3, state_change=c.StateChange(from_state=2, to_state=4, reason=final.error)),
    ]


@pytest.mark.parametrize("debug", [False, True])
def test_a_failure_is_said_once(debug: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if debug:
        monkeypatch.setenv("MLXU_DEBUG", "1")
    else:
        monkeypatch.delenv("MLXU_DEBUG", raising=False)
    final, events = failed_log()
    out = io.StringIO()
    shown = p.JobProgress(out, tty=False)
    for e in events:
        shown.update(e, final)
    shown.finish(final)
    text = out.getvalue()
    # The FAILED transition gives the reason; the summary does not repeat it, and the
    # worker's traceback (whose last line it is) shows only with MLXU_DEBUG=1.
    assert text.count("ValueError: dataset empty") == (2 if debug else 1), text
    assert ("Traceback" in text) == debug
    assert text.splitlines()[-1] == "sft j FAILED"
