"""Shared fixtures: an isolated data dir, the tiny model, and real services on loopback.

`import services` comes first: it loads OpenBLAS before anything imports mlx.core.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import services  # noqa: F401  (loads OpenBLAS before anything imports mlx)

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "examples" / "data" / "mlxu_faq"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer llama + locally trained tokenizer with a chat template (seconds)."""
    from services.runtime.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "mlxu-home"
    h.mkdir()
    monkeypatch.setenv("MLXU_HOME", str(h))
    return h


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def settings_for(home: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """Settings factory for in-process servers: port 0, roots = home + tmp + the tiny model."""
    from services.runtime.settings import Settings

    def make(service: str, **kw: object) -> Settings:
        roots = (home, tmp_path.resolve(), tmp_path_factory.getbasetemp().resolve(), REPO)
        extra = kw.pop("roots", ())
        return Settings(
            service=service,
            home=home,
            port=0,
            allowed_roots=(*roots, *extra),  # type: ignore[misc]
            **kw,  # type: ignore[arg-type]
        )

    return make


class ThreadedServer:
    """A real service in this process, on its own event loop thread, so tests can make plain
    blocking gRPC calls without starving the server."""

    def __init__(self, settings, register=None) -> None:  # noqa: ANN001
        from services.runtime.rpc import server as rpc_server

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(rpc_server.start(settings, register), self.loop)
        self.running = fut.result(timeout=120)

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def call(self, coro, timeout: float = 60):  # noqa: ANN001, ANN201
        """Run a coroutine on the server's loop (e.g. to poke the runner)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 5.0) -> None:
        if not self.loop.is_running():
            return
        try:
            self.call(self.running.stop(grace), timeout=grace + 60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)


@pytest.fixture
def serve(settings_for, home: Path):
    """serve("training", **settings) -> ThreadedServer; all are stopped at teardown."""
    servers: list[ThreadedServer] = []

    def make(service: str, register=None, **kw: object) -> ThreadedServer:  # noqa: ANN001
        srv = ThreadedServer(settings_for(service, **kw), register)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()
    _kill_workers(home)


class ServiceProcess:
    """A service in its own process (for kill -9 tests)."""

    def __init__(self, service: str, home: Path, port: int, env: dict[str, str]) -> None:
        self.service, self.home, self.port, self.env = service, home, port, env
        self.proc: subprocess.Popen | None = None
        self.log = home / f"{service}-server.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        cmd = [sys.executable, "-m", "services.runtime.rpc.server", self.service]
        cmd += ["--port", str(self.port), "--home", str(self.home)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=self.env, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    pass
                time.sleep(0.1)  # waiting for the server to come up, not faking work
        raise RuntimeError(f"server not healthy in {timeout}s: {self.log.read_text()[-2000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture
def service_process(home: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """Factory for services in subprocesses; every process group is killed at teardown."""
    started: list[ServiceProcess] = []
    env = dict(os.environ)
    env["MLXU_HOME"] = str(home)
    base = tmp_path_factory.getbasetemp().resolve()
    env["MLXU_ALLOWED_ROOTS"] = os.pathsep.join([str(tmp_path.resolve()), str(base), str(REPO)])
    env.pop("MLXU_API_KEYS", None)

    def make(service: str, port: int | None = None) -> ServiceProcess:
        sp = ServiceProcess(service, home, port or free_port(), env)
        started.append(sp)
        return sp

    yield make
    for sp in started:
        if sp.proc and sp.proc.poll() is None:
            os.killpg(sp.proc.pid, signal.SIGKILL)
            sp.proc.wait()
    _kill_workers(home)


def _kill_workers(home: Path) -> None:
    """Kill any job worker left running for this home (workers outlive a killed service)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"services.runtime.jobs.worker" in cmd and str(home).encode() in cmd:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(proc.name), signal.SIGKILL)


# After every test has run and pytest has printed its summary, leave without the
# interpreter's teardown: a C++ thread (MLX or gRPC) destroyed at exit intermittently
# aborts it ("terminate called without an active exception", exit 134) after a green
# run. The exit status stays pytest's own. MLXU_TEST_SOFT_EXIT=1 restores a normal exit
# (to chase the root cause).
_SESSION: dict[str, int] = {}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _SESSION["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if "status" in _SESSION and not os.environ.get("MLXU_TEST_SOFT_EXIT"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_SESSION["status"])
