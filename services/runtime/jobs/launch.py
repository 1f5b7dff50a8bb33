"""How a job's worker is launched: its command line, and for data-parallel jobs the
hostfile and the rendezvous ports it runs with.

One process is ``python -m services.runtime.jobs.worker --db DB --job ID``; a job with
``resources.num_processes`` > 1 runs that same command on every rank through ``mlx.launch``.
Functions of the job record, the filesystem (hostfiles, stale rank statuses) and the
network (free ports); no process bookkeeping, so each can be tested without a runner.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from services.runtime.errors import InvalidArgument
from services.runtime.jobs.protocol import (
    DISTRIBUTED_ENV,
    JOB_SPEC_ENV,
    LOCAL_RANKS_ENV,
    RANKS_DIR,
    WORKER_MODULE,
    JobSpec,
    latest_complete_checkpoint,
)
from services.runtime.jobs.store import JobRecord
from services.runtime.paths import confine

__all__ = [
    "LaunchError",
    "build_command",
    "free_port_block",
    "launch_command",
    "num_processes",
    "plan_hostfile",
]


# mlx.launch's module has no __main__ guard. The launcher ignores SIGTERM/SIGUSR1 (the ranks,
# in its process group, get them too): it must outlive the ranks while they checkpoint, or
# its exit would make the runner kill the group mid-save. Ranks reset both handlers.
_MLX_LAUNCH = (
    "import signal, sys; "
    "[signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGUSR1)]; "
    "from mlx._distributed_utils.launch import main; sys.exit(main())"
)


def num_processes(job: JobRecord) -> int:
    return max(1, int((job.config.get("resources") or {}).get("num_processes") or 1))


def build_command(
    job: JobRecord,
    db_path: Path,
    *,
    hostfile: str | None = None,
    port: int | None = None,
    remote_env: dict[str, str] | None = None,
) -> list[str]:
    """argv of the job's worker: one process, or ``resources.num_processes`` through mlx.launch.

    The data-parallel form marks the ranks with MLXU_DISTRIBUTED=1 through ``--env``, which
    mlx.launch exports on every host. ``hostfile`` (the runner's choice: the job's, trimmed,
    or the service's) replaces ``resources.hostfile``; ``port`` is a free port block for the
    ring (or NCCL) rendezvous, so concurrent jobs on one host never collide; ``remote_env``
    is what ranks on other hosts need (job spec, PYTHONPATH, ...): local ranks inherit the
    launcher's environment. Note that mlx.launch exits 0 whatever its ranks did.
    """
    argv = [sys.executable, "-m", WORKER_MODULE, "--db", str(db_path), "--job", job.job_id]
    res = job.config.get("resources") or {}
    n = num_processes(job)
    if n <= 1:
        return argv
    launch = [sys.executable, "-c", _MLX_LAUNCH]
    hostfile = hostfile or res.get("hostfile")
    if hostfile:
        launch += ["--hostfile", str(hostfile)]
    elif res.get("hosts"):
        # mlx.launch runs -n processes on each host.
        hosts = list(res["hosts"])
        launch += ["--hosts", ",".join(hosts), "-n", str(max(1, n // len(hosts)))]
    else:
        launch += ["-n", str(n)]
    backend = str(res.get("backend") or "").lower()
    if backend and backend != "unspecified":
        launch += ["--backend", backend]
    if port is not None:  # ring / JACCL listen from --starting-port, NCCL meets at --nccl-port
        launch += ["--starting-port", str(port), "--nccl-port", str(port)]
    envs = ["--env", f"{DISTRIBUTED_ENV}=1"]
    for key, value in (remote_env or {}).items():
        envs += ["--env", f"{key}={value}"]
    return [*launch, *envs, "--", *argv]


class LaunchError(Exception):
    """A data-parallel job that cannot be launched as asked (a stated reason, no retry)."""


def plan_hostfile(
    job: JobRecord, default_hostfile: str = "", roots: tuple[Path, ...] = ()
) -> str | None:
    """The hostfile a data-parallel job runs with: the job's (confined to ``roots`` when
    given), else the service's (if any), cut to the job's first ``num_processes`` hosts
    (written next to its output)."""
    res = job.config.get("resources") or {}
    n = num_processes(job)
    if n <= 1:
        return None
    hosts = list(res.get("hosts") or [])
    if hosts:
        if n % len(hosts):
            raise LaunchError(
                f"{n} processes cannot be spread evenly over {len(hosts)} hosts "
                "(mlx.launch runs the same number on each)"
            )
        return None
    path = str(res.get("hostfile") or default_hostfile or "")
    if not path:
        return None
    if res.get("hostfile") and roots:
        try:
            path = str(confine(path, roots, "spec.resources.hostfile"))
        except InvalidArgument as exc:
            raise LaunchError(str(exc)) from exc
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise LaunchError(f"cannot read the hostfile {path}: {exc}") from exc
    entries = data.get("hosts", []) if isinstance(data, dict) else data
    if len(entries) < n:
        raise LaunchError(f"the hostfile {path} lists {len(entries)} hosts; the job asks for {n}")
    if len(entries) == n:
        return path
    # One rank per host entry: keep the first n (and each host's RDMA devices to them).
    keep = [{**h, "rdma": list(h["rdma"])[:n]} if h.get("rdma") else h for h in entries[:n]]
    out = {**data, "hosts": keep} if isinstance(data, dict) else keep
    dst = Path(job.output_dir) / "hostfile.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(out, indent=2))
    return str(dst)


def free_port_block(n: int, tries: int = 50) -> int:
    """A port p with p .. p+n-1 all free on this host (ring ranks listen on one each)."""
    for _ in range(tries):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("0.0.0.0", p))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise OSError(f"no block of {n} free ports found")


def launch_command(
    job: JobRecord,
    db_path: Path,
    env: dict[str, str],
    default_hostfile: str = "",
    roots: tuple[Path, ...] = (),
) -> list[str]:
    """argv for the job; for a data-parallel job also fills ``env`` (job spec, threads).

    Raises LaunchError (or OSError: no free ports) when the job cannot run as asked."""
    n = num_processes(job)
    if n <= 1:
        return build_command(job, db_path)
    res = job.config.get("resources") or {}
    hostfile = plan_hostfile(job, default_hostfile, roots)
    # Statuses of an earlier attempt must not speak for this one.
    for f in (Path(job.output_dir) / RANKS_DIR).glob("rank-*.json"):
        f.unlink(missing_ok=True)
    spec = JobSpec.of(job, latest_complete_checkpoint(Path(job.output_dir)))
    env[JOB_SPEC_ENV] = spec.to_json()
    multi_host = bool(hostfile or res.get("hosts"))
    remote = None
    if multi_host:
        # ssh starts remote ranks with a bare environment: send what they need.
        keys = (JOB_SPEC_ENV, "MLXU_HOME", "PYTHONPATH", "PYTHONUNBUFFERED")
        remote = {k: env[k] for k in keys}
    else:
        # n ranks share this host's cores: each gets its own slice of them (the worker
        # pins itself) and a BLAS thread pool of that size, not n oversubscribed pools.
        env[LOCAL_RANKS_ENV] = str(n)
        env.setdefault("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    # Unset backend: mlx.launch picks NCCL where CUDA is available, else the ring.
    port = None if multi_host else free_port_block(n)
    return build_command(job, db_path, hostfile=hostfile, port=port, remote_env=remote)
