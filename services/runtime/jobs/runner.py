"""Start, watch, cancel and recover job workers from inside the (asyncio) service process.

Each job runs as ``python -m services.runtime.jobs.worker`` in its own session (process
group): Cancel kills the whole group, a crash or OOM in training never reaches the service,
and workers outlive a killed service, which reattaches them by pid on its next start
(``recover``). The database is the source of truth; the runner only reacts to worker exits:

- job already terminal (the worker recorded SUCCEEDED/FAILED, or it was cancelled): done;
- exit 75 (interrupted after a checkpoint) or a shutdown in progress: back to PENDING;
- any other exit while RUNNING (crash, kill -9, OOM): PENDING again to resume from the
  newest checkpoint while attempts < max_attempts, FAILED with the tail of worker.log after.

Store calls are synchronous: each is one short SQLite transaction, and running them on the
event loop keeps launch/cancel/exit handling free of interleavings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from services.runtime.errors import FailedPrecondition
from services.runtime.jobs.store import JobRecord, JobState, JobStore
from services.runtime.jobs.worker import EXIT_INTERRUPTED, latest_complete_checkpoint
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


def build_command(job: JobRecord, db_path: Path) -> list[str]:
    """argv of the job's worker: one process, or ``resources.num_processes`` through mlx.launch.

    The data-parallel form marks the ranks with MLXU_DISTRIBUTED=1 through ``--env``, which
    mlx.launch exports on every host. Note that mlx.launch exits 0 whatever its ranks did.
    """
    argv = [sys.executable, "-m", WORKER_MODULE, "--db", str(db_path), "--job", job.job_id]
    res = job.config.get("resources") or {}
    n = int(res.get("num_processes") or 1)
    if n <= 1:
        return argv
    launch = [sys.executable, "-c", _MLX_LAUNCH]
    if res.get("hostfile"):
        launch += ["--hostfile", str(res["hostfile"])]
    elif res.get("hosts"):
        # mlx.launch runs -n processes on each host.
        hosts = list(res["hosts"])
        launch += ["--hosts", ",".join(hosts), "-n", str(max(1, n // len(hosts)))]
    else:
        launch += ["-n", str(n)]
    backend = str(res.get("backend") or "").lower()
    if backend and backend != "unspecified":
        launch += ["--backend", backend]
    return [*launch, "--env", "MLXU_DISTRIBUTED=1", "--", *argv]


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
    ) -> None:
        self.store = store
        self.settings = settings
        self.max_concurrent = max_concurrent
        self.kill_grace_s = kill_grace_s
        self.poll_s = poll_s
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
                worker = _Worker(job.worker_pid, Path(job.output_dir) / WORKER_LOG)
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

    def _launch(self, job_id: str) -> None:
        job = self.store.transition(
            job_id, JobState.RUNNING, "worker starting", expect={JobState.PENDING}
        )
        if job is None:  # cancelled while queued
            return
        argv = build_command(job, self.store.db_path)
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
            log_path.parent.mkdir(parents=True, exist_ok=True)
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
        self._watch(job_id, _Worker(popen.pid, log_path, popen))

    def _watch(self, job_id: str, worker: _Worker) -> None:
        self._workers[job_id] = worker
        worker.task = asyncio.get_running_loop().create_task(self._monitor(job_id, worker))

    async def _monitor(self, job_id: str, worker: _Worker) -> None:
        while True:
            alive, code = worker.exit_status(job_id)
            if not alive:
                break
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
