"""The orchestrator driving the real training service on loopback: SFT -> SFT pipelines on
the tiny model, WatchRun, cancel, kill -9 of either process, and bad input."""

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


def client_for(orchestrator: str, training: str = "") -> MLXUClient:
    addrs = {"orchestrator": orchestrator, "training": training or "127.0.0.1:1"}
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
    assert [s.state for s in cancelled.stages] == [SS.STAGE_STATE_CANCELLED, SS.STAGE_STATE_PENDING]
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
    refused(lambda: c.run_pipeline("pl-missing"), grpc.StatusCode.NOT_FOUND)
    assert list(c.list_pipelines()) == [] and list(c.list_runs()) == []
    c.close()


def _watch_until(c: MLXUClient, run_id: str, seen: list, stop, after: int = 0) -> None:
    """Append run events to ``seen`` until ``stop(seen)``; the stream is closed after."""
    for ev in c.watch_run(run_id, after_seq=after):
        seen.append(ev)
        if stop(seen):
            return


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
    steps = progress_steps(events, "only")
    before = progress_steps(seen, "only")
    after = progress_steps(rest, "only")
    assert after and after[-1] == 200
    # Resumed from the newest checkpoint the worker had written, not from step 0.
    assert ckpt_step <= after[0] - 1 <= before[-1], (ckpt_step, before[-1], after[:3])
    assert after == list(range(after[0], 201))
    assert steps.count(1) == 1
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
    assert c.get_run(run.run_id).state in (RS.RUN_STATE_RUNNING, RS.RUN_STATE_SUCCEEDED)
    rest: list[opb.RunEvent] = []
    _watch_until(c, run.run_id, rest, lambda s: False, after=seen[-1].seq)
    assert c.get_run(run.run_id).state == RS.RUN_STATE_SUCCEEDED
    assert progress_steps(seen + rest, "one") == list(range(1, 41))
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
