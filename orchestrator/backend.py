"""GrpcStageBackend: the scheduler's StageBackend over the trainer services' gRPC APIs.

A stage kind names its service and Start RPC (``STARTS``, from services.registry); the job
is then read, followed and cancelled through that service's JobService. The idempotency key
is sent as the Start request's ``request_id``, so a re-sent start (a retry, an orchestrator
restart) returns the job that already exists instead of launching a second one.

Every call has a deadline. ``WatchJob`` is a long poll: its deadline ends the stream
quietly (the scheduler reads the job and watches again from the last relayed seq), so a
job that sits queued for hours is never mistaken for a lost service.

Status codes become services.runtime.errors, which the scheduler acts on:
UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED / ABORTED -> Unavailable (retried),
NOT_FOUND -> NotFound (job lost: a new attempt), INVALID_ARGUMENT -> InvalidArgument (with
the BadRequest violations), FAILED_PRECONDITION and every other code -> FailedPrecondition.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlx_unified.v1 import (
    common_pb2,
    common_pb2_grpc,
    distillation_pb2,
    distillation_pb2_grpc,
    rlhf_pb2,
    rlhf_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from services import registry
from services.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
    Violation,
)
from services.runtime.settings import Settings


@dataclass(frozen=True)
class StartRpc:
    service: str  # key of Settings.endpoints
    stub: type
    method: str
    request: type[Message]
    grpc_service: str  # full name, for the health check


_SERVICES = {  # Settings.endpoints key -> (stub, full gRPC service name)
    "training": (training_pb2_grpc.TrainingServiceStub, training_pb2.DESCRIPTOR),
    "distillation": (distillation_pb2_grpc.DistillationServiceStub, distillation_pb2.DESCRIPTOR),
    "rlhf": (rlhf_pb2_grpc.RLHFServiceStub, rlhf_pb2.DESCRIPTOR),
}


def _route(m: registry.Method) -> StartRpc:
    stub, file = _SERVICES[m.service]
    (svc,) = [s for s in file.services_by_name.values() if m.rpc in s.methods_by_name]
    return StartRpc(m.service, stub, m.rpc, m.request, svc.full_name)


STARTS: dict[str, StartRpc] = {m.name: _route(m) for m in registry.METHODS}
HEALTH_NAMES = {rpc.service: rpc.grpc_service for rpc in STARTS.values()}

# Reconnect quickly after a service restart (gRPC's default backoff grows to 120 s).
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 0),
]
_STATUS_DETAILS = "grpc-status-details-bin"
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}


@dataclass(frozen=True)
class Deadlines:
    """Seconds per call. Start validates the spec (reads the dataset, may build a
    registered model on first use), so it gets the longest."""

    start: float = 120.0
    get: float = 10.0
    cancel: float = 30.0
    watch: float = 60.0  # one long poll; ends quietly
    health: float = 2.0


def api_key(settings: Settings) -> str | None:
    """The key this process sends: $MLXU_API_KEY, else the first of $MLXU_API_KEYS, else any
    key the service itself accepts (keys file): one deployment shares its keys."""
    if key := os.environ.get("MLXU_API_KEY", "").strip():
        return key
    for key in os.environ.get("MLXU_API_KEYS", "").split(","):
        if key.strip():
            return key.strip()
    return min(settings.api_keys) if settings.api_keys else None


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """TLS towards the other services when this one serves TLS: the server cert/key double
    as the client pair (mTLS), $MLXU_TLS_CA (else the client CA) verifies the peers."""
    if not settings.tls_cert:
        return None
    ca = os.environ.get("MLXU_TLS_CA") or settings.tls_client_ca

    def read(p: str) -> bytes | None:
        return Path(p).read_bytes() if p else None

    return grpc.ssl_channel_credentials(read(ca), read(settings.tls_key), read(settings.tls_cert))


def translate(err: grpc.aio.AioRpcError | grpc.RpcError, where: str) -> ServiceError:
    """A domain error for a failed call; ``where`` says which service and call."""
    code = err.code()
    msg = f"{where}: {err.details() or code.name}"
    if code in _RETRYABLE:
        return Unavailable(msg)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(msg)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violations = _violations(err)
        return InvalidArgument(violations or [Violation("spec", err.details() or "invalid")])
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(msg)
    return FailedPrecondition(f"{where}: {code.name}: {err.details() or ''}".rstrip(": "))


def _violations(err: grpc.RpcError) -> list[Violation]:
    """The google.rpc.BadRequest field violations carried in the status details."""
    out: list[Violation] = []
    for key, value in err.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key != _STATUS_DETAILS or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                out += [Violation(v.field, v.description) for v in bad.field_violations]
    return out


class GrpcStageBackend:
    """StageBackend over grpc.aio; one channel per service address, opened on first use."""

    def __init__(
        self,
        endpoints: Mapping[str, str],
        *,
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        deadlines: Deadlines = Deadlines(),
    ) -> None:
        self.endpoints = {k: v for k, v in endpoints.items() if v}
        self.deadlines = deadlines
        self._metadata = (("x-api-key", api_key),) if api_key else ()
        self._credentials = credentials
        self._channels: dict[str, aio.Channel] = {}

    @classmethod
    def from_settings(cls, settings: Settings, **kw: object) -> GrpcStageBackend:
        return cls(
            settings.endpoints,
            api_key=api_key(settings),
            credentials=channel_credentials(settings),
            **kw,  # type: ignore[arg-type]
        )

    def configured(self) -> frozenset[str]:
        """Trainer services with an address (an empty MLXU_<SERVICE>_ADDR turns one off)."""
        return frozenset(s for s in self.endpoints if s in HEALTH_NAMES)

    def _channel(self, service: str) -> aio.Channel:
        addr = self.endpoints.get(service)
        if not addr:
            raise FailedPrecondition(f"the {service} service is not configured (no address)")
        if addr not in self._channels:
            if self._credentials is None:
                self._channels[addr] = aio.insecure_channel(addr, options=CHANNEL_OPTIONS)
            else:
                self._channels[addr] = aio.secure_channel(
                    addr, self._credentials, options=CHANNEL_OPTIONS
                )
        return self._channels[addr]

    def _rpc(self, kind: str) -> StartRpc:
        if kind not in STARTS:
            raise FailedPrecondition(f"no service runs {kind!r} stages")
        return STARTS[kind]

    def _jobs(self, kind: str) -> tuple[common_pb2_grpc.JobServiceStub, str]:
        svc = self._rpc(kind).service
        return common_pb2_grpc.JobServiceStub(self._channel(svc)), svc

    # ---- StageBackend ----------------------------------------------------------------

    async def validate(self, stage_kind: str, spec: Message) -> None:
        """The stage's Start with ``validate_only``: every check, no job (InvalidArgument)."""
        rpc = self._rpc(stage_kind)
        stub = rpc.stub(self._channel(rpc.service))
        req = rpc.request(validate_only=True)
        req.spec.CopyFrom(spec)
        try:
            await getattr(stub, rpc.method)(
                req, metadata=self._metadata, timeout=self.deadlines.start
            )
        except aio.AioRpcError as e:
            raise translate(e, f"{rpc.service} {rpc.method}") from None

    async def start(self, stage_kind: str, spec: Message, idempotency_key: str) -> str:
        rpc = self._rpc(stage_kind)
        stub = rpc.stub(self._channel(rpc.service))
        req = rpc.request(request_id=idempotency_key)
        req.spec.CopyFrom(spec)
        try:
            resp = await getattr(stub, rpc.method)(
                req, metadata=self._metadata, timeout=self.deadlines.start
            )
        except aio.AioRpcError as e:
            raise translate(e, f"{rpc.service} {rpc.method}") from None
        return resp.job.job_id

    async def get(self, stage_kind: str, job_id: str) -> common_pb2.Job:
        stub, svc = self._jobs(stage_kind)
        try:
            resp = await stub.GetJob(
                common_pb2.GetJobRequest(job_id=job_id),
                metadata=self._metadata,
                timeout=self.deadlines.get,
            )
        except aio.AioRpcError as e:
            raise translate(e, f"{svc} GetJob {job_id}") from None
        return resp.job

    async def watch(
        self, stage_kind: str, job_id: str, after_seq: int
    ) -> AsyncIterator[tuple[common_pb2.JobEvent, common_pb2.Job]]:
        stub, svc = self._jobs(stage_kind)
        call = stub.WatchJob(
            common_pb2.WatchJobRequest(job_id=job_id, after_seq=after_seq),
            metadata=self._metadata,
            timeout=self.deadlines.watch,
        )
        try:
            async for resp in call:
                yield resp.event, resp.job
        except aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return  # the long poll is over; the caller watches again
            raise translate(e, f"{svc} WatchJob {job_id}") from None
        finally:
            call.cancel()

    async def cancel(self, stage_kind: str, job_id: str, reason: str) -> None:
        stub, svc = self._jobs(stage_kind)
        try:
            await stub.CancelJob(
                common_pb2.CancelJobRequest(job_id=job_id, reason=reason),
                metadata=self._metadata,
                timeout=self.deadlines.cancel,
            )
        except aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                return  # already ended: the watch reports how
            raise translate(e, f"{svc} CancelJob {job_id}") from None

    # ---- reachability ----------------------------------------------------------------

    async def check(self, service: str) -> str:
        """ "" when ``service`` answers its health check as SERVING, else why not."""
        addr = self.endpoints.get(service)
        if not addr:
            return "not configured (no address)"
        stub = health_pb2_grpc.HealthStub(self._channel(service))
        try:
            resp = await stub.Check(
                health_pb2.HealthCheckRequest(service=HEALTH_NAMES.get(service, "")),
                timeout=self.deadlines.health,
            )
        except aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return f"{addr} does not serve {HEALTH_NAMES.get(service)}"
            return f"not reachable at {addr} ({e.code().name})"
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            return f"{addr} is {status}"
        return ""

    async def unreachable(self, services: set[str] | frozenset[str]) -> dict[str, str]:
        """service -> why, for each of ``services`` that does not answer SERVING."""
        names = sorted(services)
        found = await asyncio.gather(*(self.check(s) for s in names))
        return {s: why for s, why in zip(names, found, strict=True) if why}

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()
