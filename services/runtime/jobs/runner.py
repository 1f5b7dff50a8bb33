"""Start, watch, cancel and recover job workers from inside the (asyncio) service process.

Each job runs as ``python -m services.runtime.jobs.worker`` in its own session (process
group): Cancel kills the whole group, a crash or OOM in training never reaches the service,
and workers outlive a killed service, which reattaches them by pid on its next start
(``recover``). The database is the source of truth; the runner only reacts to worker exits:

- job already terminal (the worker recorded SUCCEEDED/FAILED, or it was cancelled): done;
- exit 75 (interrupted after a checkpoint) or a shutdown in progress: back to PENDING;
- any other exit while RUNNING (crash, kill -9, OOM): PENDING again to resume from the
  newest checkpoint while attempts < max_attempts, FAILED with the tail of worker.log after.

Data-parallel jobs (``resources.num_processes`` > 1) run under ``mlx.launch``, which exits 0
whatever its ranks did, so its exit code says nothing. The ranks' status files
(``<output_dir>/ranks/rank-<r>.json``, see worker.py) and mlx.launch's own "Node with rank
R exited with code C" lines say what happened: a rank that raised fails the job with that
rank's reason (no retry, as for one process); a rank that died (kill -9, OOM, lost host) is
a crash, retried from the last checkpoint like a dead one-process worker. When a rank has
died (its pid is gone, it exited non-zero, or mlx.launch reported it) and the rest of the
group is still up ``rank_grace_s`` later, the runner kills the group: survivors of a dead
peer can block forever inside a collective (MLX's ring does not always raise), and a job
must never hang on a half-dead group.

Store calls are synchronous: each is one short SQLite transaction, and running them on the
event loop keeps launch/cancel/exit handling free of interleavings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.runtime.jobs.store import JobRecord, JobState, JobStore
from services.runtime.jobs.worker import (
    EXIT_INTERRUPTED,
    JOB_SPEC_ENV,
    RANKS_DIR,
    JobSpec,
    latest_complete_checkpoint,
    read_rank_statuses,
)
from services.runtime.paths import confine
from services.runtime.settings import Settings

WORKER_MODULE = "services.runtime.jobs.worker"
WORKER_LOG = "worker.log"
_REPO_ROOT = str(Path(__file__).resolve().parents[3])

log = structlog.get_logger()


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
    envs = ["--env", "MLXU_DISTRIBUTED=1"]
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


_NODE_EXIT = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was (killed))")


def describe_ranks(
    statuses: dict[int, dict], world: int, launcher_log: str = "", killed: str = ""
) -> tuple[str, str | None]:
    """(what happened to a data-parallel group, reason to fail without retry or None).

    ``statuses`` are the ranks' status files of this attempt; ``launcher_log`` the worker.log
    text of this attempt, where mlx.launch reports each rank's exit code; ``killed`` what
    the runner did to ranks still running when it killed the group, if it did.
    """
    codes: dict[int, str] = {}
    for m in _NODE_EXIT.finditer(launcher_log):
        codes[int(m.group(1))] = "killed" if m.group(3) else m.group(2)
    errors = sorted(
        (s.get("time", 0.0), r, s.get("reason") or "error")
        for r, s in statuses.items()
        if s.get("state") == "exited" and s.get("kind") == "error"
    )
    if errors:
        _, rank, reason = errors[0]
        return f"rank {rank} of {world} failed", f"rank {rank} of {world} failed: {reason}"
    exited = {r: s for r, s in statuses.items() if s.get("state") == "exited"}
    if len(exited) == world and all(s.get("code") == EXIT_INTERRUPTED for s in exited.values()):
        return "interrupted", None
    died, lost, stuck = [], [], []
    for r in range(world):
        s = statuses.get(r)
        code = codes.get(r)
        if s is not None and s.get("state") == "exited":
            if s.get("kind") == "peer_lost":
                lost.append(str(r))
            continue
        if code is None and s is not None and killed:
            stuck.append(str(r))
            continue
        if code is None:
            how = "died without reporting an exit (killed, out of memory, or its host lost)"
            if s is None:
                how = "never reported (it did not start, or it died at once)"
        elif code == "killed":
            how = "was killed by mlx.launch"
        else:
            how = _describe_exit(int(code)).replace("worker exited", "exited")
        died.append(f"rank {r} {how}")
    parts = died
    if lost:
        parts.append(f"rank(s) {', '.join(lost)} lost their peers")
    if stuck:
        parts.append(f"rank(s) {', '.join(stuck)} {killed}")
    return "; ".join(parts) or "all ranks exited, but the job did not finish", None


def pid_runs_job(pid: int, job_id: str) -> bool:
    """True when pid is alive and is a worker of job_id (not a reused pid, not a zombie)."""
    try:
        if sys.platform.startswith("linux"):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            args = [a.decode(errors="replace") for a in cmdline]
        else:
            out = subprocess.run(
                ["ps", "-p", str(pid), "-o", "command="], capture_output=True, text=True
            )
            args = out.stdout.split()
    except OSError:
        return False
    return job_id in args and any(WORKER_MODULE in a for a in args)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "worker exited (status unknown: it was reattached after a service restart)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        return f"worker exited with signal {-code} ({name})"
    return f"worker exited with code {code}"


def _resume_note(job: JobRecord) -> str:
    """Where the next attempt starts: the checkpoint the worker will find on disk."""
    ckpt = latest_complete_checkpoint(Path(job.output_dir))
    if ckpt is None:
        return "no checkpoint yet, restarting from step 0"
    m = re.search(r"(\d+)$", ckpt.name)
    where = f"step {int(m.group(1))}" if m else ckpt.name
    return f"resuming from checkpoint {where}"


def _log_tail(path: Path, lines: int = 20, max_chars: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])[-max_chars:]


@dataclass
class _Worker:
    pid: int  # also the process group id (start_new_session)
    log_path: Path
    popen: subprocess.Popen | None = None  # None when reattached after a restart
    task: asyncio.Task | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    # Data-parallel jobs: ranks, attempt (whose status files count), where this attempt's
    # lines start in worker.log, and why the runner killed the group (if it did).
    world: int = 1
    output_dir: Path | None = None
    attempt: int = 0
    log_offset: int = 0
    scanned: int = 0  # how far the watchdog has read worker.log for mlx.launch's lines
    dead: str = ""  # the first rank death the watchdog saw
    note: str = ""

    def exit_status(self, job_id: str) -> tuple[bool, int | None]:
        """(alive, exit code); the code of a reattached worker is unknowable (None)."""
        if self.popen is not None:
            code = self.popen.poll()
            return code is None, code
        return pid_runs_job(self.pid, job_id), None


class JobRunner:
    """FIFO queue of PENDING jobs, at most ``max_concurrent`` workers at a time.

    All public methods are coroutines and must run on the service's event loop.
    """

    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        max_concurrent: int = 1,
        *,
        kill_grace_s: float = 3.0,
        poll_s: float = 0.1,
        rank_grace_s: float = 5.0,
    ) -> None:
        self.store = store
        self.settings = settings
        self.max_concurrent = max_concurrent
        self.kill_grace_s = kill_grace_s
        self.poll_s = poll_s
        # How long the rest of a data-parallel group may outlive a dead rank.
        self.rank_grace_s = rank_grace_s
        # The service's hostfile (mlx.launch format) for jobs that name no hosts.
        self.hostfile = getattr(settings, "hostfile", "") or os.environ.get("MLXU_HOSTFILE", "")
        self._queue: deque[str] = deque()
        self._workers: dict[str, _Worker] = {}
        self._shutting_down = False
        self._changed = asyncio.Condition()
        self._background: set[asyncio.Task] = set()  # strong refs: the loop keeps weak ones

    # -- public API --------------------------------------------------------------------------

    async def submit(self, job_id: str) -> None:
        """Queue a PENDING job. A job already queued, running or not PENDING is left alone,
        so a retried Start may call this again safely."""
        if job_id in self._queue or job_id in self._workers:
            return
        if self.store.get(job_id).state is not JobState.PENDING:
            return
        self._queue.append(job_id)
        self._pump()

    async def cancel(self, job_id: str, reason: str = "") -> JobRecord:
        """Cancel a PENDING or RUNNING job; FailedPrecondition when it already finished.

        The CANCELLED state is written before the worker is signalled, so the worker's own
        conditional RUNNING->SUCCEEDED cannot overwrite it. Returns without waiting for the
        process group to die (SIGTERM, then SIGKILL after ``kill_grace_s``).
        """
        reason = reason or "cancelled by request"
        for _ in range(5):  # the state may move under us (a worker finishing): re-read
            job = self.store.get(job_id)
            if job.terminal:
                raise FailedPrecondition(f"job {job_id} is already {job.state.value}")
            done = self.store.transition(job_id, JobState.CANCELLED, reason, expect={job.state})
            if done is None:
                continue
            with contextlib.suppress(ValueError):
                self._queue.remove(job_id)
            worker = self._workers.get(job_id)
            if worker is None and job.worker_pid and pid_runs_job(job.worker_pid, job_id):
                # Running but not ours to watch (recover() not called yet): stop it anyway.
                worker = _Worker(job.worker_pid, Path(job.output_dir) / WORKER_LOG)
            if worker is not None:
                task = asyncio.get_running_loop().create_task(self._terminate(job_id, worker))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            log.info("job_cancelled", job_id=job_id, reason=reason)
            await self._notify()
            return done
        raise FailedPrecondition(f"job {job_id} keeps changing state; try again")

    async def recover(self) -> None:
        """At service start: reattach live workers of RUNNING jobs, requeue the rest."""
        for job_id in self.store.job_ids([JobState.RUNNING]):
            if job_id in self._workers:
                continue
            job = self.store.get(job_id)
            if job.worker_pid and pid_runs_job(job.worker_pid, job_id):
                log.info("worker_reattached", job_id=job_id, pid=job.worker_pid)
                worker = self._worker_for(job, job.worker_pid)
                # Earlier lines (other attempts' rank exits) must not read as news.
                with contextlib.suppress(OSError):
                    worker.log_offset = worker.log_path.stat().st_size
                self._watch(job_id, worker)
            else:
                note = f"service restarted; {_resume_note(job)}"
                self.store.transition(job_id, JobState.PENDING, note, expect={JobState.RUNNING})
        for job_id in self.store.job_ids([JobState.PENDING]):
            if job_id not in self._queue:
                self._queue.append(job_id)
        self._pump()

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop for a service shutdown: workers checkpoint and exit (SIGUSR1), stragglers
        are killed after ``grace_s``; their jobs stay PENDING, resumed at the next start."""
        self._shutting_down = True
        self._queue.clear()
        workers = dict(self._workers)
        for worker in workers.values():
            _signal_group(worker.pid, signal.SIGUSR1)
        waits = [asyncio.create_task(w.exited.wait()) for w in workers.values()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace_s)
            for job_id, worker in workers.items():
                if not worker.exited.is_set():
                    log.warning("worker_killed_at_shutdown", job_id=job_id, pid=worker.pid)
                    _signal_group(worker.pid, signal.SIGKILL)
            if pending:
                await asyncio.wait(pending, timeout=max(5.0, 10 * self.poll_s))

    async def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """Wait until the runner is done with a job (not queued, no live worker); returns it.

        For tests and in-process callers; clients follow jobs through events instead.
        """

        async def idle() -> None:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: job_id not in self._queue and job_id not in self._workers
                )

        await asyncio.wait_for(idle(), timeout)
        return self.store.get(job_id)

    @property
    def active(self) -> dict[str, int]:
        """job_id -> worker pid (= process group) of the workers being watched."""
        return {job_id: w.pid for job_id, w in self._workers.items()}

    # -- internals ---------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _pump(self) -> None:
        while self._queue and len(self._workers) < self.max_concurrent:
            if self._shutting_down:
                return
            job_id = self._queue.popleft()
            try:
                self._launch(job_id)
            except Exception:  # one bad job must not stop the queue
                log.exception("launch_failed", job_id=job_id)

    def _worker_for(self, job: JobRecord, pid: int, popen=None) -> _Worker:
        log_path = Path(job.output_dir) / WORKER_LOG
        return _Worker(
            pid,
            log_path,
            popen,
            world=num_processes(job),
            output_dir=Path(job.output_dir),
            attempt=job.attempts,
        )

    def _launch(self, job_id: str) -> None:
        job = self.store.transition(
            job_id, JobState.RUNNING, "worker starting", expect={JobState.PENDING}
        )
        if job is None:  # cancelled while queued
            return
        env = {
            **os.environ,
            "MLXU_HOME": str(self.settings.home),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(
                p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        if self.settings.allowed_roots:
            env["MLXU_ALLOWED_ROOTS"] = os.pathsep.join(map(str, self.settings.allowed_roots))
        log_path = Path(job.output_dir) / WORKER_LOG
        try:
            argv = self._command(job, env)
        except (LaunchError, OSError) as exc:
            reason = f"cannot launch {num_processes(job)} processes: {exc}"
            self.store.transition(job_id, JobState.FAILED, reason, expect={JobState.RUNNING})
            return
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            offset = log_path.stat().st_size if log_path.exists() else 0
            with open(log_path, "ab") as out:
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
        except OSError as exc:
            reason = f"could not start the worker: {exc}"
            self.store.transition(job_id, JobState.FAILED, reason, expect={JobState.RUNNING})
            return
        # A crash between this update and the spawn leaves worker_pid empty: recover()
        # then requeues the job.
        self.store.update(job_id, worker_pid=popen.pid)
        log.info("worker_started", job_id=job_id, pid=popen.pid, attempt=job.attempts)
        worker = self._worker_for(job, popen.pid, popen)
        worker.log_offset = offset
        self._watch(job_id, worker)

    def _command(self, job: JobRecord, env: dict[str, str]) -> list[str]:
        """argv for the job; for a data-parallel job also fills ``env`` (job spec, threads)."""
        n = num_processes(job)
        if n <= 1:
            return build_command(job, self.store.db_path)
        res = job.config.get("resources") or {}
        hostfile = plan_hostfile(job, self.hostfile, self.settings.allowed_roots)
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
            env["MLXU_LOCAL_RANKS"] = str(n)
            env.setdefault("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
        # Unset backend: mlx.launch picks NCCL where CUDA is available, else the ring.
        port = None if multi_host else free_port_block(n)
        return build_command(
            job, self.store.db_path, hostfile=hostfile, port=port, remote_env=remote
        )

    def _watch(self, job_id: str, worker: _Worker) -> None:
        self._workers[job_id] = worker
        worker.task = asyncio.get_running_loop().create_task(self._monitor(job_id, worker))

    async def _monitor(self, job_id: str, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        rank_check, rank_dead_since = 0.0, 0.0
        while True:
            alive, code = worker.exit_status(job_id)
            if not alive:
                break
            if worker.world > 1 and loop.time() >= rank_check:
                rank_check = loop.time() + max(0.5, self.poll_s)
                if not worker.dead:
                    worker.dead = self._dead_rank(job_id, worker) or ""
                    rank_dead_since = loop.time()
                elif loop.time() - rank_dead_since > self.rank_grace_s and not worker.note:
                    worker.note = (
                        f"still running {self.rank_grace_s:g}s later (blocked on the dead "
                        "rank), killed by the service"
                    )
                    log.warning("rank_group_killed", job_id=job_id, why=worker.dead)
                    _signal_group(worker.pid, signal.SIGKILL)
            await asyncio.sleep(self.poll_s)
        # Ranks of an mlx.launch group may outlive their launcher: the group goes too.
        _signal_group(worker.pid, signal.SIGKILL)
        del self._workers[job_id]
        try:
            self._after_exit(job_id, code, worker)
        except Exception:
            log.exception("exit_handling_failed", job_id=job_id)
        worker.exited.set()
        self._pump()
        await self._notify()

    def _dead_rank(self, job_id: str, worker: _Worker) -> str | None:
        """A rank of this attempt that failed or vanished, or None: from mlx.launch's exit
        lines (any host), the ranks' status files and this host's rank pids."""
        assert worker.output_dir is not None
        try:
            with open(worker.log_path, "rb") as f:
                f.seek(worker.log_offset + worker.scanned)
                text = f.read(1 << 20).decode(errors="replace")
        except OSError:
            text = ""
        # Only whole lines: a half-written one is read again next time.
        text = text[: text.rfind("\n") + 1]
        worker.scanned += len(text.encode())
        for m in _NODE_EXIT.finditer(text):
            code = m.group(2)
            if m.group(3) or int(code) not in (0, EXIT_INTERRUPTED):
                return f"mlx.launch saw rank {m.group(1)} exit ({m.group(3) or code})"
        host = socket.gethostname()
        for r, s in read_rank_statuses(worker.output_dir, worker.attempt).items():
            if s.get("state") == "exited" and s.get("code") not in (0, EXIT_INTERRUPTED):
                return f"rank {r} exited with code {s.get('code')}"
            mine = s.get("state") == "running" and s.get("host") == host
            if mine and not pid_runs_job(int(s.get("pid", 0)), job_id):
                return f"rank {r} (pid {s.get('pid')}) died"
        return None

    def _after_exit(self, job_id: str, code: int | None, worker: _Worker) -> None:
        job = self.store.get(job_id)
        log.info("worker_exited", job_id=job_id, code=code, state=job.state.value)
        if job.state is not JobState.RUNNING:
            return
        running = {JobState.RUNNING}
        if self._shutting_down:
            note = f"service shutting down; {_resume_note(job)}"
            self.store.transition(job_id, JobState.PENDING, note, expect=running)
            return
        what = "interrupted" if code == EXIT_INTERRUPTED else _describe_exit(code)
        if worker.world > 1 and worker.output_dir is not None:
            statuses = read_rank_statuses(worker.output_dir, worker.attempt)
            what, fatal = describe_ranks(
                statuses, worker.world, self._attempt_log(worker), worker.note
            )
            if not statuses and code is not None and code > 0:  # e.g. a bad hostfile
                fatal = f"mlx.launch failed ({_describe_exit(code)}) before any rank started"
            if fatal is not None:
                tail = _log_tail(worker.log_path)
                reason = fatal + (f"; last lines of {worker.log_path}:\n{tail}" if tail else "")
                self.store.transition(job_id, JobState.FAILED, reason, expect=running)
                return
        if job.attempts < self.settings.max_attempts:
            note = f"{what}; {_resume_note(job)}"
            if self.store.transition(job_id, JobState.PENDING, note, expect=running):
                self._queue.append(job_id)
            return
        reason = f"{what} (attempt {job.attempts} of {self.settings.max_attempts})"
        tail = _log_tail(worker.log_path)
        if tail:
            reason += f"; last lines of {worker.log_path}:\n{tail}"
        self.store.transition(job_id, JobState.FAILED, reason, expect=running)

    @staticmethod
    def _attempt_log(worker: _Worker) -> str:
        try:
            with open(worker.log_path, "rb") as f:
                f.seek(worker.log_offset)
                return f.read(4 << 20).decode(errors="replace")
        except OSError:
            return ""

    async def _terminate(self, job_id: str, worker: _Worker) -> None:
        _signal_group(worker.pid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.kill_grace_s
        while loop.time() < deadline:
            if worker.exited.is_set() or not worker.exit_status(job_id)[0]:
                return
            await asyncio.sleep(self.poll_s)
        log.warning("worker_killed", job_id=job_id, pid=worker.pid)
        _signal_group(worker.pid, signal.SIGKILL)
