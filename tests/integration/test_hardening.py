"""Issue 16: hostile or careless input gets the right status with a bounded message, never
INTERNAL / UNKNOWN, and creates nothing. Real services on loopback."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mlx_unified.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    rlhf_pb2,
    rlhf_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from services.runtime.settings import Limits
from tests.conftest import write_jsonl
from tests.integration.helpers import violations
from tests.integration.test_training_service import CHAT_ROWS, sft_spec

KEY = "k-hardening"
MD = (("x-api-key", KEY),)
NO_RATE = Limits(rate_start_per_min=0, rate_generate_per_min=0)


def code_of(call, *args, **kw) -> grpc.RpcError:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as err:
        out = call(*args, metadata=MD, timeout=60, **kw)
        if hasattr(out, "__iter__") and not hasattr(out, "SerializeToString"):
            list(out)  # a stream: the status arrives at the end
    return err.value


def assert_bounded(err: grpc.RpcError, limit: int = 2048) -> None:
    assert len(err.details() or "") <= limit, len(err.details())
    size = sum(len(k) + len(v) for k, v in (err.trailing_metadata() or ()))
    assert size < 8192, size


@pytest.fixture
def training(serve):
    return serve("training", api_keys=frozenset({KEY}), limits=NO_RATE, offline=True)


@pytest.fixture
def chat_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)


def jobs_of(channel: grpc.Channel) -> list:
    from mlx_unified.v1 import common_pb2_grpc

    stub = common_pb2_grpc.JobServiceStub(channel)
    return list(stub.ListJobs(common_pb2.ListJobsRequest(), metadata=MD).jobs)


def test_auth_runs_before_the_body_is_decoded(training):
    with grpc.insecure_channel(training.address) as ch:
        raw = ch.unary_unary("/mlx_unified.v1.JobService/GetJob")  # bytes in, bytes out
        garbage = b"\xff\xff\xff\xff\x0f"
        for md in ((), (("x-api-key", "wrong"),)):
            with pytest.raises(grpc.RpcError) as err:
                raw(garbage, metadata=md, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            raw(garbage, metadata=MD, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert "not a valid request" in err.value.details()
        stream = ch.unary_stream("/mlx_unified.v1.GenerationService/Generate")
        with pytest.raises(grpc.RpcError) as err:
            list(stream(garbage, metadata=MD, timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_errors_are_bounded_and_never_echo_a_huge_input(training, tiny_model, chat_data):
    with grpc.insecure_channel(training.address) as ch:
        from mlx_unified.v1 import common_pb2_grpc

        jobs = common_pb2_grpc.JobServiceStub(ch)
        err = code_of(jobs.GetJob, common_pb2.GetJobRequest(job_id="A" * 10000))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert_bounded(err)
        assert "A" * 200 not in err.details()
        for job_id in ("A" * 200, "nope\x00"):
            err = code_of(jobs.GetJob, common_pb2.GetJobRequest(job_id=job_id))
            assert err.code() == grpc.StatusCode.NOT_FOUND
            assert_bounded(err)
        training_stub = training_pb2_grpc.TrainingServiceStub(ch)
        spec = sft_spec(tiny_model, chat_data)
        spec.model.model = "x" * 3000  # a "hub id" far too long
        err = code_of(training_stub.StartSFT, training_pb2.StartSFTRequest(spec=spec))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert_bounded(err)
        # Hundreds of violations are cut to a bounded list.
        spec = sft_spec(tiny_model, chat_data)
        spec.labels.update({f"k{i}": "v" for i in range(70)})
        spec.lora.keys.extend([""] * 2000)
        err = code_of(training_stub.StartSFT, training_pb2.StartSFTRequest(spec=spec))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert_bounded(err)
        assert jobs_of(ch) == []


def _sft_cases(tiny: Path, data: Path, tmp: Path) -> list[tuple[str, training_pb2.SFTSpec, str]]:
    deep = tmp / "deep.jsonl"
    deep.write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    deep_doc = tmp / "deep-doc.json"
    deep_doc.write_text("[" * 100_000 + "]" * 100_000)

    def spec(**kw) -> training_pb2.SFTSpec:
        return sft_spec(tiny, kw.pop("data", data), **kw)

    cases = []
    s = spec()
    s.dataset.format = 999
    cases.append(("unknown enum", s, "spec.dataset.format"))
    s = spec()
    s.method = 77
    cases.append(("unknown method", s, "spec.method"))
    s = spec()
    s.resources.backend = 12
    cases.append(("unknown backend", s, "spec.resources.backend"))
    s = spec()
    s.dataset.valid_fraction = math.inf
    cases.append(("valid_fraction inf", s, "spec.dataset.valid_fraction"))
    s = spec()
    s.optimizer.learning_rate = math.nan
    cases.append(("lr nan", s, "spec.optimizer.learning_rate"))
    s = spec()
    s.optimizer.weight_decay = -math.inf
    cases.append(("weight decay -inf", s, "spec.optimizer.weight_decay"))
    s = spec()
    s.loop.max_seq_length = -5
    cases.append(("negative max_seq_length", s, "spec.loop.max_seq_length"))
    s = spec()
    s.lora.num_layers = -7
    cases.append(("negative num_layers", s, "spec.lora.num_layers"))
    s = spec()
    s.loop.batch_size = -1
    cases.append(("negative batch", s, "spec.loop.batch_size"))
    s = spec()
    s.model.model = "/" + "m" * 300
    cases.append(("component over 255 bytes", s, "spec.model.model"))
    s = spec(data=Path(str(tmp) + "/" + "d" * 300))
    cases.append(("dataset component over 255 bytes", s, "spec.dataset.path"))
    s = spec(data=Path("/".join(["x"] * 2100)))
    cases.append(("path over 4096 bytes", s, "spec.dataset.path"))
    s = spec()
    s.model.model = "etc/passwd"
    cases.append(("hub-looking name, offline", s, "spec.model.model"))
    s = spec()
    s.model.model = "not a model!"
    cases.append(("nonsense model", s, "spec.model.model"))
    cases.append(("deeply nested JSONL", spec(data=deep), "spec.dataset.path"))
    cases.append(("deeply nested JSON", spec(data=deep_doc), "spec.dataset.path"))
    s = spec()
    s.resources.hosts.append("host; rm -rf /")
    cases.append(("hostile host", s, "spec.resources.hosts[0]"))
    s = spec()
    s.output_name = "ok\n"
    cases.append(("name with newline", s, "spec.output_name"))
    return cases


def test_bad_sft_fields_are_invalid_argument_and_create_nothing(
    training, tiny_model, chat_data, tmp_path, home
):
    with grpc.insecure_channel(training.address) as ch:
        stub = training_pb2_grpc.TrainingServiceStub(ch)
        for label, spec, field in _sft_cases(tiny_model, chat_data, tmp_path):
            err = code_of(stub.StartSFT, training_pb2.StartSFTRequest(spec=spec))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (label, err)
            assert field in violations(err), (label, violations(err))
            assert_bounded(err)
        assert jobs_of(ch) == []
    assert not any((home / "checkpoints").iterdir())


def test_rlhf_rejects_non_finite_and_unknown_values(serve, tiny_model, tmp_path):
    srv = serve("rlhf", api_keys=frozenset({KEY}), limits=NO_RATE)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(8)])
    with grpc.insecure_channel(srv.address) as ch:
        stub = rlhf_pb2_grpc.RLHFServiceStub(ch)
        spec = rlhf_pb2.GRPOSpec(
            policy=common_pb2.ModelRef(model=str(tiny_model)),
            dataset=common_pb2.DatasetRef(path=str(prompts)),
            reward=rlhf_pb2.RewardSource(reward_function="length"),
            clip_range=math.inf,
        )
        err = code_of(stub.StartGRPO, rlhf_pb2.StartGRPORequest(spec=spec))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "spec.clip_range" in violations(err)
        spec.clip_range = 0.2
        spec.rollout.sampling.temperature = math.nan
        err = code_of(stub.StartGRPO, rlhf_pb2.StartGRPORequest(spec=spec))
        assert "spec.rollout.sampling.temperature" in violations(err)
        dpo = rlhf_pb2.DPOSpec(
            policy=common_pb2.ModelRef(model=str(tiny_model)), loss=55, beta=-math.inf
        )
        err = code_of(stub.StartDPO, rlhf_pb2.StartDPORequest(spec=dpo))
        assert {"spec.loss", "spec.beta"} <= set(violations(err))
        err = code_of(
            stub.Score,
            rlhf_pb2.ScoreRequest(
                reward_model=common_pb2.ModelRef(model=str(tiny_model)),
                items=[generation_pb2.PromptCompletion()],
            ),
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert jobs_of(ch) == []


def test_generate_bad_input_is_invalid_argument(serve, tiny_model):
    limits = Limits(rate_start_per_min=0, rate_generate_per_min=0, generate_max_prompt_tokens=64)
    srv = serve("training", api_keys=frozenset({KEY}), limits=limits)
    model = common_pb2.ModelRef(model=str(tiny_model))
    with grpc.insecure_channel(srv.address) as ch:
        gen = generation_pb2_grpc.GenerationServiceStub(ch)

        def req(**kw) -> generation_pb2.GenerateRequest:
            sampling = generation_pb2.SamplingParams(**{"max_tokens": 4, **kw.pop("sampling", {})})
            return generation_pb2.GenerateRequest(model=model, sampling=sampling, **kw)

        many = generation_pb2.ChatConversation(
            messages=[generation_pb2.ChatMessage(role="user", content="hi")] * 187
        )
        cases = [
            ("seed -1", req(prompt="hi", sampling={"seed": -1}), "sampling.seed"),
            ("empty prompt", req(prompt=""), "prompt"),
            ("no input", req(), "prompt"),
            ("187 messages", req(chat=many), "chat.messages"),
            ("max_tokens", req(prompt="hi", sampling={"max_tokens": 10**6}), "sampling.max_tokens"),
            ("inf temperature", req(prompt="hi", sampling={"temperature": math.inf}), ""),
            ("prompt over the token limit", req(prompt="word " * 500), "prompt"),
            ("200k characters", req(prompt="x" * 200_000), "prompt"),
            ("no role", req(chat={"messages": [{"content": "hi"}]}), "chat.messages[0].role"),
        ]
        for label, r, field in cases:
            err = code_of(gen.Generate, r)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (label, err)
            if field:
                assert field in violations(err), (label, violations(err))
            assert_bounded(err)
        score = generation_pb2.ScoreCompletionsRequest(
            model=model, items=[generation_pb2.PromptCompletion()]
        )
        err = code_of(gen.ScoreCompletions, score)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        ok = list(gen.Generate(req(prompt="hello"), metadata=MD, timeout=60))
        assert ok[-1].finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED


def test_reused_request_id_is_failed_precondition_everywhere(serve, tiny_model, chat_data):
    training = serve("training", api_keys=frozenset({KEY}), limits=NO_RATE)
    orch = serve(
        "orchestrator",
        api_keys=frozenset({KEY}),
        limits=NO_RATE,
        endpoints={"training": training.address, "rlhf": "", "distillation": ""},
    )
    spec = sft_spec(tiny_model, chat_data, steps=1)
    other = sft_spec(tiny_model, chat_data, steps=2)
    with grpc.insecure_channel(training.address) as ch:
        stub = training_pb2_grpc.TrainingServiceStub(ch)
        stub.StartSFT(training_pb2.StartSFTRequest(request_id="r1", spec=spec), metadata=MD)
        err = code_of(stub.StartSFT, training_pb2.StartSFTRequest(request_id="r1", spec=other))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    with grpc.insecure_channel(orch.address) as ch:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(ch)
        pl = orchestrator_pb2.PipelineSpec(
            name="p",
            base_model=common_pb2.ModelRef(model=str(tiny_model)),
            dataset=common_pb2.DatasetRef(path=str(chat_data)),
            stages=[orchestrator_pb2.Stage(name="s", sft=spec)],
        )
        stub.CreatePipeline(
            orchestrator_pb2.CreatePipelineRequest(request_id="p1", spec=pl), metadata=MD
        )
        pl.name = "q"
        err = code_of(
            stub.CreatePipeline, orchestrator_pb2.CreatePipelineRequest(request_id="p1", spec=pl)
        )
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
        st = orchestrator_pb2.Stage(name="s", sft=spec)
        st.sft.loop.batch_size = -1  # what the trainer would refuse, refused up front
        err = code_of(stub.StartTraining, orchestrator_pb2.StartTrainingRequest(stage=st))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "stage.sft.loop.batch_size" in violations(err)
        st.sft.loop.batch_size = 4
        st.sft.optimizer.weight_decay = -math.inf
        err = code_of(stub.StartTraining, orchestrator_pb2.StartTrainingRequest(stage=st))
        assert "stage.sft.optimizer.weight_decay" in violations(err)
        err = code_of(
            stub.CreatePipelineFromTemplate,
            orchestrator_pb2.CreatePipelineFromTemplateRequest(
                template="chatbot",
                base_model=common_pb2.ModelRef(model=str(tiny_model)),
                overrides={"stages": {"sft": {"sft": {"loop": {"epochs": math.inf}}}}},
            ),
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        runs = stub.ListRuns(orchestrator_pb2.ListRunsRequest(), metadata=MD).runs
        assert list(runs) == []


def test_rate_limit_on_start_is_resource_exhausted_with_retry_info(serve, tiny_model):
    limits = Limits(rate_start_per_min=6, rate_start_burst=2, rate_generate_per_min=0)
    srv = serve("training", api_keys=frozenset({KEY}), limits=limits)
    with grpc.insecure_channel(srv.address) as ch:
        stub = training_pb2_grpc.TrainingServiceStub(ch)
        bad = training_pb2.StartSFTRequest(spec=training_pb2.SFTSpec())  # refused, cheaply
        codes = []
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as err:
                stub.StartSFT(bad, metadata=MD, timeout=30)
            codes.append(err.value.code())
        assert codes[:2] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
        assert codes[2] == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(err.value)
        kinds = {d.type_url.rsplit("/", 1)[-1] for d in status.details}
        assert "google.rpc.RetryInfo" in kinds and "google.rpc.ErrorInfo" in kinds
        info = error_details_pb2.ErrorInfo()
        next(d for d in status.details if d.Is(info.DESCRIPTOR)).Unpack(info)
        assert info.reason == "RATE_LIMITED"
        # Another client (another key would be another bucket) is not affected: GetJob is
        # not rate-limited at all.
        from mlx_unified.v1 import common_pb2_grpc

        jobs = common_pb2_grpc.JobServiceStub(ch)
        assert list(jobs.ListJobs(common_pb2.ListJobsRequest(), metadata=MD).jobs) == []
