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
Starting jobs, jobs and the orchestrator's calls are here; generation and scoring calls are
in client_generation.py, and the connection they all run on (addresses, TLS, ``ClientError``,
channels, resumable streams) in client_connection.py. Both are MLXUClient's base classes, and
every public name of theirs stays importable from this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from google.protobuf import struct_pb2
from google.protobuf.message import Message

# The connection names are re-exported: callers import them from clients.client.
from clients.client_connection import (  # noqa: F401
    API_KEY_HEADER,
    DEFAULT_PORTS,
    MAX_MESSAGE,
    SERVICES,
    TLS,
    TRAINER_SERVICES,
    ClientError,
    Connection,
    FieldViolation,
    default_address,
    health_status,
)
from clients.client_generation import GenerationCalls, model_ref
from clients.client_models import ModelCalls
from mlx_unified.v1 import (
    common_pb2,
    common_pb2_grpc,
    distillation_pb2,
    distillation_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    rlhf_pb2,
    rlhf_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from services import registry

SERVICE_OF_KIND = {m.name: m.service for m in registry.METHODS}
Job = common_pb2.Job

JS = common_pb2.JobState
TERMINAL_JOB_STATES = frozenset(
    {JS.JOB_STATE_SUCCEEDED, JS.JOB_STATE_FAILED, JS.JOB_STATE_CANCELLED}
)
RS = orchestrator_pb2.RunState
TERMINAL_RUN_STATES = frozenset(
    {RS.RUN_STATE_SUCCEEDED, RS.RUN_STATE_FAILED, RS.RUN_STATE_CANCELLED}
)


class Started(NamedTuple):
    job: Job
    created: bool  # False: the request_id matched an existing job


_START_STUBS = {
    "training": training_pb2_grpc.TrainingServiceStub,
    "distillation": distillation_pb2_grpc.DistillationServiceStub,
    "rlhf": rlhf_pb2_grpc.RLHFServiceStub,
}
_STARTS: dict[str, tuple[str, str, type[Message]]] = {  # kind -> (service, rpc, request)
    m.name: (m.service, m.rpc, m.request) for m in registry.METHODS
}


class MLXUClient(GenerationCalls, ModelCalls):
    # Bases: GenerationCalls (clients/client_generation.py: generate, score) and ModelCalls
    # (clients/client_models.py: the model registry), on Connection
    # (clients/client_connection.py: __init__, address_of, channel, close, _call / _follow).

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
        """(event, job) for every event with seq > after_seq, in order, each exactly once,
        across reconnects; ends after the job's final event. ``job`` is the job as it was
        when the event was *sent* (its final state in a replay): to show a job as of each
        event, fold the events (``progress.fresh`` + ``progress.apply_event``)."""
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
