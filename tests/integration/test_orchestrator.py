"""The orchestrator driving real trainer services on loopback, on the tiny model: SFT -> SFT
hand-off (by path and sha256), WatchRun, cache, cancel, kill -9 of the orchestrator or of the
training service, SIGTERM, bad input with nothing stored, API keys, auto_configure facts,
SFT -> DPO across two services, and the gRPC stage backend on its own."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from clients.client import ClientError, MLXUClient
from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from mlx_unified.v1 import training_pb2 as tpb
from tests.conftest import _kill_workers, free_port, write_jsonl

RS, SS = opb.RunState, opb.StageState
ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} plus {a}?"},
            {"role": "assistant", "content": f"{a} plus {a} is {2 * a}."},
        ]
    }
    for a in range(1, 25)
]


def sft_stage(name: str, steps: int, ckpt_every: int = 10, **inputs: str) -> opb.Stage:
    loop = cpb.LoopConfig(
        batch_size=4,
        max_steps=steps,
        steps_per_report=1,
        steps_per_eval=-1,
        steps_per_checkpoint=ckpt_every,
        max_seq_length=128,
        seed=1,
    )
    opt = cpb.OptimizerConfig(learning_rate=3e-3, schedule=cpb.LR_SCHEDULE_CONSTANT)
    spec = tpb.SFTSpec(
        method=cpb.FINETUNE_METHOD_LORA,
        lora=cpb.LoraConfig(rank=4, num_layers=-1),
        optimizer=opt,
        loop=loop,
    )
    binds = [opb.Binding(input=k, from_stage=v) for k, v in inputs.items()]
    return opb.Stage(name=name, kind=opb.STAGE_KIND_SFT, sft=spec, inputs=binds)


def pipeline_spec(model: Path, data: Path, *stages: opb.Stage) -> opb.PipelineSpec:
    return opb.PipelineSpec(
        name="sft-twice",
        base_model=cpb.ModelRef(model=str(model)),
        dataset=cpb.DatasetRef(path=str(data)),
        stages=list(stages),
    )


def client_for(orchestrator: str, training: str = "", **more: str) -> MLXUClient:
    addrs = {"orchestrator": orchestrator, "training": training or "127.0.0.1:1", **more}
    return MLXUClient(addresses=addrs, timeout=30, reconnect_timeout=60)


def payload(ev: opb.RunEvent) -> str:
    return ev.WhichOneof("payload")


def progress_steps(events: list[opb.RunEvent], stage: str) -> list[int]:
    return [
        e.job_event.event.progress.step
        for e in events
        if payload(e) == "job_event"
        and e.job_event.stage == stage
        and e.job_event.event.WhichOneof("payload") == "progress"
    ]


def job_events(events: list[opb.RunEvent], stage: str) -> list[cpb.JobEvent]:
    return [
        e.job_event.event
        for e in events
        if payload(e) == "job_event" and e.job_event.stage == stage
    ]


def assert_whole_job_log(events: list[opb.RunEvent], stage: str) -> None:
    """Every event of the stage's job relayed once, in order, through its terminal one."""
    evs = job_events(events, stage)
    assert [e.seq for e in evs] == list(range(1, len(evs) + 1))
    assert evs[-1].state_change.to_state == cpb.JOB_STATE_SUCCEEDED


def stage_states(events: list[opb.RunEvent], stage: str) -> list[int]:
    return [
        e.stage_state_change.to_state
        for e in events
        if payload(e) == "stage_state_change" and e.stage_state_change.stage == stage
    ]


def first_loss(events: list[opb.RunEvent], stage: str) -> float:
    for e in events:
        je = e.job_event
        if payload(e) == "job_event" and je.stage == stage and je.event.progress.step == 1:
            return je.event.progress.metrics["train_loss"]
    raise AssertionError(f"no step-1 progress for {stage}")


def assert_contiguous(events: list[opb.RunEvent]) -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


def training_jobs(c: MLXUClient) -> list[cpb.Job]:
    return list(c.list_jobs(service="training"))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", ROWS)


@pytest.fixture
def stack(serve):
    """Training + orchestrator servers in this process (each on its own loop thread); the
    distillation and rlhf endpoints point at a port where nothing listens."""
    training = serve("training")
    nowhere = f"127.0.0.1:{free_port()}"
    endpoints = {"training": training.address, "distillation": nowhere, "rlhf": nowhere}
    orch = serve("orchestrator", endpoints=endpoints)
    c = client_for(orch.address, training.address)
    yield c
    c.close()


def test_two_sft_stages_hand_off_the_adapter(stack: MLXUClient, tiny_model: Path, data: Path):
    c = stack
    spec = pipeline_spec(tiny_model, data, sft_stage("first", 12), sft_stage("second", 6))
    pl = c.create_pipeline(spec, request_id="create-1")
    assert c.create_pipeline(spec, request_id="create-1").pipeline_id == pl.pipeline_id
    resolved = json_format.MessageToDict(pl.resolved)
    second = resolved["stages"][1]
    assert second["spec"]["model"]["model"] == "${stages.first.result}"

    run = c.run_pipeline(pl.pipeline_id, request_id="run-1")
    events = list(c.watch_run(run.run_id))
    run = c.get_run(run.run_id)

    assert run.state == RS.RUN_STATE_SUCCEEDED, run.error
    assert_contiguous(events)
    assert payload(events[-1]) == "run_state_change"
    assert events[-1].run_state_change.to_state == RS.RUN_STATE_SUCCEEDED
    for name, steps in (("first", 12), ("second", 6)):
        assert stage_states(events, name) == [SS.STAGE_STATE_RUNNING, SS.STAGE_STATE_SUCCEEDED]
        assert progress_steps(events, name) == list(range(1, steps + 1))
        assert_whole_job_log(events, name)

    # The second stage trained base + the first stage's adapter: by path and by sha256.
    first, second = run.stages
    manifest = json.loads((Path(first.result.path) / "manifest.json").read_text())
    assert first.result.kind == cpb.CHECKPOINT_KIND_ADAPTER
    assert first.result.sha256 == manifest["sha256"] and manifest["job_id"] == first.job_id
    job2 = c.get_job(second.job_id)
    model = job2.resolved_config["model"]
    assert model["adapter_path"] == first.result.path
    assert model["model"] == str(tiny_model.resolve())
    assert job2.labels["mlxu.input.model.path"] == first.result.path
    assert job2.labels["mlxu.input.model.sha256"] == manifest["sha256"]
    assert job2.labels["mlxu.run_id"] == run.run_id
    # Starting from the trained adapter, stage two's first loss is already lower.
    assert first_loss(events, "second") < first_loss(events, "first") - 0.1
    assert run.result.path == second.result.path and run.result.sha256
    assert sorted(j.job_id for j in training_jobs(c)) == sorted([first.job_id, second.job_id])

    # Same inputs and config again: both stages come from the cache, no new job.
    run2 = c.run_pipeline(pl.pipeline_id)
    list(c.watch_run(run2.run_id))
    run2 = c.get_run(run2.run_id)
    assert run2.state == RS.RUN_STATE_SUCCEEDED
    assert [s.state for s in run2.stages] == [SS.STAGE_STATE_SKIPPED] * 2
    assert run2.stages[1].result.path == second.result.path
    assert len(training_jobs(c)) == 2


def test_cancel_mid_stage_ends_job_and_run(stack: MLXUClient, tiny_model: Path, data: Path):
    c = stack
    spec = pipeline_spec(tiny_model, data, sft_stage("long", 100_000), sft_stage("never", 5))
    run = c.run_pipeline(c.create_pipeline(spec).pipeline_id)
    seen = []
    for ev in c.watch_run(run.run_id):
        seen.append(ev)
        if progress_steps(seen, "long")[-1:] >= [3]:
            break
    tic = time.monotonic()
    cancelled = c.cancel_run(run.run_id, reason="changed my mind")
    took = time.monotonic() - tic

    assert cancelled.state == RS.RUN_STATE_CANCELLED, cancelled
    assert took < 10, took
    # The stage that never started ends CANCELLED with the run (issue 16), not PENDING.
    assert [s.state for s in cancelled.stages] == [SS.STAGE_STATE_CANCELLED] * 2
    assert "changed my mind" in cancelled.error or "changed my mind" in str(cancelled)
    job = c.get_job(cancelled.stages[0].job_id)
    assert job.state == cpb.JOB_STATE_CANCELLED
    rest = list(c.watch_run(run.run_id, after_seq=seen[-1].seq))
    assert_contiguous(seen + rest)
    assert rest[-1].run_state_change.to_state == RS.RUN_STATE_CANCELLED
    assert c.cancel_run(run.run_id).state == RS.RUN_STATE_CANCELLED  # idempotent
    assert len(training_jobs(c)) == 1


def test_bad_input_is_refused_and_nothing_is_stored(serve, tiny_model: Path, data: Path):
    nowhere = f"127.0.0.1:{free_port()}"
    endpoints = {"training": nowhere, "rlhf": nowhere, "distillation": ""}
    orch = serve("orchestrator", endpoints=endpoints)
    c = client_for(orch.address)

    def refused(call, code: grpc.StatusCode) -> ClientError:
        with pytest.raises(ClientError) as err:
            call()
        assert err.value.code == code, err.value
        return err.value

    ok = sft_stage("sft", 3)
    bad_kind = opb.Stage(name="mystery", kind=42)
    e = refused(
        lambda: c.create_pipeline(pipeline_spec(tiny_model, data, ok, bad_kind)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert any(v.field == "spec.stages[1].kind" for v in e.violations), e

    e = refused(
        lambda: c.create_pipeline_from_template("no-such-template", base_model=str(tiny_model)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v.field for v in e.violations] == ["template"]

    cyclic = pipeline_spec(
        tiny_model, data, sft_stage("a", 3, model="b"), sft_stage("b", 3, model="a")
    )
    e = refused(lambda: c.create_pipeline(cyclic), grpc.StatusCode.INVALID_ARGUMENT)
    assert (
        "no cycles"
        in {v.field: v.description for v in e.violations}["spec.stages[0].inputs[0].from_stage"]
    )

    # PPO with no reward source cannot be satisfied; invalid beats "rlhf is unreachable".
    ppo = opb.Stage(name="ppo", kind=opb.STAGE_KIND_PPO)
    e = refused(
        lambda: c.create_pipeline(pipeline_spec(tiny_model, data, ok, ppo)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "spec.stages[1].ppo.reward" in {v.field for v in e.violations}

    e = refused(
        lambda: c.create_pipeline(pipeline_spec(tiny_model, data, ok)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "stage 'sft'" in e.message and nowhere in e.message

    distill = opb.Stage(name="student", kind=opb.STAGE_KIND_DISTILL)
    distill.distill.student_init.num_layers = 1
    e = refused(
        lambda: c.create_pipeline(pipeline_spec(tiny_model, data, distill)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "distillation" in e.message and "'student'" in e.message

    over = {"stages": {"sft": {"sft": {"loop": {"max_steps": "many"}}}}, "colour": "blue"}
    e = refused(
        lambda: c.create_pipeline_from_template(
            "chatbot", base_model=str(tiny_model), dataset=str(data), overrides=over
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert {v.field for v in e.violations} == {
        "overrides.stages.sft.sft.loop.max_steps",
        "overrides.colour",
    }

    refused(lambda: c.start_training(ok), grpc.StatusCode.FAILED_PRECONDITION)
    e = refused(lambda: c.start_training(opb.Stage()), grpc.StatusCode.INVALID_ARGUMENT)
    assert [v.field for v in e.violations] == ["stage"], e
    refused(lambda: c.run_pipeline("pl-missing"), grpc.StatusCode.NOT_FOUND)
    assert list(c.list_pipelines()) == [] and list(c.list_runs()) == []
    c.close()


def _watch_until(c: MLXUClient, run_id: str, seen: list, stop, after: int = 0) -> None:
    """Append run events to ``seen`` until ``stop(seen)``; the stream is closed after."""
    for ev in c.watch_run(run_id, after_seq=after):
        seen.append(ev)
        if stop(seen):
            return


def _get_run_after_restart(c: MLXUClient, run_id: str, timeout: float = 15) -> opb.Run:
    """GetRun once the restarted orchestrator is reachable from this client: a channel to a
    restarted server may share a subchannel that is still in its reconnect backoff (<= 2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return c.get_run(run_id)
        except ClientError as e:
            if e.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        time.sleep(0.1)  # waiting for the reconnect, not for work


def _two_services(service_process, tiny_model: Path):
    training = service_process("training").start()
    orch = service_process("orchestrator")
    orch.env["MLXU_TRAINING_ADDR"] = training.address
    orch.env["MLXU_DISTILLATION_ADDR"] = orch.env["MLXU_RLHF_ADDR"] = ""
    orch.env["MLXU_ALLOWED_ROOTS"] += os.pathsep + str(tiny_model.parent)
    return training, orch.start()


def test_orchestrator_kill9_mid_run_resumes(service_process, tiny_model: Path, data: Path):
    training, orch = _two_services(service_process, tiny_model)
    c = client_for(orch.address, training.address)
    spec = pipeline_spec(tiny_model, data, sft_stage("first", 150, 25), sft_stage("second", 5))
    run = c.run_pipeline(c.create_pipeline(spec).pipeline_id)

    # A second watcher stays subscribed across the crash (the client reconnects itself).
    steady: list[opb.RunEvent] = []
    steady_client = client_for(orch.address)
    follower = threading.Thread(
        target=lambda: steady.extend(steady_client.watch_run(run.run_id)), daemon=True
    )
    follower.start()

    seen: list[opb.RunEvent] = []
    _watch_until(c, run.run_id, seen, lambda s: progress_steps(s, "first")[-1:] >= [5])
    orch.kill9()
    c.close()
    orch.start()
    c = client_for(orch.address, training.address)
    _get_run_after_restart(c, run.run_id)
    rest: list[opb.RunEvent] = []
    _watch_until(c, run.run_id, rest, lambda s: False, after=seen[-1].seq)
    follower.join(120)
    final = c.get_run(run.run_id)

    assert final.state == RS.RUN_STATE_SUCCEEDED, final.error
    events = seen + rest
    assert_contiguous(events)
    assert [e.seq for e in steady] == [e.seq for e in events]
    # Every job event relayed exactly once, across the restart.
    assert progress_steps(events, "first") == list(range(1, 151))
    assert progress_steps(events, "second") == list(range(1, 6))
    assert stage_states(events, "first") == [SS.STAGE_STATE_RUNNING, SS.STAGE_STATE_SUCCEEDED]
    assert_whole_job_log(events, "first")
    assert_whole_job_log(events, "second")
    jobs = training_jobs(c)
    assert sorted(j.job_id for j in jobs) == sorted(s.job_id for s in final.stages)
    assert [s.attempt for s in final.stages] == [1, 1]
    steady_client.close()
    c.close()


def test_training_kill9_mid_stage_resumes_from_checkpoint(
    service_process, home: Path, tiny_model: Path, data: Path
):
    training, orch = _two_services(service_process, tiny_model)
    c = client_for(orch.address, training.address)
    spec = pipeline_spec(tiny_model, data, sft_stage("only", 200, 20))
    run = c.run_pipeline(c.create_pipeline(spec).pipeline_id)

    def checkpointed(s: list[opb.RunEvent]) -> bool:
        ev = s[-1].job_event.event
        return ev.WhichOneof("payload") == "checkpoint" and ev.checkpoint.step >= 20

    seen: list[opb.RunEvent] = []
    _watch_until(c, run.run_id, seen, checkpointed)
    ckpt_step = seen[-1].job_event.event.checkpoint.step
    training.kill9()  # the service and its worker: a crash of the whole service
    _kill_workers(home)
    training.start()
    rest: list[opb.RunEvent] = []
    _watch_until(c, run.run_id, rest, lambda s: False, after=seen[-1].seq)
    final = c.get_run(run.run_id)

    assert final.state == RS.RUN_STATE_SUCCEEDED, final.error
    events = seen + rest
    assert_contiguous(events)
    # The job's own log, relayed: attempt 1 until the crash, requeued, attempt 2 resumes
    # after the newest checkpoint (steps the crash lost are trained again), to step 200.
    assert_whole_job_log(events, "only")
    job_events = [e.job_event.event for e in events if payload(e) == "job_event"]
    requeued = next(
        i
        for i, ev in enumerate(job_events)
        if ev.state_change.from_state == cpb.JOB_STATE_RUNNING
        and ev.state_change.to_state == cpb.JOB_STATE_PENDING
    )
    kinds = [ev.WhichOneof("payload") for ev in job_events]
    one = [
        ev.progress.step
        for ev, k in zip(job_events[:requeued], kinds, strict=False)
        if k == "progress"
    ]
    two = [
        ev.progress.step
        for ev, k in zip(job_events[requeued:], kinds[requeued:], strict=True)
        if k == "progress"
    ]
    ckpts = [
        ev.checkpoint.step
        for ev, k in zip(job_events[:requeued], kinds, strict=False)
        if k == "checkpoint"
    ]
    assert ckpt_step in ckpts and one == list(range(1, len(one) + 1))
    assert two == list(range(ckpts[-1] + 1, 201)), (ckpts, two[:3])
    jobs = training_jobs(c)
    assert [j.job_id for j in jobs] == [final.stages[0].job_id]
    assert jobs[0].attempts == 2 and final.stages[0].attempt == 1
    c.close()


def test_sigterm_leaves_runs_to_the_next_start(service_process, tiny_model: Path, data: Path):
    """A graceful orchestrator stop changes no run state; the next start picks it up."""
    training, orch = _two_services(service_process, tiny_model)
    c = client_for(orch.address, training.address)
    spec = pipeline_spec(tiny_model, data, sft_stage("one", 40, 20))
    run = c.run_pipeline(c.create_pipeline(spec).pipeline_id)
    seen: list[opb.RunEvent] = []
    _watch_until(c, run.run_id, seen, lambda s: bool(progress_steps(s, "one")))
    assert orch.terminate() == 0
    orch.start()
    after_restart = _get_run_after_restart(c, run.run_id)
    assert after_restart.state in (RS.RUN_STATE_RUNNING, RS.RUN_STATE_SUCCEEDED)
    rest: list[opb.RunEvent] = []
    _watch_until(c, run.run_id, rest, lambda s: False, after=seen[-1].seq)
    assert c.get_run(run.run_id).state == RS.RUN_STATE_SUCCEEDED
    assert progress_steps(seen + rest, "one") == list(range(1, 41))
    assert_whole_job_log(seen + rest, "one")
    c.close()


def test_watch_and_get_errors(stack: MLXUClient):
    c = stack
    for call in (lambda: c.get_run("run-nope"), lambda: list(c.watch_run("run-nope"))):
        with pytest.raises(ClientError) as err:
            call()
        assert err.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ClientError) as err:
        c.get_pipeline("")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    names = [t.name for t in c.list_templates()]
    assert names == ["chatbot", "efficient_llm", "aligned_model", "research"]


def test_api_key_is_sent_and_start_training_runs(serve, tiny_model: Path, data: Path, monkeypatch):
    """With keys on both services the orchestrator authenticates with its own key."""
    monkeypatch.delenv("MLXU_API_KEY", raising=False)
    monkeypatch.delenv("MLXU_API_KEYS", raising=False)
    keys = frozenset({"s3cret"})
    training = serve("training", api_keys=keys)
    orch = serve("orchestrator", api_keys=keys, endpoints={"training": training.address})
    anonymous = client_for(orch.address)
    with pytest.raises(ClientError) as err:
        anonymous.list_templates()
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    c = MLXUClient(
        addresses={"orchestrator": orch.address, "training": training.address}, api_key="s3cret"
    )
    stage = sft_stage("direct", 4)
    stage.sft.model.model = str(tiny_model)
    stage.sft.dataset.path = str(data)
    run = c.start_training(stage, request_id="direct-1")
    assert c.start_training(stage, request_id="direct-1").run_id == run.run_id
    events = list(c.watch_run(run.run_id))
    final = c.get_run(run.run_id)
    assert final.state == RS.RUN_STATE_SUCCEEDED, final.error
    assert progress_steps(events, "direct") == [1, 2, 3, 4]
    assert [j.job_id for j in training_jobs(c)] == [final.stages[0].job_id]
    anonymous.close()
    c.close()


def test_template_auto_configure_sizes_the_real_model(stack: MLXUClient, tiny_model: Path, data):
    from services.runtime.models import load_model, param_count

    over = {"stages": [{"name": "sft", "kind": "STAGE_KIND_SFT"}]}  # keep only what we serve
    pl = stack.create_pipeline_from_template(
        "chatbot", base_model=str(tiny_model), dataset=str(data), overrides=over, name="auto"
    )
    auto = json_format.MessageToDict(pl.resolved)["stages"][0]["auto_configure"]
    model, _ = load_model(str(tiny_model))
    assert auto["model_params"] == param_count(model)
    assert auto["dataset_rows"] == len(ROWS)
    chars = sum(len(m["content"]) + len(m["role"]) for r in ROWS for m in r["messages"])
    assert auto["dataset_tokens"] == round(chars / 4)
    assert auto["chosen"]["method"] == "FINETUNE_METHOD_FULL"  # 0.1M params fit anywhere
    assert auto["chosen"]["loop.epochs"] == 3 and auto["chosen"]["loop.max_steps"] >= 1
    assert [p.pipeline_id for p in stack.list_pipelines()] == [pl.pipeline_id]


def test_backend_translates_status_codes():
    from google.protobuf import any_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2
    from grpc import aio

    from orchestrator.backend import translate
    from services.runtime import errors

    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field="spec.loop.batch_size", description="< 1"
            )
        ]
    )
    detail = any_pb2.Any()
    detail.Pack(bad)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="bad", details=[detail])
    trailing = aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))

    def err(code: grpc.StatusCode, md=aio.Metadata()) -> aio.AioRpcError:
        return aio.AioRpcError(code, aio.Metadata(), md, details="why")

    got = translate(err(grpc.StatusCode.INVALID_ARGUMENT, trailing), "training StartSFT")
    assert isinstance(got, errors.InvalidArgument)
    assert [(v.field, v.description) for v in got.violations] == [("spec.loop.batch_size", "< 1")]
    for code, cls in (
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.Unavailable),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
        (grpc.StatusCode.UNAUTHENTICATED, errors.FailedPrecondition),
    ):
        got = translate(err(code), "training GetJob job-1")
        assert type(got) is cls and "training GetJob job-1" in str(got), (code, got)


def test_stage_the_service_rejects_fails_the_run_with_its_reason(
    stack: MLXUClient, tiny_model: Path, data: Path, tmp_path: Path
):
    # A setting the trainer refuses is refused up front, by the trainer's own checks
    # (issue 16): no pipeline, no run.
    stage = sft_stage("typo", 5)
    stage.sft.loop.batch_size = -2
    with pytest.raises(ClientError) as err:
        stack.create_pipeline(pipeline_spec(tiny_model, data, stage))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.stages[0].sft.loop.batch_size" in {v.field for v in err.value.violations}
    assert list(stack.list_pipelines()) == []
    # What only the service can know (its files) is asked of it up front (validate_only).
    stage = sft_stage("typo", 5)
    stage.sft.dataset.path = str(tmp_path / "not-there.jsonl")
    with pytest.raises(ClientError) as err:
        stack.create_pipeline(pipeline_spec(tiny_model, data, stage))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.stages[0].sft.dataset.path" in {v.field for v in err.value.violations}
    assert list(stack.list_pipelines()) == [] and training_jobs(stack) == []
    # A file that goes away after the pipeline was accepted fails the stage with its reason.
    gone = write_jsonl(tmp_path / "gone.jsonl", [{"text": f"row {i}"} for i in range(16)])
    stage.sft.dataset.path = str(gone)
    pl = stack.create_pipeline(pipeline_spec(tiny_model, data, stage))
    gone.unlink()
    run = stack.run_pipeline(pl.pipeline_id)
    events = list(stack.watch_run(run.run_id))
    final = stack.get_run(run.run_id)
    assert final.state == RS.RUN_STATE_FAILED
    assert final.stages[0].state == SS.STAGE_STATE_FAILED and not final.stages[0].job_id
    assert "spec.dataset.path" in final.error and "training" in final.error
    assert events[-1].run_state_change.to_state == RS.RUN_STATE_FAILED
    assert training_jobs(stack) == []


def test_sft_then_dpo_across_two_services(serve, tiny_model: Path, data: Path, tmp_path: Path):
    """The SFT adapter becomes the DPO policy and its frozen reference on the rlhf service."""
    training, rlhf = serve("training"), serve("rlhf")
    endpoints = {"training": training.address, "rlhf": rlhf.address}
    orch = serve("orchestrator", endpoints=endpoints)
    c = client_for(orch.address, training.address, rlhf=rlhf.address)
    prefs = write_jsonl(
        tmp_path / "prefs.jsonl",
        [{"prompt": f"What is {a} plus {a}?", "chosen": f"{2 * a}.", "rejected": f"{a}."}
         for a in range(1, 25)],
    )  # fmt: skip
    dpo = opb.Stage(name="dpo", kind=opb.STAGE_KIND_DPO)
    dpo.dpo.loop.CopyFrom(sft_stage("x", 4).sft.loop)
    dpo.dpo.method = cpb.FINETUNE_METHOD_LORA
    dpo.dpo.lora.CopyFrom(cpb.LoraConfig(rank=4, num_layers=-1))
    spec = pipeline_spec(tiny_model, data, sft_stage("sft", 6), dpo)
    # DPO on the pipeline's text rows cannot succeed: refused whole, before SFT spends time,
    # by the rlhf service's own checks (the SFT checkpoint stood in by the base model).
    with pytest.raises(ClientError) as err:
        c.create_pipeline(spec)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    fields = {v.field for v in err.value.violations}
    assert any(f.startswith("spec.stages[1].dpo.dataset") for f in fields), err.value
    assert not any(f.startswith("spec.stages[0]") for f in fields), err.value
    assert list(c.list_pipelines()) == [] and training_jobs(c) == []
    spec.datasets["dpo"].path = str(prefs)
    run = c.run_pipeline(c.create_pipeline(spec).pipeline_id)
    events = list(c.watch_run(run.run_id))
    final = c.get_run(run.run_id)

    assert final.state == RS.RUN_STATE_SUCCEEDED, final.error
    assert_contiguous(events)
    assert progress_steps(events, "dpo") == [1, 2, 3, 4]
    assert_whole_job_log(events, "dpo")
    sft, dpo_run = final.stages
    assert dpo_run.service == "rlhf"
    job = c.get_job(dpo_run.job_id, service="rlhf")
    for role in ("model", "reference"):
        assert job.labels[f"mlxu.input.{role}.path"] == sft.result.path
        assert job.labels[f"mlxu.input.{role}.sha256"] == sft.result.sha256
    assert final.result.path == dpo_run.result.path
    c.close()


async def test_backend_long_polls_and_translates_against_the_service(
    serve, tiny_model: Path, data: Path
):
    """GrpcStageBackend on its own: idempotent start, watch deadlines that end quietly and
    resume from the last seq, the service's errors as domain errors."""
    from orchestrator.backend import Deadlines, GrpcStageBackend
    from services.runtime import errors

    training = serve("training")
    nowhere = f"127.0.0.1:{free_port()}"
    backend = GrpcStageBackend(
        {"training": training.address, "rlhf": nowhere}, deadlines=Deadlines(watch=0.3)
    )
    spec = sft_stage("s", 30).sft
    spec.model.model, spec.dataset.path = str(tiny_model), str(data)
    job_id = await backend.start("sft", spec, "runs/r/stages/s/attempts/1")
    assert await backend.start("sft", spec, "runs/r/stages/s/attempts/1") == job_id

    seqs, watches, final = [], 0, None
    while final is None:
        watches += 1
        async for ev, job in backend.watch("sft", job_id, seqs[-1] if seqs else 0):
            seqs.append(ev.seq)
            if ev.state_change.to_state == cpb.JOB_STATE_SUCCEEDED:
                final = job
    assert seqs == list(range(1, len(seqs) + 1)) and final.result.path
    assert watches > 1  # the worker's start-up alone outlasts one 0.3 s long poll
    assert (await backend.get("sft", job_id)).state == cpb.JOB_STATE_SUCCEEDED
    await backend.cancel("sft", job_id, "too late")  # already ended: nothing to do

    with pytest.raises(errors.NotFound):
        await backend.get("sft", "job-nope")
    spec.loop.batch_size = -1
    with pytest.raises(errors.InvalidArgument) as bad:
        await backend.start("sft", spec, "runs/r/stages/s/attempts/2")
    assert "spec.loop.batch_size" in {v.field for v in bad.value.violations}
    with pytest.raises(errors.Unavailable):
        await backend.get("dpo", "job-1")
    down = await backend.unreachable({"training", "rlhf"})
    assert list(down) == ["rlhf"] and nowhere in down["rlhf"]
    await backend.close()
