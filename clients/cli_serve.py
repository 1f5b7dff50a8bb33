"""`mlxu serve` and `mlxu up`: run services in the foreground, or all of them as children.

Split from cli.py: starting, health-waiting and stopping child processes (signal forwarding,
grace period, no orphans) is process management, unlike the RPC commands around it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from clients import config
from clients.cli_common import eprint
from clients.client import DEFAULT_PORTS, SERVICES, TLS, health_status
from clients.client_connection import GATEWAY_PORT

GENERATION_PORT = 8800  # services/runtime/settings.py GENERATION_PORT

GATEWAY = "gateway"  # the HTTP/JSON gateway (services/gateway): started after the services
# GenerationService alone (docs/remote.md): not started by `mlxu up` unless named.
GENERATION = "generation"
SERVABLE = (*SERVICES, GATEWAY, GENERATION)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.service == GATEWAY:
        from services.gateway.app import main as gateway_main

        gateway_main(host=args.host, port=args.port, home=args.home)
        return 0
    from services.runtime.rpc.server import main as serve_main  # heavy: only when serving

    serve_main(args.service, host=args.host, port=args.port, home=args.home)
    return 0


def _gateway_status(address: str) -> str:
    """ "SERVING" once the gateway answers /healthz with 200 (every service behind it up)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=1) as resp:
            return "SERVING" if resp.status == 200 else "NOT_SERVING"
    except urllib.error.HTTPError:
        return "NOT_SERVING"
    except (OSError, ValueError):
        return "UNREACHABLE"


def _up_address(service: str, host: str | None) -> str:
    host = host or os.environ.get("MLXU_HOST") or "127.0.0.1"
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = "127.0.0.1"
    default = {GATEWAY: GATEWAY_PORT, GENERATION: GENERATION_PORT}.get(service) or DEFAULT_PORTS[
        service
    ]
    port = os.environ.get(f"MLXU_{service.upper()}_PORT") or default
    return f"{host}:{port}"


def cmd_up(args: argparse.Namespace) -> int:
    """Start the services as child processes, wait until healthy, stop them on Ctrl-C/SIGTERM."""
    names = args.services.split(",") if args.services else [*SERVICES, GATEWAY]
    for n in names:
        if n not in SERVABLE:
            raise config.ConfigError("--services", f"unknown service {n!r}")
    tls = TLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key) if args.tls else None
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name in names:
            argv = [sys.executable, "-m", "clients.cli", "serve", name]
            argv += [f"--{k}={v}" for k, v in (("host", args.host), ("home", args.home)) if v]
            # Own session: a terminal's Ctrl-C reaches only us, and we forward it once.
            procs[name] = subprocess.Popen(argv, start_new_session=True)
        pending = set(names)
        deadline = time.monotonic() + args.wait_timeout
        while pending and not received:
            for name in sorted(pending):
                if procs[name].poll() is not None:
                    eprint(f"{name} exited with code {procs[name].returncode} while starting")
                    return _stop(procs, signal.SIGTERM, args.grace) or 1
                addr = _up_address(name, args.host)
                if name == GATEWAY:
                    # Over TLS the gateway speaks HTTPS; /healthz is not probed then.
                    status = "SERVING" if tls else _gateway_status(addr)
                else:
                    status = health_status(addr, tls=tls)
                if status == "SERVING":
                    docs = f" (HTTP; API docs at http://{addr}/docs)" if name == GATEWAY else ""
                    eprint(f"{name:<13} serving on {addr}{docs}")
                    pending.discard(name)
            if time.monotonic() > deadline:
                eprint(f"not healthy after {args.wait_timeout:.0f}s: {', '.join(sorted(pending))}")
                return _stop(procs, signal.SIGTERM, args.grace) or 1
            time.sleep(0.2)
        if not received:
            eprint("all services up; Ctrl-C stops them")
        while not received:
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                eprint(f"{dead[0]} exited with code {procs[dead[0]].returncode}; stopping the rest")
                return _stop(procs, signal.SIGTERM, args.grace) or 1
            time.sleep(0.3)
        return _stop(procs, received[0], args.grace)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for p in procs.values():  # whatever path we left by, no orphans
            if p.poll() is None:
                p.kill()


def _stop(procs: dict[str, subprocess.Popen], sig: int, grace: float) -> int:
    """Forward ``sig`` to every live child, wait ``grace`` seconds, then kill what is left."""
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + grace
    for name, p in procs.items():
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            eprint(f"{name} did not stop within {grace:.0f}s; killing it")
            p.kill()
            p.wait()
    return 0
