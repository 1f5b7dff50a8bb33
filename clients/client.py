"""A typed, synchronous client for the four MLX Unified Training services.

    from clients import MLXUClient, build_spec
    with MLXUClient() as c:                       # addresses from MLXU_<SERVICE>_ADDR
        job = c.start_sft(build_spec("sft", {"model": "tiny-llama", "data": "d.jsonl"}).spec)
        for event, job in c.watch_job(job.job_id):   # survives server restarts
            print(job.step, job.metrics.get("loss"))

One client talks to every service: each method goes to the service that owns it (Start* by
kind, job methods to ``service=``). ``MLXUClient(address)`` sends everything to one address
(a gateway, or a test server); otherwise each service's address comes from
``addresses[service]``, then ``MLXU_<SERVICE>_ADDR``, then 127.0.0.1:<default port>.
Every RPC failure is raised as ``ClientError`` (code, message, field violations).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from mlx_unified.v1 import (
    common_pb2,
    common_pb2_grpc,
    distillation_pb2,
    distillation_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    rlhf_pb2,
    rlhf_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from services import registry

DEFAULT_PORTS = {"training": 8500, "distillation": 8300, "rlhf": 8400, "orchestrator": 8600}
SERVICES = tuple(DEFAULT_PORTS)
TRAINER_SERVICES = ("training", "distillation", "rlhf")
SERVICE_OF_KIND = {m.name: m.service for m in registry.METHODS}
API_KEY_HEADER = "x-api-key"
Job = common_pb2.Job

JS = common_pb2.JobState
TERMINAL_JOB_STATES = frozenset(
    {JS.JOB_STATE_SUCCEEDED, JS.JOB_STATE_FAILED, JS.JOB_STATE_CANCELLED}
)
RS = orchestrator_pb2.RunState
TERMINAL_RUN_STATES = frozenset(
    {RS.RUN_STATE_SUCCEEDED, RS.RUN_STATE_FAILED, RS.RUN_STATE_CANCELLED}
)

MAX_MESSAGE = 64 * 1024 * 1024
# Reconnect quickly after a service restart (gRPC's default backoff grows to 120 s).
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def default_address(service: str) -> str:
    if service not in DEFAULT_PORTS:
        raise ValueError(f"unknown service {service!r}; one of {', '.join(SERVICES)}")
    return os.environ.get(f"MLXU_{service.upper()}_ADDR") or f"127.0.0.1:{DEFAULT_PORTS[service]}"


@dataclass(frozen=True)
class TLS:
    """TLS settings: ``ca`` verifies the server (system roots when None); ``cert``/``key`` are
    the client's own pair for mTLS; ``server_name`` overrides the name checked in its cert."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: str | None) -> bytes | None:
            return Path(p).expanduser().read_bytes() if p else None

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ClientError(Exception):
    """A failed RPC: the status code, its message and any google.rpc.BadRequest violations."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        violations: Sequence[FieldViolation] = (),
        address: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = tuple(violations)
        self.address = address

    def __str__(self) -> str:
        head = f"{self.code.name}: {self.message}"
        if self.code == grpc.StatusCode.UNAVAILABLE and self.address:
            head += f" (service at {self.address}; is it running? try `mlxu up`)"
        return "\n".join([head, *(f"  {v.field}: {v.description}" for v in self.violations)])

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError, address: str = "") -> ClientError:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        message = (err.details() if hasattr(err, "details") else None) or str(err)
        violations: list[FieldViolation] = []
        try:
            status = rpc_status.from_call(err)  # type: ignore[arg-type]
        except (ValueError, AttributeError, TypeError):
            status = None
        for detail in status.details if status else ():
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        return cls(code or grpc.StatusCode.UNKNOWN, message, violations, address)


class Started(NamedTuple):
    job: Job
    created: bool  # False: the request_id matched an existing job


R = TypeVar("R")

_START_STUBS = {
    "training": training_pb2_grpc.TrainingServiceStub,
    "distillation": distillation_pb2_grpc.DistillationServiceStub,
    "rlhf": rlhf_pb2_grpc.RLHFServiceStub,
}
_STARTS: dict[str, tuple[str, str, type[Message]]] = {  # kind -> (service, rpc, request)
    m.name: (m.service, m.rpc, m.request) for m in registry.METHODS
}

# A stream that breaks for these reasons is resumed; anything else is an answer.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
_BROKEN_STREAM_HINTS = ("RST_STREAM", "Stream removed", "Socket closed", "Connection reset")


def _retryable(err: grpc.RpcError) -> bool:
    code = err.code() if hasattr(err, "code") else None
    if code in _RETRYABLE:
        return True
    details = (err.details() if hasattr(err, "details") else "") or ""
    return code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and any(
        h in details for h in _BROKEN_STREAM_HINTS
    )


def model_ref(model: str | common_pb2.ModelRef, adapter: str | None = None) -> common_pb2.ModelRef:
    ref = common_pb2.ModelRef()
    if isinstance(model, common_pb2.ModelRef):
        ref.CopyFrom(model)
    else:
        ref.model = model
    if adapter:
        ref.adapter_path = adapter
    return ref


def _chat(messages: Iterable[Any]) -> generation_pb2.ChatConversation:
    conv = generation_pb2.ChatConversation()
    for m in messages:
        if isinstance(m, generation_pb2.ChatMessage):
            conv.messages.append(m)
        elif isinstance(m, Mapping):
            conv.messages.add(role=str(m["role"]), content=str(m["content"]))
        else:
            role, content = m
            conv.messages.add(role=str(role), content=str(content))
    return conv


def _pairs(items: Iterable[Any]) -> list[generation_pb2.PromptCompletion]:
    out = []
    for it in items:
        if isinstance(it, generation_pb2.PromptCompletion):
            out.append(it)
        elif isinstance(it, Mapping):
            out.append(
                generation_pb2.PromptCompletion(prompt=it["prompt"], completion=it["completion"])
            )
        else:
            prompt, completion = it
            out.append(generation_pb2.PromptCompletion(prompt=prompt, completion=completion))
    return out


class MLXUClient:
    def __init__(
        self,
        address: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        tls: bool | TLS = False,
        addresses: Mapping[str, str] | None = None,
        reconnect_timeout: float = 300.0,
    ) -> None:
        self.address = address
        self.addresses = dict(addresses or {})
        self.api_key = api_key if api_key is not None else os.environ.get("MLXU_API_KEY") or None
        self.timeout = timeout
        self.tls = TLS() if tls is True else (tls or None)
        # How long a watch keeps retrying without receiving anything before giving up.
        self.reconnect_timeout = reconnect_timeout
        self._channels: dict[str, grpc.Channel] = {}

    # ---- plumbing ----------------------------------------------------------------------

    def address_of(self, service: str) -> str:
        return self.address or self.addresses.get(service) or default_address(service)

    def channel(self, service: str) -> grpc.Channel:
        addr = self.address_of(service)
        if addr not in self._channels:
            options = list(_CHANNEL_OPTIONS)
            if self.tls is None:
                self._channels[addr] = grpc.insecure_channel(addr, options=options)
            else:
                if self.tls.server_name:
                    options.append(("grpc.ssl_target_name_override", self.tls.server_name))
                creds = self.tls.credentials()
                self._channels[addr] = grpc.secure_channel(addr, creds, options=options)
        return self._channels[addr]

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    def __enter__(self) -> MLXUClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _metadata(self) -> list[tuple[str, str]]:
        return [(API_KEY_HEADER, self.api_key)] if self.api_key else []

    def _call(self, service: str, stub_cls: type, method: str, request: Message) -> Any:
        fn = getattr(stub_cls(self.channel(service)), method)
        try:
            return fn(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            raise ClientError.from_rpc_error(e, self.address_of(service)) from None

    def _stream(self, service: str, stub_cls: type, method: str, request: Message) -> Any:
        # No deadline: a training job can be watched for hours.
        return getattr(stub_cls(self.channel(service)), method)(request, metadata=self._metadata)

    def _jobs(self, service: str, method: str, request: Message) -> Any:
        if service not in TRAINER_SERVICES:
            raise ValueError(f"jobs live on {', '.join(TRAINER_SERVICES)}, not {service!r}")
        return self._call(service, common_pb2_grpc.JobServiceStub, method, request)

    def _orch(self, method: str, request: Message) -> Any:
        return self._call(
            "orchestrator", orchestrator_pb2_grpc.OrchestratorServiceStub, method, request
        )

    def _follow(
        self,
        service: str,
        open_stream: Callable[[int], Any],
        seq_of: Callable[[R], int],
        ended: Callable[[R], bool],
        finished: Callable[[], bool],
        after_seq: int,
        on_retry: Callable[[ClientError, float], None] | None,
    ) -> Iterator[R]:
        """Follow a replayable event stream across breaks: resubscribe from the last seq seen,
        drop replayed duplicates, refuse gaps; stop when the server ends the stream after the
        terminal event (or the resource is already finished)."""
        last, gap_at, backoff, idle_since = after_seq, None, 0.2, time.monotonic()
        while True:
            call = open_stream(last)
            got = done = gap = False
            error: ClientError | None = None
            try:
                for resp in call:
                    seq = seq_of(resp)
                    if seq <= last:
                        continue  # replayed after a reconnect: already delivered
                    if seq != last + 1:
                        if gap_at == last:
                            raise ClientError(
                                grpc.StatusCode.DATA_LOSS, f"event {last + 1} missing (got {seq})"
                            )
                        gap_at, gap = last, True  # resubscribe once from the last contiguous one
                        break
                    last, got, backoff, idle_since = seq, True, 0.2, time.monotonic()
                    done = done or ended(resp)
                    yield resp
            except grpc.RpcError as e:
                if not _retryable(e):
                    raise ClientError.from_rpc_error(e, self.address_of(service)) from None
                error = ClientError.from_rpc_error(e, self.address_of(service))
            finally:
                call.cancel()  # also when the caller stops iterating early
            if done:
                return  # the terminal event was delivered
            if gap or (error is None and got):
                continue  # resume from `last` at once
            if error is None:  # closed with nothing new: finished, or a server going away
                try:
                    if finished():
                        return
                except ClientError as e:
                    if e.code != grpc.StatusCode.UNAVAILABLE:
                        raise
                    error = e
            if time.monotonic() - idle_since > self.reconnect_timeout:
                raise error or ClientError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no events for {self.reconnect_timeout:.0f}s",
                    address=self.address_of(service),
                )
            if on_retry and error is not None:
                on_retry(error, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    # ---- starting jobs -----------------------------------------------------------------

    def start(self, kind: str, spec: Message, request_id: str | None = None) -> Started:
        """Start a job of ``kind`` (a services.registry method name: "sft", "dpo", ...) on the
        service that owns it."""
        kind = kind.replace("-", "_")
        if kind not in _STARTS:
            raise ValueError(f"unknown job kind {kind!r}; one of {', '.join(_STARTS)}")
        service, method, req_cls = _STARTS[kind]
        req = req_cls(request_id=request_id or "", spec=spec)
        resp = self._call(service, _START_STUBS[service], method, req)
        return Started(resp.job, resp.created)

    def start_sft(self, spec: training_pb2.SFTSpec, request_id: str | None = None) -> Job:
        return self.start("sft", spec, request_id).job

    def start_export(self, spec: training_pb2.ExportSpec, request_id: str | None = None) -> Job:
        return self.start("export", spec, request_id).job

    def start_distillation(
        self, spec: distillation_pb2.DistillationSpec, request_id: str | None = None
    ) -> Job:
        return self.start("distill", spec, request_id).job

    def start_reward_model(
        self, spec: rlhf_pb2.RewardModelSpec, request_id: str | None = None
    ) -> Job:
        return self.start("reward_model", spec, request_id).job

    def start_dpo(self, spec: rlhf_pb2.DPOSpec, request_id: str | None = None) -> Job:
        return self.start("dpo", spec, request_id).job

    def start_ppo(self, spec: rlhf_pb2.PPOSpec, request_id: str | None = None) -> Job:
        return self.start("ppo", spec, request_id).job

    def start_grpo(self, spec: rlhf_pb2.GRPOSpec, request_id: str | None = None) -> Job:
        return self.start("grpo", spec, request_id).job

    # ---- jobs (JobService on every trainer service) --------------------------------------

    def get_job(self, job_id: str, service: str = "training") -> Job:
        return self._jobs(service, "GetJob", common_pb2.GetJobRequest(job_id=job_id)).job

    def list_jobs(
        self,
        service: str = "training",
        *,
        states: Iterable[int] = (),
        kind: str = "",
        page_size: int = 100,
    ) -> Iterator[Job]:
        """Every matching job, following page tokens."""
        token = ""
        while True:
            req = common_pb2.ListJobsRequest(
                page_size=page_size, page_token=token, states=list(states), kind=kind
            )
            resp = self._jobs(service, "ListJobs", req)
            yield from resp.jobs
            token = resp.next_page_token
            if not token:
                return

    def watch_job(
        self,
        job_id: str,
        after_seq: int = 0,
        service: str = "training",
        on_retry: Callable[[ClientError, float], None] | None = None,
    ) -> Iterator[tuple[common_pb2.JobEvent, Job]]:
        """(event, job as of that event) for every event with seq > after_seq, in order,
        each exactly once, across reconnects; ends after the job's final event."""
        if service not in TRAINER_SERVICES:
            raise ValueError(f"jobs live on {', '.join(TRAINER_SERVICES)}, not {service!r}")

        def open_stream(seq: int) -> Any:
            req = common_pb2.WatchJobRequest(job_id=job_id, after_seq=seq)
            return self._stream(service, common_pb2_grpc.JobServiceStub, "WatchJob", req)

        self.get_job(job_id, service)  # a missing job or an unreachable service fails here, once
        stream = self._follow(
            service,
            open_stream,
            seq_of=lambda r: r.event.seq,
            ended=lambda r: r.job.state in TERMINAL_JOB_STATES,
            finished=lambda: self.get_job(job_id, service).state in TERMINAL_JOB_STATES,
            after_seq=after_seq,
            on_retry=on_retry,
        )
        for resp in stream:
            yield resp.event, resp.job

    def wait_job(self, job_id: str, service: str = "training") -> Job:
        """Block until the job ends; returns it in its final state."""
        for _ in self.watch_job(job_id, service=service):
            pass
        return self.get_job(job_id, service)

    def cancel_job(self, job_id: str, reason: str = "", service: str = "training") -> Job:
        req = common_pb2.CancelJobRequest(job_id=job_id, reason=reason)
        return self._jobs(service, "CancelJob", req).job

    # ---- generation (training service) ---------------------------------------------------

    def generate_stream(
        self,
        model: str | common_pb2.ModelRef,
        prompt: str | None = None,
        *,
        messages: Iterable[Any] | None = None,
        adapter: str | None = None,
        max_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        repetition_penalty: float = 0.0,
        return_logprobs: bool = False,
        service: str = "training",
    ) -> Iterator[generation_pb2.GenerateResponse]:
        """The raw response chunks (text, token ids, finish reason, token counts, speed)."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        sampling = generation_pb2.SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_tokens=max_tokens,
            stop=list(stop),
            repetition_penalty=repetition_penalty,
        )
        if seed is not None:
            sampling.seed = seed
        req = generation_pb2.GenerateRequest(
            model=model_ref(model, adapter), sampling=sampling, return_logprobs=return_logprobs
        )
        if messages is not None:
            req.chat.CopyFrom(_chat(messages))
        else:
            req.prompt = prompt or ""
        stub = generation_pb2_grpc.GenerationServiceStub
        call = self._stream(service, stub, "Generate", req)
        try:
            yield from call
        except grpc.RpcError as e:
            raise ClientError.from_rpc_error(e, self.address_of(service)) from None
        finally:
            call.cancel()

    def generate(
        self, model: str | common_pb2.ModelRef, prompt: str | None = None, **kw: Any
    ) -> Iterator[str]:
        """The completion as text chunks, as they are sampled (see generate_stream)."""
        for chunk in self.generate_stream(model, prompt, **kw):
            if chunk.text:
                yield chunk.text

    def score_completions(
        self,
        model: str | common_pb2.ModelRef,
        items: Iterable[Any],
        adapter: str | None = None,
        service: str = "training",
    ) -> list[generation_pb2.CompletionScore]:
        """Log-probabilities of (prompt, completion) pairs under a model."""
        req = generation_pb2.ScoreCompletionsRequest(
            model=model_ref(model, adapter), items=_pairs(items)
        )
        stub = generation_pb2_grpc.GenerationServiceStub
        return list(self._call(service, stub, "ScoreCompletions", req).scores)

    def score(self, reward_model: str | common_pb2.ModelRef, items: Iterable[Any]) -> list[float]:
        """Rewards of (prompt, completion) pairs from a reward-model checkpoint (RLHF service)."""
        req = rlhf_pb2.ScoreRequest(reward_model=model_ref(reward_model), items=_pairs(items))
        return list(self._call("rlhf", rlhf_pb2_grpc.RLHFServiceStub, "Score", req).scores)

    # ---- orchestrator --------------------------------------------------------------------

    def create_pipeline(
        self, spec: orchestrator_pb2.PipelineSpec, request_id: str | None = None
    ) -> orchestrator_pb2.Pipeline:
        req = orchestrator_pb2.CreatePipelineRequest(request_id=request_id or "", spec=spec)
        return self._orch("CreatePipeline", req).pipeline

    def create_pipeline_from_template(
        self,
        template: str,
        *,
        base_model: str | common_pb2.ModelRef | None = None,
        dataset: str | common_pb2.DatasetRef | None = None,
        overrides: Mapping[str, Any] | None = None,
        name: str = "",
        auto_configure: bool | None = None,
        request_id: str | None = None,
    ) -> orchestrator_pb2.Pipeline:
        req = orchestrator_pb2.CreatePipelineFromTemplateRequest(
            request_id=request_id or "", template=template, name=name
        )
        if base_model:
            req.base_model.CopyFrom(model_ref(base_model))
        if isinstance(dataset, common_pb2.DatasetRef):
            req.dataset.CopyFrom(dataset)
        elif dataset:
            req.dataset.path = dataset
        if overrides:
            s = struct_pb2.Struct()
            s.update(dict(overrides))
            req.overrides.CopyFrom(s)
        if auto_configure is not None:
            req.auto_configure = auto_configure
        return self._orch("CreatePipelineFromTemplate", req).pipeline

    def get_pipeline(self, pipeline_id: str) -> orchestrator_pb2.Pipeline:
        return self._orch(
            "GetPipeline", orchestrator_pb2.GetPipelineRequest(pipeline_id=pipeline_id)
        ).pipeline

    def list_pipelines(self, page_size: int = 100) -> Iterator[orchestrator_pb2.Pipeline]:
        token = ""
        while True:
            req = orchestrator_pb2.ListPipelinesRequest(page_size=page_size, page_token=token)
            resp = self._orch("ListPipelines", req)
            yield from resp.pipelines
            token = resp.next_page_token
            if not token:
                return

    def list_templates(self) -> list[orchestrator_pb2.Template]:
        return list(self._orch("ListTemplates", orchestrator_pb2.ListTemplatesRequest()).templates)

    def run_pipeline(self, pipeline_id: str, request_id: str | None = None) -> orchestrator_pb2.Run:
        req = orchestrator_pb2.RunPipelineRequest(
            request_id=request_id or "", pipeline_id=pipeline_id
        )
        return self._orch("RunPipeline", req).run

    def get_run(self, run_id: str) -> orchestrator_pb2.Run:
        return self._orch("GetRun", orchestrator_pb2.GetRunRequest(run_id=run_id)).run

    def list_runs(
        self, pipeline_id: str = "", page_size: int = 100
    ) -> Iterator[orchestrator_pb2.Run]:
        token = ""
        while True:
            req = orchestrator_pb2.ListRunsRequest(
                page_size=page_size, page_token=token, pipeline_id=pipeline_id
            )
            resp = self._orch("ListRuns", req)
            yield from resp.runs
            token = resp.next_page_token
            if not token:
                return

    def watch_run(
        self,
        run_id: str,
        after_seq: int = 0,
        on_retry: Callable[[ClientError, float], None] | None = None,
    ) -> Iterator[orchestrator_pb2.RunEvent]:
        """Every run event with seq > after_seq, in order, exactly once, across reconnects."""

        def open_stream(seq: int) -> Any:
            req = orchestrator_pb2.WatchRunRequest(run_id=run_id, after_seq=seq)
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub
            return self._stream("orchestrator", stub, "WatchRun", req)

        def ended(r: orchestrator_pb2.WatchRunResponse) -> bool:
            ev = r.event
            return (
                ev.WhichOneof("payload") == "run_state_change"
                and ev.run_state_change.to_state in TERMINAL_RUN_STATES
            )

        self.get_run(run_id)  # a missing run or an unreachable service fails here, once
        stream = self._follow(
            "orchestrator",
            open_stream,
            seq_of=lambda r: r.event.seq,
            ended=ended,
            finished=lambda: self.get_run(run_id).state in TERMINAL_RUN_STATES,
            after_seq=after_seq,
            on_retry=on_retry,
        )
        for resp in stream:
            yield resp.event

    def cancel_run(self, run_id: str, reason: str = "") -> orchestrator_pb2.Run:
        return self._orch(
            "CancelRun", orchestrator_pb2.CancelRunRequest(run_id=run_id, reason=reason)
        ).run

    def start_training(
        self, stage: orchestrator_pb2.Stage, request_id: str | None = None
    ) -> orchestrator_pb2.Run:
        """A one-stage run of ``stage`` through the orchestrator."""
        req = orchestrator_pb2.StartTrainingRequest(request_id=request_id or "", stage=stage)
        return self._orch("StartTraining", req).run


def health_status(
    address: str, service: str = "", timeout: float = 1.0, tls: TLS | None = None
) -> str:
    """The gRPC health status of a server ("SERVING", "NOT_SERVING", ...), or "UNREACHABLE"."""
    channel = (
        grpc.secure_channel(address, tls.credentials()) if tls else grpc.insecure_channel(address)
    )
    try:
        resp = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    except grpc.RpcError:
        return "UNREACHABLE"
    finally:
        channel.close()


def _start_method(kind: str) -> Callable[..., Job]:
    def start(self: MLXUClient, spec: Message, request_id: str | None = None) -> Job:
        return self.start(kind, spec, request_id).job

    start.__name__ = f"start_{kind}"
    start.__doc__ = f"Start a {kind} job (``start({kind!r}, spec)``); returns the job."
    return start


# ``start_<method>`` for every registry method without a hand-written, typed one above.
for _m in registry.METHODS:
    if not hasattr(MLXUClient, f"start_{_m.name}"):
        setattr(MLXUClient, f"start_{_m.name}", _start_method(_m.name))
