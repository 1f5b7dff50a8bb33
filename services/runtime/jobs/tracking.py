"""Optional experiment tracking: every job as an MLflow run and/or a Weights & Biases run.

Turned on per service, by its environment (workers inherit it), never per request: where a
tracking server lives and its credentials are deployment facts like ``MLXU_HOME``, both
libraries already read their credentials from the environment (``MLFLOW_TRACKING_TOKEN``,
``WANDB_API_KEY``), and a client must not point a service at an arbitrary ``file:`` URI
outside its confined roots.

MLXU_MLFLOW_TRACKING_URI  an MLflow tracking URI (http://host:5000, file:/data/mlruns, ...)
MLXU_MLFLOW_EXPERIMENT    its experiment (default "mlxu"; created when missing)
MLXU_WANDB_PROJECT        a W&B project; MLXU_WANDB_ENTITY (optional), MLXU_WANDB_MODE
                          ("online" / "offline"; default: wandb's own, e.g. WANDB_MODE)

Each library is imported only when its sink is configured (extras ``mlflow`` and
``wandb``). A run is named after the job and carries its resolved config as params, its
kind, entry and labels as tags (a pipeline stage's ``mlxu.run_id`` is its W&B group), every
reported scalar at its step (the TensorBoard names: ``train/loss``, ``val/loss``,
``run/learning_rate``), the final checkpoint's path (tag / summary ``mlxu.checkpoint``) and
ends FINISHED, FAILED or KILLED (cancelled or interrupted). The run ids are kept in
``<output_dir>/tracking.json``, so a resumed attempt continues the same run. A sink that
fails is logged once and switched off: tracking never fails a training job.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from services.runtime.jobs.scalars import tag

log = structlog.get_logger()

STATE_FILE = "tracking.json"
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
_PARAM_MAX = 6000  # MLflow's longest param value
_BATCH = 100  # MLflow's most params per log_batch


@dataclass(frozen=True)
class TrackingConfig:
    mlflow_uri: str = ""
    mlflow_experiment: str = "mlxu"
    wandb_project: str = ""
    wandb_entity: str = ""
    wandb_mode: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrackingConfig:
        e = os.environ if env is None else env
        return cls(
            mlflow_uri=e.get("MLXU_MLFLOW_TRACKING_URI", "").strip(),
            mlflow_experiment=e.get("MLXU_MLFLOW_EXPERIMENT", "").strip() or "mlxu",
            wandb_project=e.get("MLXU_WANDB_PROJECT", "").strip(),
            wandb_entity=e.get("MLXU_WANDB_ENTITY", "").strip(),
            wandb_mode=e.get("MLXU_WANDB_MODE", "").strip(),
        )


@dataclass(frozen=True)
class RunInfo:
    """What a sink knows about the job it tracks."""

    job_id: str
    kind: str
    entry: str
    config: dict[str, Any]
    output_dir: Path
    labels: dict[str, str] = field(default_factory=dict)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"optimizer": {"learning_rate": 1e-4}} -> {"optimizer.learning_rate": "0.0001"}."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:_PARAM_MAX]
    return out


def finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The reportable scalars under their TensorBoard names (NaN and inf are dropped)."""
    return {
        tag(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


class Sink(Protocol):
    name: str

    def open(self, info: RunInfo, run_id: str | None) -> str: ...
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def finish(self, state: str, checkpoint: str | None) -> None: ...


class MLflowSink:
    """MLflow through its client API (no global active run)."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri, self.experiment = uri, experiment
        self.client: Any = None
        self.run_id = ""

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment)
        except Exception:  # another job created it first
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def open(self, info: RunInfo, run_id: str | None) -> str:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id:  # a resumed attempt: same run, params already logged
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        tags = {"mlxu.job_id": info.job_id, "mlxu.kind": info.kind, "mlxu.entry": info.entry}
        for k, v in info.labels.items():  # the orchestrator's are mlxu.run_id, mlxu.stage, ...
            tags[k if k.startswith("mlxu.") else f"mlxu.label.{k}"] = v
        run = self.client.create_run(self._experiment_id(), run_name=info.job_id, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in flatten(info.config).items()]
        for i in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + _BATCH])
        return self.run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, state: str, checkpoint: str | None) -> None:
        if checkpoint:
            self.client.set_tag(self.run_id, "mlxu.checkpoint", checkpoint)
        self.client.set_terminated(self.run_id, status=state)


class WandbSink:
    """A W&B run in this worker process; its files go under the job's output dir."""

    name = "wandb"

    def __init__(self, project: str, entity: str = "", mode: str = "") -> None:
        self.project, self.entity, self.mode = project, entity, mode
        self.run: Any = None

    def open(self, info: RunInfo, run_id: str | None) -> str:
        import wandb

        self.run = wandb.init(
            project=self.project,
            entity=self.entity or None,
            mode=self.mode or None,  # type: ignore[arg-type]
            id=run_id or info.job_id,
            resume="allow",
            name=info.job_id,
            dir=str(info.output_dir),
            config=info.config,
            job_type=info.kind or None,
            group=info.labels.get("mlxu.run_id") or None,
            tags=sorted({t for t in (info.kind, info.labels.get("mlxu.stage")) if t}),
            settings=wandb.Settings(console="off", silent=True),
        )
        return self.run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self, state: str, checkpoint: str | None) -> None:
        if checkpoint:
            self.run.summary["mlxu.checkpoint"] = checkpoint
        self.run.summary["mlxu.state"] = state
        # W&B has no "killed" to set: a non-zero exit code marks the run failed.
        self.run.finish(exit_code=0 if state == FINISHED else 1)


def sinks_for(cfg: TrackingConfig) -> list[Sink]:
    sinks: list[Sink] = []
    if cfg.mlflow_uri:
        sinks.append(MLflowSink(cfg.mlflow_uri, cfg.mlflow_experiment))
    if cfg.wandb_project:
        sinks.append(WandbSink(cfg.wandb_project, cfg.wandb_entity, cfg.wandb_mode))
    return sinks


class Tracking:
    """Fans a job's params, scalars and end out to the configured sinks."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = list(sinks)

    @classmethod
    def start(cls, info: RunInfo, cfg: TrackingConfig | None = None) -> Tracking:
        sinks = sinks_for(cfg or TrackingConfig.from_env())
        self = cls([])
        if not sinks:
            return self
        path = Path(info.output_dir) / STATE_FILE
        try:
            ids = json.loads(path.read_text())
        except (OSError, ValueError):
            ids = {}
        for sink in sinks:
            try:
                ids[sink.name] = sink.open(info, ids.get(sink.name))
                self.sinks.append(sink)
            except Exception as exc:  # noqa: BLE001 - tracking is a view; training goes on
                _warn(sink, "open", exc)
        try:
            path.write_text(json.dumps(ids))
        except OSError as exc:
            log.warning("tracking_ids_not_saved", error=str(exc))
        return self

    def _each(self, what: str, call: Any) -> None:
        for sink in list(self.sinks):
            try:
                call(sink)
            except Exception as exc:  # noqa: BLE001
                self.sinks.remove(sink)
                _warn(sink, what, exc)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        values = finite(metrics)
        if self.sinks and values:
            self._each("log", lambda s: s.log(int(step), values))

    def finish(self, state: str, checkpoint: str | None = None) -> None:
        self._each("finish", lambda s: s.finish(state, checkpoint))
        self.sinks = []


def _warn(sink: Sink, what: str, exc: BaseException) -> None:
    hint = f" (install the extra: mlx-unified-training[{sink.name}])"
    why = f"{type(exc).__name__}: {exc}" + (hint if isinstance(exc, ImportError) else "")
    log.warning("tracking_sink_disabled", sink=sink.name, during=what, error=why)
