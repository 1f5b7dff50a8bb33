"""One way to run every service: grpc.aio server + health + reflection + auth + error mapping,
structlog logs, and a graceful SIGTERM (NOT_SERVING, jobs checkpointed and left resumable).

    uv run mlxu serve training            # or: python -m services.runtime.rpc.server training
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import importlib
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.runtime import blas, logs
from services.runtime.rpc.auth import ApiKeyInterceptor
from services.runtime.rpc.health import HealthServicer
from services.runtime.rpc.status import ErrorInterceptor
from services.runtime.settings import Settings

# service name -> "module:function" returning a ServiceHandle for a server.
REGISTRARS = {
    "training": "services.training.server:register",
    "distillation": "services.distillation.server:register",
    "rlhf": "services.rlhf.server:register",
    "orchestrator": "orchestrator.server:register",
    # GenerationService alone (any model, adapters by checkpoint path): a remote teacher.
    "generation": "services.runtime.rpc.generation_server:register",
}

MAX_MESSAGE = 64 * 1024 * 1024


async def _noop(*_: object) -> None:
    return None


@dataclass
class ServiceHandle:
    """What a service registered: its full gRPC names and its lifecycle hooks."""

    names: list[str]
    on_start: Callable[[], Awaitable[None]] = _noop
    # Called with the grace period in seconds on SIGTERM / stop.
    on_stop: Callable[[float], Awaitable[None]] = _noop
    extra: dict = field(default_factory=dict)


Registrar = Callable[[aio.Server, Settings], Awaitable[ServiceHandle]]


@dataclass
class RunningServer:
    server: aio.Server
    port: int
    handle: ServiceHandle
    health: health.aio.HealthServicer
    settings: Settings

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def stop(self, grace: float = 10.0) -> None:
        """Stop serving: NOT_SERVING first, then let the service park its jobs, then close."""
        for name in ["", *self.handle.names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.handle.on_stop(grace)
        await self.server.stop(grace=min(grace, 5.0))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        return None
    key = Path(settings.tls_key).read_bytes()
    cert = Path(settings.tls_cert).read_bytes()
    ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], ca, require_client_auth=ca is not None)


def load_registrar(service: str) -> Registrar:
    if service not in REGISTRARS:
        raise SystemExit(f"unknown service {service!r}; one of {', '.join(REGISTRARS)}")
    module, func = REGISTRARS[service].split(":")
    return getattr(importlib.import_module(module), func)


async def start(settings: Settings, register: Registrar | None = None) -> RunningServer:
    """Build, bind and start a service. Port 0 picks a free port (tests)."""
    log = logs.get()
    settings.ensure_dirs()
    if not settings.api_keys and not _is_loopback(settings.host):
        log.warning(
            "no_api_key_loopback_only",
            requested_host=settings.host,
            message="no API key configured (MLXU_API_KEYS): binding 127.0.0.1 only",
        )
        settings = replace(settings, host="127.0.0.1")
    if not settings.api_keys:
        log.warning("auth_disabled", message="no API key configured: loopback clients only")
    interceptors: list[aio.ServerInterceptor] = []
    if settings.api_keys:
        interceptors.append(ApiKeyInterceptor(settings.api_keys))
    # After auth: only a caller with a valid key gets its body decoded and validated.
    interceptors.append(ErrorInterceptor(settings.limits))
    server = aio.server(
        interceptors=interceptors,
        options=[
            # A larger body is refused by gRPC itself with RESOURCE_EXHAUSTED.
            ("grpc.max_receive_message_length", settings.limits.max_request_bytes or MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
        ],
    )
    register = register or load_registrar(settings.service)
    handle = await register(server, settings)

    health_servicer = HealthServicer()  # grpcio's, plus the List method it lacks
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*handle.names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)

    address = f"{settings.host}:{settings.port}"
    creds = _credentials(settings)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise SystemExit(f"could not bind {address}")
    settings = replace(settings, port=port)
    await server.start()
    await handle.on_start()
    for name in ["", *handle.names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving",
        address=f"{settings.host}:{port}",
        services=handle.names,
        tls=bool(creds),
        auth=bool(settings.api_keys),
        blas=blas.loaded or blas.reason,
        home=str(settings.home),
    )
    return RunningServer(server, port, handle, health_servicer, settings)


async def serve(settings: Settings, grace: float = 30.0) -> None:
    running = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logs.get().info("stopping", grace_s=grace)
    await running.stop(grace)
    logs.get().info("stopped")


def main(
    service: str, *, host: str | None = None, port: int | None = None, home: str | None = None
) -> None:
    faulthandler.enable()  # a native crash (SIGSEGV/SIGABRT) leaves every thread's stack in the log
    logs.configure(service)
    overrides: dict[str, object] = {}
    if host:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if home:
        overrides["home"] = Path(home).expanduser().resolve()
    settings = Settings.from_env(service, **overrides)
    asyncio.run(serve(settings))
    _exit_after_clean_stop()


def _exit_after_clean_stop() -> None:
    """Leave the process without the interpreter's native teardown, once the stop is complete.

    By now every job is parked, SQLite is committed and the server is stopped, so nothing is
    left to run. What remains is finalizing gRPC's C++ core (its completion-queue and timer
    threads) alongside the OpenBLAS and executor threads; under load that teardown sometimes
    ended in `terminate called without an active exception` (SIGABRT, exit -6) after a clean
    stop, which supervisors read as a crash. Flush what we wrote and exit 0 directly.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(0)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("service", choices=sorted(REGISTRARS))
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--home")
    a = p.parse_args()
    main(a.service, host=a.host, port=a.port, home=a.home)
    sys.exit(0)
