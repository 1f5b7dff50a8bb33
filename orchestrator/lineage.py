"""What a registered version records about the run that made it: every stage up to the
one whose result it is, with kind, job, service and checkpoint, and that stage's resolved
config (as Pipeline.resolved shows it)."""

from __future__ import annotations

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from mlx_unified.v1 import registry_pb2 as rpb
from orchestrator.store import Store
from services.runtime.errors import FailedPrecondition, NotFound

__all__ = ["from_run"]

_DONE = (opb.STAGE_STATE_SUCCEEDED, opb.STAGE_STATE_SKIPPED)


def from_run(
    store: Store, run: opb.Run, stage: str = ""
) -> tuple[cpb.Checkpoint, rpb.ModelLineage, str]:
    """(checkpoint, lineage, base model) of ``stage``'s result (empty: the last stage)."""
    if not run.stages:
        raise FailedPrecondition(f"run {run.run_id} has no stages")
    names = [s.name for s in run.stages]
    if stage and stage not in names:
        raise NotFound(f"run {run.run_id} has no stage {stage!r} (stages: {', '.join(names)})")
    idx = names.index(stage) if stage else len(names) - 1
    last = run.stages[idx]
    if last.state not in _DONE or not last.result.path:
        raise FailedPrecondition(
            f"stage {last.name!r} of run {run.run_id} has no result "
            f"(it is {opb.StageState.Name(last.state)})"
        )
    pl = store.get_pipeline(run.pipeline_id)
    resolved = store.resolved(run.pipeline_id)
    lin = rpb.ModelLineage(
        pipeline_id=run.pipeline_id,
        run_id=run.run_id,
        stage=last.name,
        job_id=last.result.job_id or last.job_id,
        service=last.service,
    )
    configs = resolved.get("stages") or []
    if idx < len(configs):
        lin.config.update(configs[idx])
    for s in run.stages[: idx + 1]:
        lin.stages.append(
            rpb.LineageStage(
                stage=s.name,
                kind=s.kind,
                job_id=s.result.job_id or s.job_id,
                service=s.service,
                checkpoint=s.result,
                cached_from=s.cached_from,
            )
        )
    return last.result, lin, pl.spec.base_model.model
