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
(``<output_dir>/ranks/rank-<r>.json``, see protocol.py) and mlx.launch's own "Node with rank
R exited with code C" lines say what happened: a rank that raised fails the job with that
rank's reason (no retry, as for one process); a rank that died (kill -9, OOM, lost host) is
a crash, retried from the last checkpoint like a dead one-process worker. When a rank has
died (its pid is gone, it exited non-zero, or mlx.launch reported it) and the rest of the
group is still up ``rank_grace_s`` later, the runner kills the group: survivors of a dead
peer can block forever inside a collective (MLX's ring does not always raise), and a job
must never hang on a half-dead group.

Store calls are synchronous: each is one short SQLite transaction, and running them on the
event loop keeps launch/cancel/exit handling free of interleavings.

This module holds the queue and the decisions; the worker's command line is built in
launch.py, a running worker is observed through watch.py, and what runner and worker agree
on (exit codes, job spec, status files) is in protocol.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
from collections import deque
from pathlib import Path

import structlog

from services.runtime.errors import FailedPrecondition
from services.runtime.jobs.launch import (
    LaunchError,
    build_command,
    free_port_block,
    launch_command,
    num_processes,
    plan_hostfile,
)
from services.runtime.jobs.protocol import (
    EXIT_INTERRUPTED,
    WORKER_LOG,
    WORKER_MODULE,
    latest_complete_checkpoint,
    read_rank_statuses,
)
from services.runtime.jobs.store import JobRecord, JobState, JobStore
from services.runtime.jobs.watch import (
    Worker,
    describe_exit,
    describe_ranks,
    log_tail,
    pid_runs_job,
    signal_group,
)
from services.runtime.settings import Settings

# Names callers imported from here before launch.py and watch.py were split out.
__all__ = [
    "WORKER_LOG",
    "WORKER_MODULE",
    "JobRunner",
    "LaunchError",
    "build_command",
    "describe_ranks",
    "free_port_block",
    "num_processes",
    "pid_runs_job",
    "plan_hostfile",
]

_REPO_ROOT = str(Path(__file__).resolve().parents[3])

log = structlog.get_logger()


def _resume_note(job: JobRecord) -> str:
    """Where the next attempt starts: the checkpoint the worker will find on disk."""
    ckpt = latest_complete_checkpoint(Path(job.output_dir))
    if ckpt is None:
        return "no checkpoint yet, restarting from step 0"
    m = re.search(r"(\d+)$", ckpt.name)
    where = f"step {int(m.group(1))}" if m else ckpt.name
    return f"resuming from checkpoint {where}"


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
        self._workers: dict[str, Worker] = {}
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
                worker = Worker(job.worker_pid, Path(job.output_dir) / WORKER_LOG)
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
            signal_group(worker.pid, signal.SIGUSR1)
        waits = [asyncio.create_task(w.exited.wait()) for w in workers.values()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace_s)
            for job_id, worker in workers.items():
                if not worker.exited.is_set():
                    log.warning("worker_killed_at_shutdown", job_id=job_id, pid=worker.pid)
                    signal_group(worker.pid, signal.SIGKILL)
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

    def _worker_for(self, job: JobRecord, pid: int, popen=None) -> Worker:
        log_path = Path(job.output_dir) / WORKER_LOG
        return Worker(
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
        roots = self.settings.allowed_roots
        return launch_command(job, self.store.db_path, env, self.hostfile, roots)

    def _watch(self, job_id: str, worker: Worker) -> None:
        self._workers[job_id] = worker
        worker.task = asyncio.get_running_loop().create_task(self._monitor(job_id, worker))

    async def _monitor(self, job_id: str, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        rank_check, rank_dead_since = 0.0, 0.0
        while True:
            alive, code = worker.exit_status(job_id)
            if not alive:
                break
            if worker.world > 1 and loop.time() >= rank_check:
                rank_check = loop.time() + max(0.5, self.poll_s)
                if not worker.dead:
                    worker.dead = worker.dead_rank(job_id) or ""
                    rank_dead_since = loop.time()
                elif loop.time() - rank_dead_since > self.rank_grace_s and not worker.note:
                    worker.note = (
                        f"still running {self.rank_grace_s:g}s later (blocked on the dead "
                        "rank), killed by the service"
                    )
                    log.warning("rank_group_killed", job_id=job_id, why=worker.dead)
                    signal_group(worker.pid, signal.SIGKILL)
            await asyncio.sleep(self.poll_s)
        # Ranks of an mlx.launch group may outlive their launcher: the group goes too.
        signal_group(worker.pid, signal.SIGKILL)
        del self._workers[job_id]
        try:
            self._after_exit(job_id, code, worker)
        except Exception:
            log.exception("exit_handling_failed", job_id=job_id)
        worker.exited.set()
        self._pump()
        await self._notify()

    def _after_exit(self, job_id: str, code: int | None, worker: Worker) -> None:
        job = self.store.get(job_id)
        log.info("worker_exited", job_id=job_id, code=code, state=job.state.value)
        if job.state is not JobState.RUNNING:
            return
        running = {JobState.RUNNING}
        if self._shutting_down:
            note = f"service shutting down; {_resume_note(job)}"
            self.store.transition(job_id, JobState.PENDING, note, expect=running)
            return
        what = "interrupted" if code == EXIT_INTERRUPTED else describe_exit(code)
        if worker.world > 1 and worker.output_dir is not None:
            statuses = read_rank_statuses(worker.output_dir, worker.attempt)
            what, fatal = describe_ranks(statuses, worker.world, worker.attempt_log(), worker.note)
            if not statuses and code is not None and code > 0:  # e.g. a bad hostfile
                fatal = f"mlx.launch failed ({describe_exit(code)}) before any rank started"
            if fatal is not None:
                tail = log_tail(worker.log_path)
                reason = fatal + (f"; last lines of {worker.log_path}:\n{tail}" if tail else "")
                self.store.transition(job_id, JobState.FAILED, reason, expect=running)
                return
        if job.attempts < self.settings.max_attempts:
            note = f"{what}; {_resume_note(job)}"
            if self.store.transition(job_id, JobState.PENDING, note, expect=running):
                self._queue.append(job_id)
            return
        reason = f"{what} (attempt {job.attempts} of {self.settings.max_attempts})"
        tail = log_tail(worker.log_path)
        if tail:
            reason += f"; last lines of {worker.log_path}:\n{tail}"
        self.store.transition(job_id, JobState.FAILED, reason, expect=running)

    async def _terminate(self, job_id: str, worker: Worker) -> None:
        signal_group(worker.pid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.kill_grace_s
        while loop.time() < deadline:
            if worker.exited.is_set() or not worker.exit_status(job_id)[0]:
                return
            await asyncio.sleep(self.poll_s)
        log.warning("worker_killed", job_id=job_id, pid=worker.pid)
        signal_group(worker.pid, signal.SIGKILL)
