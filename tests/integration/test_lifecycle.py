"""Issue 16: cancels are idempotent and say so, a cancelled run's later stages end
CANCELLED, and a cancel that races a job's completion records exactly one outcome with
artifacts that match it."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from mlx_unified.v1 import common_pb2, common_pb2_grpc, orchestrator_pb2_grpc
from mlx_unified.v1 import orchestrator_pb2 as opb
from tests.conftest import free_port
from tests.integration.race_trainer import ENTRY
from tests.integration.test_orchestrator import data, pipeline_spec, sft_stage  # noqa: F401

RS, SS = opb.RunState, opb.StageState


def _outcome(call) -> str:  # noqa: ANN001
    return dict(call.initial_metadata() or ()).get("x-mlxu-cancel", "")


def _until(pred, timeout: float = 120, what: str = "") -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling the state under test


def test_cancel_run_twice_says_so_and_later_stages_end_cancelled(serve, tiny_model, data):  # noqa: F811
    training = serve("training")
    nowhere = f"127.0.0.1:{free_port()}"
    orch = serve(
        "orchestrator",
        endpoints={"training": training.address, "rlhf": nowhere, "distillation": nowhere},
    )
    ch = grpc.insecure_channel(orch.address)
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(ch)
    spec = pipeline_spec(tiny_model, data, sft_stage("long", 100_000), sft_stage("never", 5))
    pl = stub.CreatePipeline(opb.CreatePipelineRequest(spec=spec)).pipeline
    run = stub.RunPipeline(opb.RunPipelineRequest(pipeline_id=pl.pipeline_id)).run

    def first_running() -> bool:
        r = stub.GetRun(opb.GetRunRequest(run_id=run.run_id)).run
        return r.stages[0].state == SS.STAGE_STATE_RUNNING

    _until(first_running, what="the first stage to run")
    req = opb.CancelRunRequest(run_id=run.run_id, reason="changed my mind")
    first, call1 = stub.CancelRun.with_call(req, timeout=60)
    second, call2 = stub.CancelRun.with_call(req, timeout=60)
    assert first.run.state == RS.RUN_STATE_CANCELLED
    assert (_outcome(call1), _outcome(call2)) == ("cancelled", "already-cancelled")
    assert second.run == first.run  # the second call changed nothing
    assert [s.state for s in first.run.stages] == [SS.STAGE_STATE_CANCELLED] * 2
    watch = stub.WatchRun(opb.WatchRunRequest(run_id=run.run_id), timeout=30)
    events = [r.event for r in watch]
    never = [
        e.stage_state_change
        for e in events
        if e.WhichOneof("payload") == "stage_state_change" and e.stage_state_change.stage == "never"
    ]
    assert [c.to_state for c in never] == [SS.STAGE_STATE_CANCELLED]
    assert "not started" in never[0].reason and "changed my mind" in never[0].reason
    assert events[-1].run_state_change.to_state == RS.RUN_STATE_CANCELLED
    # The job service says the same about its job.
    jobs_ch = grpc.insecure_channel(training.address)
    jobs = common_pb2_grpc.JobServiceStub(jobs_ch)
    cancel = common_pb2.CancelJobRequest(job_id=first.run.stages[0].job_id)
    again, call = jobs.CancelJob.with_call(cancel, timeout=30)
    assert again.job.state == common_pb2.JOB_STATE_CANCELLED
    assert _outcome(call) == "already-cancelled"
    jobs_ch.close()
    ch.close()


def _host(srv):  # noqa: ANN001, ANN202
    return srv.running.handle.on_start.__self__  # the service's JobsHost


def _start_race_job(srv, name: str):  # noqa: ANN001, ANN202
    host = _host(srv)
    job, _ = srv.call(
        host.start_job("race", ENTRY, {"wait_s": 30}, request_id="", output_name=name, labels={})
    )
    out = Path(job.output_dir)
    _until(lambda: (out / "ready").exists(), what="the trainer to write final/")
    return job, out


def _terminal_events(store, job_id: str) -> list:  # noqa: ANN001
    return [
        e for e in store.events(job_id) if e.type == "state" and e.payload["to"] in
        ("SUCCEEDED", "FAILED", "CANCELLED")
    ]  # fmt: skip


def test_cancel_that_wins_the_race_withdraws_the_final_checkpoint(serve):
    srv = serve("training")
    store = _host(srv).store
    job, out = _start_race_job(srv, "race-cancel")
    ch = grpc.insecure_channel(srv.address)
    jobs = common_pb2_grpc.JobServiceStub(ch)
    resp, call = jobs.CancelJob.with_call(
        common_pb2.CancelJobRequest(job_id=job.job_id, reason="race"), timeout=30
    )
    assert resp.job.state == common_pb2.JOB_STATE_CANCELLED and _outcome(call) == "cancelled"
    (out / "go").write_text("finish now")  # the trainer returns its result after the cancel
    _until(lambda: not (out / "final").exists(), 30, "final/ to be withdrawn")
    rec = store.get(job.job_id)
    assert rec.state == "CANCELLED" and rec.result is None
    assert [e.payload["to"] for e in _terminal_events(store, job.job_id)] == ["CANCELLED"]
    assert not any(p.name.startswith(".withdrawn") for p in out.iterdir())
    ch.close()


def test_completion_that_wins_the_race_keeps_its_result(serve):
    srv = serve("training")
    store = _host(srv).store
    job, out = _start_race_job(srv, "race-finish")
    (out / "go").write_text("finish now")
    _until(lambda: store.get(job.job_id).terminal, 60, "the job to finish")
    ch = grpc.insecure_channel(srv.address)
    jobs = common_pb2_grpc.JobServiceStub(ch)
    with pytest.raises(grpc.RpcError) as err:
        jobs.CancelJob(common_pb2.CancelJobRequest(job_id=job.job_id), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    rec = store.get(job.job_id)
    assert rec.state == "SUCCEEDED" and rec.result["path"] == str(out / "final")
    assert (out / "final" / "manifest.json").is_file()
    assert [e.payload["to"] for e in _terminal_events(store, job.job_id)] == ["SUCCEEDED"]
    ch.close()
