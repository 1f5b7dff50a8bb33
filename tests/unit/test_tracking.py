"""MLflow and W&B sinks, really written offline and read back with the libraries' readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.runtime.jobs import tracking
from services.runtime.jobs.tracking import (
    FINISHED,
    KILLED,
    RunInfo,
    Tracking,
    TrackingConfig,
    flatten,
)
from tests.integration.helpers import read_wandb_records


@pytest.fixture(autouse=True)
def _file_store(monkeypatch):
    # MLflow 3 refuses its file store unless asked (it wants a database); tests stay offline.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


CONFIG = {"optimizer": {"learning_rate": 1e-4, "betas": [0.9, 0.999]}, "loop": {"max_steps": 3}}


def _info(out: Path) -> RunInfo:
    labels = {"mlxu.run_id": "run-1", "mlxu.stage": "sft", "team": "nlp"}
    return RunInfo("job-0123456789abcdef", "sft", "m:f", CONFIG, out, labels)


def test_config_comes_from_the_service_environment():
    assert TrackingConfig.from_env({}) == TrackingConfig()
    assert tracking.sinks_for(TrackingConfig()) == []  # nothing configured: nothing imported
    cfg = TrackingConfig.from_env(
        {"MLXU_MLFLOW_TRACKING_URI": "file:/x", "MLXU_WANDB_PROJECT": "p"}
    )
    assert [s.name for s in tracking.sinks_for(cfg)] == ["mlflow", "wandb"]
    assert cfg.mlflow_experiment == "mlxu"
    assert flatten(CONFIG) == {
        "optimizer.learning_rate": "0.0001",
        "optimizer.betas": "[0.9, 0.999]",
        "loop.max_steps": "3",
    }


def test_mlflow_run_has_params_steps_checkpoint_and_end_state(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    cfg = TrackingConfig(mlflow_uri=uri, mlflow_experiment="demo")
    t = Tracking.start(_info(tmp_path), cfg)
    for step in (1, 2, 3):
        t.log(step, {"train_loss": 4.0 / step, "learning_rate": 1e-4, "bad": float("nan")})
    t.log(3, {"val_loss": 1.5})
    t.finish(FINISHED, "/ckpt/final")

    run_id = json.loads((tmp_path / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "job-0123456789abcdef"
    assert client.get_experiment(run.info.experiment_id).name == "demo"
    assert run.data.params["optimizer.learning_rate"] == "0.0001"
    assert run.data.tags["mlxu.checkpoint"] == "/ckpt/final"
    assert run.data.tags["mlxu.kind"] == "sft" and run.data.tags["mlxu.run_id"] == "run-1"
    assert run.data.tags["mlxu.label.team"] == "nlp"
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 4.0), (2, 2.0), (3, 4.0 / 3)]
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == [3]
    assert "run/bad" not in run.data.metrics

    # A resumed attempt continues the same run, and a cancel ends it KILLED.
    again = Tracking.start(_info(tmp_path), cfg)
    assert client.get_run(run_id).info.status == "RUNNING"
    again.log(4, {"train_loss": 0.5})
    again.finish(KILLED)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_wandb_offline_run_records_config_steps_summary_and_exit(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = TrackingConfig(wandb_project="mlxu-test", wandb_mode="offline")
    t = Tracking.start(_info(tmp_path), cfg)
    assert [s.name for s in t.sinks] == ["wandb"]
    for step in (5, 10):
        t.log(step, {"train_loss": 10.0 / step})
    t.finish(FINISHED, "/ckpt/final")

    [run_dir] = (tmp_path / "wandb").glob("offline-run-*-job-0123456789abcdef")
    records = _complete(run_dir)
    kinds = [r.WhichOneof("record_type") for r in records]
    [run] = [r.run for r in records if r.HasField("run")]
    assert list(run.tags) == ["sft"]  # kind and stage, once
    assert (run.run_id, run.display_name, run.run_group, run.job_type) == (
        "job-0123456789abcdef",
        "job-0123456789abcdef",
        "run-1",
        "sft",
    )
    config = {
        i.key: json.loads(i.value_json)
        for r in records
        if r.HasField("config")
        for i in r.config.update
    }
    config.update({i.key: json.loads(i.value_json) for i in run.config.update})
    assert config["optimizer"]["learning_rate"] == 1e-4
    history = []
    for r in (r for r in records if r.HasField("history")):
        items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        history.append((r.history.step.num, items.get("train/loss")))
    assert history == [(5, 2.0), (10, 1.0)]
    summary = {
        i.key or "/".join(i.nested_key): json.loads(i.value_json)
        for r in records
        if r.HasField("summary")
        for i in r.summary.update
    }
    assert summary["mlxu.checkpoint"] == "/ckpt/final" and summary["mlxu.state"] == "FINISHED"
    [exit_record] = [r.exit for r in records if r.HasField("exit")]
    assert exit_record.exit_code == 0 and kinds[-1] in ("exit", "final", "footer")


def _complete(run_dir: Path, timeout: float = 20.0) -> list:
    """The run's records once wandb-core (its own process) has flushed the exit record."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(run_dir)
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


class _Broken:
    name = "broken"

    def __init__(self) -> None:
        self.calls = 0

    def open(self, info: RunInfo, run_id: str | None) -> str:
        return "id"

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.calls += 1
        raise ConnectionError("tracking server down")

    def finish(self, state: str, checkpoint: str | None) -> None:
        raise AssertionError("a disabled sink is not called again")


def test_a_failing_sink_is_switched_off_with_one_warning(tmp_path: Path, capsys):
    broken = _Broken()
    t = Tracking([broken])
    for step in range(3):
        t.log(step, {"train_loss": 1.0})
    t.finish(FINISHED)
    assert broken.calls == 1
    assert capsys.readouterr().out.count("tracking_sink_disabled") == 1


def test_an_unusable_tracking_uri_never_fails_the_job(tmp_path: Path, capsys):
    # A file: store under a regular file cannot be created: open fails, the job goes on.
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    t = Tracking.start(_info(tmp_path), TrackingConfig(mlflow_uri=f"file:{blocked}/mlruns"))
    assert t.sinks == []
    t.log(1, {"train_loss": 1.0})
    t.finish(FINISHED)
    assert "tracking_sink_disabled" in capsys.readouterr().out


@pytest.mark.parametrize("missing", ["mlflow", "wandb"])
def test_a_sink_without_its_library_says_which_extra(tmp_path: Path, capsys, monkeypatch, missing):
    import sys

    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, f"{missing}.tracking", None)
    monkeypatch.setitem(sys.modules, f"{missing}.entities", None)
    cfg = (
        TrackingConfig(mlflow_uri=f"file:{tmp_path}/m")
        if missing == "mlflow"
        else (TrackingConfig(wandb_project="p", wandb_mode="offline"))
    )
    assert Tracking.start(_info(tmp_path), cfg).sinks == []
    assert f"mlx-unified-training[{missing}]" in capsys.readouterr().out


async def test_jobs_end_their_mlflow_runs_finished_failed_and_killed(tmp_path: Path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tests.unit.test_job_runner import Env, until

    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLXU_MLFLOW_TRACKING_URI", uri)  # the service's env: workers inherit it
    env = Env(tmp_path)
    runner = env.runner(max_concurrent=3)
    try:
        ok = env.job("ok", steps=4)
        bad = env.job("bad", steps=4, fail_at_step=3)
        slow = env.job("slow", steps=500, step_delay_s=0.05)
        for job_id in (ok, bad, slow):
            await runner.submit(job_id)
        await until(lambda: env.store.get(slow).step >= 3, timeout=60, what="training")
        await runner.cancel(slow, "user asked")
        done = {j: await runner.wait(j, timeout=60) for j in (ok, bad, slow)}
    finally:
        await runner.shutdown(grace_s=0.5)
        env.kill_leftovers()

    client = MlflowClient(tracking_uri=uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "mlxu"]
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {j: runs[j].info.status for j in done} == {ok: "FINISHED", bad: "FAILED", slow: "KILLED"}
    assert runs[ok].data.tags["mlxu.checkpoint"] == done[ok].result["path"]
    assert runs[ok].data.params["steps"] == "4" and runs[ok].data.tags["mlxu.kind"] == "sft"
    history = client.get_metric_history(runs[ok].info.run_id, "run/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    losses = [e.payload["metrics"]["loss"] for e in env.events(ok, "progress")]
    assert [m.value for m in history] == pytest.approx(losses)
