"""YAML -> spec mapping, CLI parsing, and the client + CLI against a fake in-process server
(stream reconnects, error details, exit codes). No real services needed."""

from __future__ import annotations

import json
import re
import sys
import types
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from clients import cli, config
from clients.client import ClientError, FieldViolation, MLXUClient
from mlx_unified.v1 import common_pb2 as c
from mlx_unified.v1 import (
    common_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    orchestrator_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from mlx_unified.v1 import orchestrator_pb2 as o

MLX_LM_YAML = """
model: "mlx_model"
train: true
fine_tune_type: lora
optimizer: adamw
data: "/data/wikisql"
seed: 7
num_layers: 8
batch_size: 2
iters: 1000
val_batches: 25
learning_rate: 1e-5
steps_per_report: 10
steps_per_eval: 200
resume_adapter_file: null
adapter_path: "my-adapters"
save_every: 100
test: false
max_seq_length: 2048
grad_checkpoint: true
mask_prompt: true
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 16
  scale: 10.0
  dropout: 0.05
lr_schedule:
  name: cosine_decay
  warmup: 100
  arguments: [2e-5, 1000, 1e-7]
optimizer_config:
  adamw:
    betas: [0.9, 0.98]
    eps: 1e-6
    weight_decay: 0.05
"""


# ---- YAML mapping ---------------------------------------------------------------------------


def test_mlx_lm_config_maps_to_sft_spec(tmp_path: Path) -> None:
    path = tmp_path / "lora.yaml"
    path.write_text(MLX_LM_YAML)
    built = config.load_spec("sft", path)
    s = built.spec
    assert isinstance(s, training_pb2.SFTSpec)
    assert (s.model.model, s.dataset.path, s.output_name) == (
        "mlx_model",
        "/data/wikisql",
        "my-adapters",
    )
    assert s.method == c.FINETUNE_METHOD_LORA
    assert (s.lora.rank, s.lora.scale, s.lora.num_layers) == (16, 10.0, 8)
    assert s.lora.dropout == pytest.approx(0.05)
    assert list(s.lora.keys) == ["self_attn.q_proj", "self_attn.v_proj"]
    o = s.optimizer
    assert o.name == c.OPTIMIZER_NAME_ADAMW and o.schedule == c.LR_SCHEDULE_COSINE
    # as in mlx-lm, the schedule's first argument is the learning rate
    assert o.learning_rate == pytest.approx(2e-5)
    assert (o.warmup_steps, o.beta1, o.beta2) == (100, pytest.approx(0.9), pytest.approx(0.98))
    assert o.eps == pytest.approx(1e-6) and o.weight_decay == pytest.approx(0.05)
    assert o.min_lr_ratio == pytest.approx(1e-7 / 2e-5)
    L = s.loop
    assert (L.max_steps, L.batch_size, L.seed, L.max_seq_length) == (1000, 2, 7, 2048)
    assert (L.steps_per_report, L.steps_per_eval, L.val_batches) == (10, 200, 25)
    assert L.steps_per_checkpoint == 100 and L.grad_checkpoint and L.mask_prompt
    assert any(n.startswith("train: ignored") for n in built.notes)
    assert any("lr_schedule takes precedence over learning_rate" in n for n in built.notes)


def test_yaml_scientific_notation_is_a_number() -> None:
    data = config.parse_yaml("learning_rate: 1e-5\nbatch_size: 4\n")
    assert data == {"learning_rate": 1e-5, "batch_size": 4}


def test_native_keys_with_shortcuts() -> None:
    data = config.parse_yaml(
        """
model: {model: tiny-llama, adapter_path: /ck/a}
dataset: {path: /d/train.jsonl, format: chat, valid_fraction: 0.2}
method: qlora
quantization: {bits: 8, group_size: 32}
optimizer: {name: lion, learning_rate: 3e-4, schedule: linear, grad_clip_norm: 1.0}
loop: {max_steps: 50, grad_accumulation_steps: 2, dtype: bfloat16}
resources: {num_processes: 2, backend: ring}
labels: {team: nlp, run: 3}
"""
    )
    s = config.build_spec("sft", data).spec
    assert (s.model.model, s.model.adapter_path) == ("tiny-llama", "/ck/a")
    assert s.dataset.format == c.DATASET_FORMAT_CHAT and s.dataset.valid_fraction == 0.2
    assert s.method == c.FINETUNE_METHOD_QLORA and s.quantization.bits == 8
    assert (
        s.optimizer.name == c.OPTIMIZER_NAME_LION and s.optimizer.schedule == c.LR_SCHEDULE_LINEAR
    )
    assert (s.loop.max_steps, s.loop.grad_accumulation_steps, s.loop.dtype) == (50, 2, "bfloat16")
    assert s.resources.num_processes == 2 and s.resources.backend == c.DISTRIBUTED_BACKEND_RING
    assert dict(s.labels) == {"team": "nlp", "run": "3"}


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"itres": 3}, "itres", "did you mean 'iters'?"),
        ({"loop": {"max_stps": 1}}, "loop.max_stps", "did you mean 'max_steps'?"),
        ({"lora_parameters": {"lora_alpha": 16}}, "lora_parameters.lora_alpha", "unknown key"),
        ({"optimizer_config": {"adam": {"foo": 1}}}, "optimizer_config.adam.foo", "unknown key"),
        ({"iters": "many"}, "iters", "expected an integer"),
        ({"method": "lorax"}, "method", "one of: full, lora, dora, qlora"),
        ({"lr_schedule": {"name": "exponential_decay"}}, "lr_schedule.name", "unsupported"),
        ({"hf_dataset": {"name": "x"}}, "hf_dataset", "no hub datasets"),
        ({"iters": 5, "loop": {"max_steps": 6}}, "loop", "conflicts with 'iters'"),
    ],
)
def test_bad_keys_are_named(data: dict, key: str, fragment: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.build_spec("sft", data)
    assert err.value.key == key
    assert fragment in str(err.value)


def test_same_value_twice_is_not_a_conflict() -> None:
    s = config.build_spec("sft", {"iters": 5, "loop": {"max_steps": 5}}).spec
    assert s.loop.max_steps == 5


def test_alias_of_another_spec_is_unknown_here() -> None:
    with pytest.raises(config.ConfigError, match="iters: unknown key for a export spec"):
        config.build_spec("export", {"iters": 3})


def test_overrides_beat_yaml() -> None:
    data = config.parse_yaml(MLX_LM_YAML)
    overrides = {
        "iters": 5,
        "learning_rate": 3e-4,  # beats the lr_schedule value too
        "model": "other",
        "method": "dora",
        "data": None,  # a flag not given: YAML stays
        "loop.steps_per_eval": 2,
    }
    s = config.build_spec("sft", data, overrides).spec
    assert s.loop.max_steps == 5 and s.optimizer.learning_rate == pytest.approx(3e-4)
    assert s.model.model == "other" and s.method == c.FINETUNE_METHOD_DORA
    assert s.dataset.path == "/data/wikisql" and s.loop.steps_per_eval == 2


def test_override_keeps_sibling_fields() -> None:
    data = {"model": {"model": "base", "adapter_path": "/ck/a"}}
    s = config.build_spec("sft", data, {"model": "other"}).spec
    assert (s.model.model, s.model.adapter_path) == ("other", "/ck/a")


def test_other_kinds() -> None:
    d = config.build_spec(
        "distill",
        {
            "model": "student",
            "teacher": ["t1", "t2"],
            "divergence": "jsd",
            "alpha": 0.7,
            "iters": 9,
        },
    ).spec
    assert d.student.model == "student" and [t.model.model for t in d.teachers] == ["t1", "t2"]
    assert d.divergence == 3 and d.alpha == pytest.approx(0.7) and d.loop.max_steps == 9
    dpo = config.build_spec(
        "dpo", {"model": "p", "reference": "r", "loss": "ipo", "beta": 0.2}
    ).spec
    assert (dpo.policy.model, dpo.reference.model, dpo.loss, dpo.beta) == ("p", "r", 2, 0.2)
    g = config.build_spec(
        "grpo",
        {
            "model": "p",
            "reward_function": "length",
            "group_size": 8,
            "rollout": {"sampling": {"temperature": 0.7}},
        },
    ).spec
    assert (g.reward.reward_function, g.group_size) == ("length", 8)
    assert g.rollout.sampling.temperature == pytest.approx(0.7)
    rm = config.build_spec(
        "reward-model", {"model": "m", "use_margin": True, "data": "p.jsonl"}
    ).spec
    assert rm.use_margin and rm.dataset.path == "p.jsonl"
    e = config.build_spec(
        "export", {}, {"model": "m", "adapter": "/ck/a/adapters.safetensors", "mode": "fuse"}
    ).spec
    assert (e.model.adapter_path, e.mode) == ("/ck/a", 1)


def test_pipeline_yaml() -> None:
    data = config.parse_yaml(
        """
name: sft-then-dpo
model: tiny-llama
data: /d/chat.jsonl
datasets: {dpo: /d/prefs.jsonl}
stages:
  - name: sft
    kind: sft
    iters: 20
    lora_parameters: {rank: 4}
  - name: dpo
    kind: dpo
    config: {beta: 0.3, iters: 10}
    inputs: [{input: reference, from_stage: sft}]
"""
    )
    spec, _ = config.build_pipeline(data, {"name": "renamed"})
    assert spec.name == "renamed" and spec.base_model.model == "tiny-llama"
    assert spec.datasets["dpo"].path == "/d/prefs.jsonl"
    sft, dpo = spec.stages
    assert (
        sft.WhichOneof("spec") == "sft" and sft.sft.loop.max_steps == 20 and sft.sft.lora.rank == 4
    )
    assert dpo.dpo.beta == pytest.approx(0.3) and dpo.inputs[0].from_stage == "sft"
    with pytest.raises(config.ConfigError) as err:
        config.build_pipeline({"stages": [{"kind": "dpo", "itres": 1}]})
    assert err.value.key == "stages[0].itres"


def test_existing_relative_paths_become_absolute(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    (tmp_path / "ck").mkdir()
    spec = config.build_spec(
        "distill",
        {"model": "tiny-llama", "teacher": ["ck", "org/hub-model"], "data": "data/train.jsonl"},
    ).spec
    config.absolutize_paths(spec, base=tmp_path)
    assert spec.student.model == "tiny-llama"  # a registered name, not a local path
    assert [t.model.model for t in spec.teachers] == [str(tmp_path / "ck"), "org/hub-model"]
    assert spec.dataset.path == str(tmp_path / "data" / "train.jsonl")
    pipe, _ = config.build_pipeline({"datasets": {"dpo": "data/train.jsonl"}})
    config.absolutize_paths(pipe, base=tmp_path)
    assert pipe.datasets["dpo"].path == str(tmp_path / "data" / "train.jsonl")


# ---- argument parsing ------------------------------------------------------------------------


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_parse_train_sft() -> None:
    a = parse(
        "train",
        "sft",
        "-c",
        "run.yaml",
        "--iters",
        "10",
        "--learning-rate",
        "2e-4",
        "--method",
        "dora",
        "--set",
        "loop.seed=3",
        "--no-wait",
        "--request-id",
        "r1",
    )
    assert (a.func, a.train_kind, a.config, a.iters, a.learning_rate) == (
        cli.cmd_train,
        "sft",
        "run.yaml",
        10,
        2e-4,
    )
    assert (a.method, a.set, a.no_wait, a.request_id) == ("dora", ["loop.seed=3"], True, "r1")
    assert cli._train_overrides(a)["iters"] == 10
    assert cli._train_overrides(a)["loop.seed"] == 3


def test_global_flags_before_or_after_the_subcommand() -> None:
    a = parse("--address", "h:1", "--json", "jobs", "list")
    b = parse("jobs", "list", "--address", "h:1", "--json")
    assert (a.address, a.json) == (b.address, b.json) == ("h:1", True)
    assert not hasattr(parse("jobs", "list"), "json")  # main() fills the default


def test_parse_other_commands() -> None:
    w = parse("jobs", "watch", "job-1", "--service", "rlhf", "--after-seq", "4")
    assert (w.jobs_cmd, w.job_id, w.service, w.after_seq) == ("watch", "job-1", "rlhf", 4)
    g = parse("generate", "--prompt", "hi", "--chat", "--max-tokens", "5", "--temperature", "0.7")
    assert (g.model, g.chat, g.max_tokens, g.temperature) == ("smollm2-135m-instruct", True, 5, 0.7)
    e = parse("export", "quantize", "--model", "m", "--bits", "8")
    assert (e.mode, e.bits, e.func) == ("quantize", 8, cli.cmd_export)
    with pytest.raises(SystemExit):
        parse("export", "quantize", "--model", "m", "--bits", "3")
    p = parse(
        "pipeline",
        "create",
        "--template",
        "chatbot",
        "--model",
        "m",
        "--run",
        "--no-auto-configure",
    )
    assert (p.template, p.run, p.auto_configure) == ("chatbot", True, False)
    s = parse("serve", "rlhf", "--port", "9400")
    assert (s.service, s.port, s.func) == ("rlhf", 9400, cli.cmd_serve)
    d = parse("train", "distill", "--teacher", "a", "--teacher", "b", "--model", "s")
    assert d.teacher == ["a", "b"]


def test_serve_calls_the_server_main(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    fake = types.ModuleType("services.runtime.rpc.server")
    fake.main = lambda service, **kw: calls.append((service, kw))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "services.runtime.rpc.server", fake)
    assert cli.main(["serve", "training", "--port", "9500", "--home", "/tmp/h"]) == 0
    assert calls == [("training", {"host": None, "port": 9500, "home": "/tmp/h"})]


def test_dry_run_prints_the_spec(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny-llama\ndata: d.jsonl\niters: 100\nlabels: {a: '1'}\n")
    rc = cli.main(["train", "sft", "-c", str(path), "--iters", "7", "--label", "b=2", "--dry-run"])
    spec = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert spec["loop"]["max_steps"] == "7"  # int64 is a JSON string in proto3
    assert spec["labels"] == {"a": "1", "b": "2"}


def test_config_error_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nitres: 3\n")
    assert cli.main(["train", "sft", "-c", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["config error: itres: unknown key for a sft spec (did you mean 'iters'?)"]


def test_unreachable_service_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert (
        cli.main(
            ["--address", "127.0.0.1:1", "--timeout", "5", "jobs", "show", "j", "--service", "rlhf"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE") and "Traceback" not in err


# ---- client and CLI against a fake server ---------------------------------------------------

JOB_ID = "job-1"


def snapshot(state: int, step: int = 0, **kw: object) -> c.Job:
    return c.Job(job_id=JOB_ID, kind="sft", state=state, step=step, total_steps=3, **kw)


def script(final: c.Job) -> list[tuple[c.JobEvent, c.Job]]:
    """The event log of a 3-step job ending in ``final``'s state."""
    R = c.JOB_STATE_RUNNING
    out = [(c.JobEvent(seq=1, state_change=c.StateChange(from_state=1, to_state=R)), snapshot(R))]
    for step in (1, 2, 3):
        p = c.Progress(step=step, total_steps=3, metrics={"loss": 3.0 - step})
        out.append((c.JobEvent(seq=1 + step, progress=p), snapshot(R, step, metrics=p.metrics)))
    cp = c.Checkpoint(path="/ck/final", step=3)
    out.append((c.JobEvent(seq=5, checkpoint=cp), snapshot(R, 3)))
    end = c.StateChange(from_state=R, to_state=final.state, reason=final.error)
    out.append((c.JobEvent(seq=6, state_change=end), final))
    for ev, _ in out:
        ev.job_id = JOB_ID
    return out


class FakeService(
    common_pb2_grpc.JobServiceServicer,
    training_pb2_grpc.TrainingServiceServicer,
    generation_pb2_grpc.GenerationServiceServicer,
):
    def __init__(self) -> None:
        self.final = snapshot(c.JOB_STATE_SUCCEEDED, 3, result=c.Checkpoint(path="/ck/final"))
        self.events = script(self.final)
        self.break_after: int | None = None  # first WatchJob dies after this seq
        self.skip: set[int] = set()  # seqs never sent (a broken server)
        self.watch_calls: list[int] = []
        self.requests: list = []
        self.keys: list[str | None] = []

    def _seen(self, request, context) -> None:
        self.requests.append(request)
        self.keys.append(dict(context.invocation_metadata()).get("x-api-key"))

    def StartSFT(self, request, context):
        self._seen(request, context)
        if request.spec.model.model == "bad":
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field="spec.model.model", description="unknown model 'bad'"
                    )
                ]
            )
            detail = any_pb2.Any()
            detail.Pack(bad)
            status = status_pb2.Status(
                code=code_pb2.INVALID_ARGUMENT, message="invalid spec", details=[detail]
            )
            context.abort_with_status(rpc_status.to_status(status))
        return training_pb2.StartSFTResponse(job=snapshot(c.JOB_STATE_PENDING), created=True)

    def GetJob(self, request, context):
        if request.job_id != JOB_ID:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job {request.job_id}")
        return c.GetJobResponse(job=self.final)

    def WatchJob(self, request, context):
        self.watch_calls.append(request.after_seq)
        first = len(self.watch_calls) == 1
        # Replays one event the client already has: it must drop the duplicate.
        for ev, job in self.events[max(request.after_seq - 1, 0) :]:
            if first and self.break_after is not None and ev.seq > self.break_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "server going away")
            if ev.seq not in self.skip:
                yield c.WatchJobResponse(event=ev, job=job)

    def Generate(self, request, context):
        self._seen(request, context)
        yield generation_pb2.GenerateResponse(text="Hel", prompt_tokens=4, completion_tokens=1)
        yield generation_pb2.GenerateResponse(
            text="lo", finish_reason=1, prompt_tokens=4, completion_tokens=2, tokens_per_second=9
        )


@pytest.fixture
def fake() -> tuple[FakeService, str]:
    service = FakeService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    common_pb2_grpc.add_JobServiceServicer_to_server(service, server)
    training_pb2_grpc.add_TrainingServiceServicer_to_server(service, server)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, f"127.0.0.1:{port}"
    server.stop(None)


def test_watch_job_reconnects_without_gaps_or_duplicates(fake) -> None:
    service, address = fake
    service.break_after = 3
    retries = []
    with MLXUClient(address) as client:
        seen = [
            (e.seq, j.step)
            for e, j in client.watch_job(JOB_ID, on_retry=lambda e, d: retries.append(e.code))
        ]
    assert seen == [(1, 0), (2, 1), (3, 2), (4, 3), (5, 3), (6, 3)]
    assert service.watch_calls == [0, 3]  # resumed after the last event seen
    assert retries == [grpc.StatusCode.UNAVAILABLE]


def test_watch_job_resumes_from_after_seq(fake) -> None:
    service, address = fake
    with MLXUClient(address) as client:
        assert [e.seq for e, _ in client.watch_job(JOB_ID, after_seq=4)] == [5, 6]


def test_watch_job_refuses_a_gap(fake) -> None:
    service, address = fake
    service.skip = {4}
    with MLXUClient(address) as client, pytest.raises(ClientError) as err:
        list(client.watch_job(JOB_ID))
    assert err.value.code == grpc.StatusCode.DATA_LOSS
    assert service.watch_calls == [0, 3]  # resubscribed once, then gave up


def test_train_end_to_end(fake, capsys: pytest.CaptureFixture) -> None:
    service, address = fake
    service.break_after = 2
    argv = [
        "--address",
        address,
        "--api-key",
        "k1",
        "train",
        "sft",
        "--model",
        "m",
        "--data",
        "d.jsonl",
        "--iters",
        "3",
    ]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out == "/ck/final\n"  # stdout carries only the checkpoint path
    assert "started sft job job-1" in err and "SUCCEEDED" in err and "reconnecting" in err
    (req,) = service.requests
    assert (req.spec.model.model, req.spec.loop.max_steps) == ("m", 3)
    assert service.keys == ["k1"]


def test_train_failed_job_exit_1(fake, capsys: pytest.CaptureFixture) -> None:
    service, address = fake
    service.final = snapshot(c.JOB_STATE_FAILED, 2, error="loss became NaN")
    service.events = script(service.final)
    assert cli.main(["--address", address, "train", "sft", "--model", "m"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "RUNNING -> FAILED: loss became NaN" in err
    assert err.count("loss became NaN") == 1, err  # errors print once


def test_invalid_argument_lists_field_violations(fake, capsys: pytest.CaptureFixture) -> None:
    _, address = fake
    assert cli.main(["--address", address, "train", "sft", "--model", "bad"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "error: INVALID_ARGUMENT: invalid spec",
        "  spec.model.model: unknown model 'bad'",
    ]
    with MLXUClient(address) as client, pytest.raises(ClientError) as e:
        client.start_sft(config.build_spec("sft", {"model": "bad"}).spec)
    assert [(v.field, v.description) for v in e.value.violations] == [
        ("spec.model.model", "unknown model 'bad'")
    ]


def test_jobs_show_not_found_exit_2(fake, capsys: pytest.CaptureFixture) -> None:
    _, address = fake
    assert cli.main(["--address", address, "jobs", "show", "nope"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err


def test_generate_streams_to_stdout(fake, capsys: pytest.CaptureFixture) -> None:
    service, address = fake
    assert (
        cli.main(
            ["--address", address, "generate", "--prompt", "hi", "--chat", "--max-tokens", "2"]
        )
        == 0
    )
    assert capsys.readouterr().out == "Hello\n"
    (req,) = service.requests
    assert [(m.role, m.content) for m in req.chat.messages] == [("user", "hi")]
    assert req.sampling.max_tokens == 2
    assert cli.main(["--address", address, "--json", "generate", "--prompt", "hi"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == {
        "text": "Hello",
        "finish_reason": "stop",
        "prompt_tokens": 4,
        "completion_tokens": 2,
        "tokens_per_second": 9.0,
    }


class FakeOrchestrator(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    def __init__(self) -> None:
        self.final = o.Run(run_id="run-1", pipeline_id="pipe-1", state=o.RUN_STATE_SUCCEEDED)
        self.final.stages.add(name="sft", kind=o.STAGE_KIND_SFT, state=o.STAGE_STATE_SUCCEEDED)
        self.final.result.path = "/ck/run-final"
        started = o.StageStateChange(stage="sft", from_state=1, to_state=2, job_id=JOB_ID)
        tick = o.StageJobEvent(stage="sft", event=c.JobEvent(seq=2, progress=c.Progress(step=1)))
        done = o.StageStateChange(stage="sft", from_state=2, to_state=3)
        self.events = [
            o.RunEvent(seq=1, run_state_change=o.RunStateChange(from_state=1, to_state=2)),
            o.RunEvent(seq=2, stage_state_change=started),
            o.RunEvent(seq=3, job_event=tick),
            o.RunEvent(seq=4, stage_state_change=done),
            o.RunEvent(seq=5, run_state_change=o.RunStateChange(from_state=2, to_state=3)),
        ]
        self.watch_calls: list[int] = []
        self.run_requests: list = []

    def RunPipeline(self, request, context):
        self.run_requests.append(request)
        pending = o.Run(run_id="run-1", pipeline_id=request.pipeline_id, state=o.RUN_STATE_PENDING)
        return o.RunPipelineResponse(run=pending, created=True)

    def GetRun(self, request, context):
        return o.GetRunResponse(run=self.final)

    def WatchRun(self, request, context):
        self.watch_calls.append(request.after_seq)
        for ev in self.events[request.after_seq :]:
            if len(self.watch_calls) == 1 and ev.seq > 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
            yield o.WatchRunResponse(event=ev)


def test_pipeline_run_follows_the_run_across_a_restart(capsys: pytest.CaptureFixture) -> None:
    orch = FakeOrchestrator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(orch, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        rc = cli.main(
            ["--address", f"127.0.0.1:{port}", "pipeline", "run", "pipe-1", "--request-id", "r"]
        )
    finally:
        server.stop(None)
    out, err = capsys.readouterr()
    assert rc == 0 and out == "/ck/run-final\n"
    assert orch.watch_calls == [0, 2]
    assert orch.run_requests[0].request_id == "r"
    assert "[sft] PENDING -> RUNNING (job job-1)" in err and "run run-1 SUCCEEDED" in err


def test_help_names_only_real_templates(capsys: pytest.CaptureFixture) -> None:
    from orchestrator import templates

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "sft-dpo" not in text
    shown = re.findall(r"--template ([a-z_-]+) --model", text)
    assert shown and all(name in templates.names() for name in shown), shown
    assert ", ".join(templates.names()) in text


def test_a_bad_request_prints_each_violation_once() -> None:
    bad = grpc.StatusCode.INVALID_ARGUMENT
    one = ClientError(
        bad, "spec.iters: must be >= 1", [FieldViolation("spec.iters", "must be >= 1")]
    )
    assert str(one) == "INVALID_ARGUMENT: spec.iters: must be >= 1"
    two = ClientError(
        bad, "a: x; b: y (and 3 more)", [FieldViolation("a", "x"), FieldViolation("b", "y")]
    )
    assert str(two).splitlines() == [
        "INVALID_ARGUMENT: 2 problems (and 3 more)",
        "  a: x",
        "  b: y",
    ]
    # A message that says something else is kept, with the violations under it.
    other = ClientError(bad, "invalid spec", [FieldViolation("a", "x")])
    assert str(other).splitlines() == ["INVALID_ARGUMENT: invalid spec", "  a: x"]
