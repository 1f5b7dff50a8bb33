"""The connection half of MLXUClient: addresses, TLS, errors, channels, resumable streams.

Split from client.py so the transport rules (which address a service is at, what counts as a
broken stream, how a watch resumes without losing or repeating an event) read on their own,
apart from the RPC methods built on them. client.py re-exports every public name here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from mlx_unified.v1 import common_pb2_grpc, orchestrator_pb2_grpc

DEFAULT_PORTS = {"training": 8500, "distillation": 8300, "rlhf": 8400, "orchestrator": 8600}
SERVICES = tuple(DEFAULT_PORTS)
TRAINER_SERVICES = ("training", "distillation", "rlhf")
API_KEY_HEADER = "x-api-key"
# The HTTP/JSON gateway (services/gateway; `mlxu serve gateway`): MLXU_GATEWAY_ADDR.
GATEWAY_PORT = 8700

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


def gateway_address() -> str:
    return os.environ.get("MLXU_GATEWAY_ADDR") or f"127.0.0.1:{GATEWAY_PORT}"


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
        listed = [f"{v.field}: {v.description}" for v in self.violations]
        message = self.message
        # A bad request's message is its violations joined ("a: x; b: y"): say each once.
        if listed and all(item in message for item in listed):
            more = message[message.rfind(" (and ") :] if message.endswith(" more)") else ""
            if len(listed) == 1:
                return f"{self.code.name}: {listed[0]}{more}"
            message = f"{len(listed)} problems{more}"
        head = f"{self.code.name}: {message}"
        if self.code == grpc.StatusCode.UNAVAILABLE and self.address:
            head += f" (service at {self.address}; is it running? try `mlxu up`)"
        return "\n".join([head, *(f"  {item}" for item in listed)])

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


R = TypeVar("R")

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


class Connection:
    """Channels to the services and the call, stream and follow plumbing MLXUClient uses."""

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

    def __enter__(self) -> Self:
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
