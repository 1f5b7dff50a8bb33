"""The gRPC services behind the gateway: one aio channel per service, calls with the caller's
API key forwarded, and failures raised as ``BackendError`` (see errors.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client_connection import API_KEY_HEADER, MAX_MESSAGE, SERVICES
from services.gateway.errors import BackendError

# Unary calls: long enough for CreatePipeline's checks (it reads every dataset).
CALL_TIMEOUT_S = 60.0
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return ((API_KEY_HEADER, api_key),) if api_key else ()


class Backends:
    """Channels to the four services, opened lazily on the running event loop."""

    def __init__(
        self, addresses: Mapping[str, str], credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        self.addresses = {s: addresses[s] for s in SERVICES}
        self.credentials = credentials
        self._channels: dict[str, aio.Channel] = {}

    def channel(self, service: str) -> aio.Channel:
        if service not in self.addresses:
            raise KeyError(service)
        if service not in self._channels:
            addr = self.addresses[service]
            self._channels[service] = (
                aio.secure_channel(addr, self.credentials, options=_OPTIONS)
                if self.credentials is not None
                else aio.insecure_channel(addr, options=_OPTIONS)
            )
        return self._channels[service]

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()

    async def call(
        self, service: str, stub: type, method: str, request: Message, api_key: str | None
    ) -> Any:
        fn = getattr(stub(self.channel(service)), method)
        try:
            return await fn(request, metadata=metadata(api_key), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as e:
            raise BackendError.from_rpc_error(e, self.addresses[service]) from None

    async def stream(
        self, service: str, stub: type, method: str, request: Message, api_key: str | None
    ) -> AsyncIterator[Any]:
        """The responses of a server stream; closing the iterator cancels the call."""
        call = getattr(stub(self.channel(service)), method)(request, metadata=metadata(api_key))
        try:
            async for resp in call:
                yield resp
        except grpc.RpcError as e:
            raise BackendError.from_rpc_error(e, self.addresses[service]) from None
        finally:
            call.cancel()

    async def health(self, timeout: float = 1.0) -> dict[str, str]:
        """Each service's gRPC health status ("SERVING", ...), or "UNREACHABLE"."""

        async def one(service: str) -> str:
            stub = health_pb2_grpc.HealthStub(self.channel(service))
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            except grpc.RpcError:
                return "UNREACHABLE"
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

        states = await asyncio.gather(*(one(s) for s in self.addresses))
        return dict(zip(self.addresses, states, strict=True))
