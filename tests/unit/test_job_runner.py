import asyncio
import dataclasses
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from services.runtime.contract import JobContext
from services.runtime.errors import FailedPrecondition
from services.runtime.jobs import testing
from services.runtime.jobs.runner import JobRunner, build_command, pid_runs_job
from services.runtime.jobs.store import JobState, JobStore
from services.runtime.settings import Settings

S = JobState


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.home = tmp_path / "home"
        self.settings = Settings(service="training", home=self.home, max_attempts=3)
        self.store = JobStore(self.settings.db_path)
        self.runners: list[JobRunner] = []

    def runner(self, max_concurrent: int = 1, **settings: object) -> JobRunner:
        s = Settings(service="training", home=self.home, **{"max_attempts": 3, **settings})
        r = JobRunner(self.store, s, max_concurrent, poll_s=0.02)
        self.runners.append(r)
        return r

    def job(self, name: str, **config: object) -> str:
        job, _ = self.store.create(
            "sft", testing.TEST_ENTRY, config, str(self.home / "jobs" / name), None, {}
        )
        return job.job_id

    def events(self, job_id: str, type: str | None = None):
        evs = self.store.events(job_id, limit=10_000)
        return [e for e in evs if type is None or e.type == type]

    def kill_leftovers(self) -> None:
        for job in self.store.list(page_size=500)[0]:
            pids = {job.worker_pid} | {r.active.get(job.job_id) for r in self.runners}
            for pid in pids - {None}:
                if pid_runs_job(pid, job.job_id):
                    os.killpg(pid, signal.SIGKILL)


@pytest.fixture
async def env(tmp_path):
    e = Env(tmp_path)
    yield e
    for r in e.runners:
        await r.shutdown(grace_s=0.5)
    e.kill_leftovers()


async def until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def group_gone(pgid: int) -> bool:
    """No live process left in the group (an orphan's zombie, until init reaps it, is dead)."""
    if not sys.platform.startswith("linux"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return False
    return True


def reference_loss(steps: int) -> float:
    """The final loss of an uninterrupted run, in-process."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        info = testing.run({"steps": steps}, JobContext(job_id="ref", output_dir=Path(d)))
    return info.metrics["loss"]


def requeues(env: Env, job_id: str) -> list[str]:
    return [
        e.payload["reason"]
        for e in env.events(job_id, "state")
        if e.payload["from"] == "RUNNING" and e.payload["to"] == "PENDING"
    ]


def progress_steps(env: Env, job_id: str) -> list[int]:
    return [e.payload["step"] for e in env.events(job_id, "progress")]


def steps_around_requeue(env: Env, job_id: str) -> tuple[list[int], list[int]]:
    """Progress steps reported before and after the (single) RUNNING->PENDING requeue."""
    [requeue] = [
        e.seq
        for e in env.events(job_id, "state")
        if (e.payload["from"], e.payload["to"]) == ("RUNNING", "PENDING")
    ]
    progress = env.events(job_id, "progress")
    before = [e.payload["step"] for e in progress if e.seq < requeue]
    after = [e.payload["step"] for e in progress if e.seq > requeue]
    return before, after


async def test_jobs_succeed_in_fifo_order_with_contiguous_events(env):
    runner = env.runner(max_concurrent=1)
    first, second = env.job("a", steps=6), env.job("b", steps=4)
    await runner.submit(first)
    await runner.submit(second)
    await runner.submit(first)  # a retried Start: no second worker
    a = await runner.wait(first, timeout=20)
    b = await runner.wait(second, timeout=20)

    assert (a.state, b.state) == (S.SUCCEEDED, S.SUCCEEDED)
    assert b.start_time >= a.end_time  # one slot: the second waited for the first
    events = env.events(first)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.payload["to"] for e in events if e.type == "state"] == [
        "PENDING",
        "RUNNING",
        "SUCCEEDED",
    ]
    assert events[-1].type == "state"
    assert progress_steps(env, first) == [1, 2, 3, 4, 5, 6]
    losses = [e.payload["metrics"]["loss"] for e in env.events(first, "progress")]
    assert losses[-1] < losses[0] / 4  # it really trains
    ckpts = [e.payload["step"] for e in env.events(first, "checkpoint")]
    assert ckpts == [2, 4, 6, 6]  # every 2 steps, then final/
    assert a.result["path"] == str(Path(a.output_dir) / "final")
    assert (Path(a.result["path"]) / "manifest.json").is_file()
    assert a.result["metrics"]["loss"] == pytest.approx(reference_loss(6), rel=1e-6)
    assert (a.step, a.total_steps, a.attempts, a.worker_pid) == (6, 6, 1, None)
    assert (Path(a.output_dir) / "worker.log").stat().st_size > 0


async def test_cancel_running_and_pending(env):
    runner = env.runner(max_concurrent=1)
    running = env.job("run", steps=500, step_delay_s=0.05)
    queued = env.job("queued", steps=3)
    await runner.submit(running)
    await runner.submit(queued)
    await until(lambda: env.store.get(running).step >= 2, what="training to start")
    pgid = env.store.get(running).worker_pid

    first = await runner.cancel(queued, "not needed")
    assert (first.state, first.attempts, first.error) == (S.CANCELLED, 0, "not needed")
    job = await runner.cancel(running, "user asked")
    assert (job.state, job.error) == (S.CANCELLED, "user asked")
    job = await runner.wait(running, timeout=10)
    assert group_gone(pgid)
    assert job.state is S.CANCELLED and job.step < 500
    assert env.events(running)[-1].payload == {
        "from": "RUNNING",
        "to": "CANCELLED",
        "reason": "user asked",
    }
    assert env.store.get(queued).state is S.CANCELLED
    assert not (Path(env.store.get(queued).output_dir) / "worker.log").exists()
    with pytest.raises(FailedPrecondition, match="already CANCELLED"):
        await runner.cancel(running)


async def test_kill9_of_worker_resumes_from_checkpoint(env):
    runner = env.runner()
    job_id = env.job("k9", steps=14, step_delay_s=0.05, checkpoint_every=2)
    await runner.submit(job_id)
    await until(lambda: env.store.get(job_id).step >= 5, what="step 5")
    os.kill(env.store.get(job_id).worker_pid, signal.SIGKILL)
    job = await runner.wait(job_id, timeout=20)

    assert job.state is S.SUCCEEDED and job.attempts == 2
    [reason] = requeues(env, job_id)
    m = re.fullmatch(
        r"worker exited with signal 9 \(SIGKILL\); resuming from checkpoint step (\d+)", reason
    )
    assert m, reason
    resumed_at = int(m.group(1))
    assert resumed_at >= 4
    before, after = steps_around_requeue(env, job_id)
    assert before == list(range(1, len(before) + 1)) and len(before) >= resumed_at
    assert after == list(range(resumed_at + 1, 15))  # not back to step 1
    # Resuming from the checkpoint gives exactly the uninterrupted result.
    assert job.result["metrics"]["loss"] == pytest.approx(reference_loss(14), rel=1e-6)


async def test_crash_on_last_attempt_fails_with_log_tail(env):
    runner = env.runner(max_attempts=1)
    job_id = env.job("crash", steps=500, step_delay_s=0.05)
    await runner.submit(job_id)
    await until(lambda: env.store.get(job_id).step >= 1, what="step 1")
    os.kill(env.store.get(job_id).worker_pid, signal.SIGKILL)
    job = await runner.wait(job_id, timeout=10)
    assert job.state is S.FAILED
    assert job.error.startswith("worker exited with signal 9 (SIGKILL) (attempt 1 of 1)")
    assert "last lines of" in job.error and '"event": "job_start"' in job.error


async def test_trainer_error_fails_without_retry(env):
    runner = env.runner()
    job_id = env.job("boom", steps=10, fail_at_step=3)
    await runner.submit(job_id)
    job = await runner.wait(job_id, timeout=20)
    assert job.state is S.FAILED
    assert job.error == "RuntimeError: fail_at_step=3 reached"
    assert job.attempts == 1 and requeues(env, job_id) == []
    assert job.step == 2
    [tb] = [e.payload for e in env.events(job_id, "log") if e.payload["level"] == "error"]
    assert "Traceback" in tb["text"] and "fail_at_step=3 reached" in tb["text"]
    assert env.events(job_id)[-1].payload["reason"] == job.error


SERVICE = textwrap.dedent(
    """
    import services, asyncio, sys
    from pathlib import Path
    from services.runtime.jobs import JobRunner, JobStore
    from services.runtime.settings import Settings

    async def main():
        settings = Settings(service="training", home=Path(sys.argv[1]))
        runner = JobRunner(JobStore(settings.db_path), settings, 2, poll_s=0.02)
        await runner.recover()
        print("started", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_recover_after_service_crash_reattaches_and_requeues(env):
    live = env.job("live", steps=40, step_delay_s=0.04)
    dead = env.job("dead", steps=40, step_delay_s=0.04)
    service = subprocess.Popen([sys.executable, "-c", SERVICE, str(env.home)])
    try:
        await until(
            lambda: min(env.store.get(live).step, env.store.get(dead).step) >= 3,
            what="both jobs running",
        )
    finally:
        service.kill()  # kill -9 of the service process
        service.wait()
    live_pid, dead_pid = env.store.get(live).worker_pid, env.store.get(dead).worker_pid
    assert pid_runs_job(live_pid, live)  # workers outlive the service (own session)
    os.killpg(dead_pid, signal.SIGKILL)  # ...but this one dies while the service is down
    await until(lambda: not pid_runs_job(dead_pid, dead), what="worker to die")
    assert env.store.get(dead).state is S.RUNNING

    runner = env.runner(max_concurrent=2)
    await runner.recover()
    assert runner.active[live] == live_pid  # reattached, not restarted
    [reason] = requeues(env, dead)
    assert re.fullmatch(r"service restarted; resuming from checkpoint step \d+", reason)

    a = await runner.wait(live, timeout=20)
    b = await runner.wait(dead, timeout=20)
    assert (a.state, a.attempts) == (S.SUCCEEDED, 1)
    assert (b.state, b.attempts) == (S.SUCCEEDED, 2)
    assert progress_steps(env, live) == list(range(1, 41))
    resumed_at = int(reason.rsplit(" ", 1)[1])
    assert resumed_at >= 2
    assert steps_around_requeue(env, dead)[1] == list(range(resumed_at + 1, 41))
    assert group_gone(live_pid)


async def test_graceful_shutdown_leaves_job_pending_with_checkpoint(env):
    runner = env.runner()
    job_id = env.job("grace", steps=40, step_delay_s=0.03, checkpoint_every=1000)
    await runner.submit(job_id)
    await until(lambda: env.store.get(job_id).step >= 3, what="step 3")
    pgid = env.store.get(job_id).worker_pid
    await runner.shutdown(grace_s=10)

    job = env.store.get(job_id)
    assert job.state is S.PENDING and job.error == "" and group_gone(pgid)
    # checkpoint_every=1000: the only checkpoint is the one written on SIGUSR1.
    ckpt = job.latest_checkpoint
    assert ckpt is not None and ckpt["step"] == job.step
    assert (Path(ckpt["path"]) / "manifest.json").is_file()
    assert requeues(env, job_id) == [
        f"service shutting down; resuming from checkpoint step {job.step}"
    ]

    # The next service start resumes it where it stopped.
    again = env.runner()
    await again.recover()
    done = await again.wait(job_id, timeout=20)
    assert done.state is S.SUCCEEDED and done.attempts == 2
    assert progress_steps(env, job_id) == list(range(1, 41))


def test_build_command(env):
    job = env.store.get(env.job("cmd", steps=1))
    db = env.store.db_path
    worker = [sys.executable, "-m", "services.runtime.jobs.worker", "--db", str(db)]
    assert build_command(job, db) == [*worker, "--job", job.job_id]

    def with_resources(**res):
        return build_command(dataclasses.replace(job, config={"resources": res}), db)

    argv = with_resources(num_processes=4, backend="nccl")
    sep = argv.index("--")
    assert argv[sep + 1 :] == [*worker, "--job", job.job_id]
    launcher = argv[:sep]
    assert launcher[:2] == [sys.executable, "-c"] and "mlx._distributed_utils.launch" in argv[2]
    assert launcher[3:] == ["-n", "4", "--backend", "nccl", "--env", "MLXU_DISTRIBUTED=1"]
    argv = with_resources(num_processes=4, hosts=["10.0.0.1", "10.0.0.2"])
    assert argv[3:7] == ["--hosts", "10.0.0.1,10.0.0.2", "-n", "2"]
    argv = with_resources(num_processes=2, hostfile="/etc/hosts.json")
    assert argv[3:5] == ["--hostfile", "/etc/hosts.json"]


async def test_data_parallel_job_writes_once_and_stops_together(env):
    """Two ranks through mlx.launch: rank 0 alone writes; SIGUSR1 stops both ranks."""
    runner = env.runner()
    resources = {"num_processes": 2, "backend": "ring"}
    job_id = env.job("dp", steps=200, step_delay_s=0.03, resources=resources)
    await runner.submit(job_id)
    await until(lambda: env.store.get(job_id).step >= 3, what="step 3")
    pgid = env.store.get(job_id).worker_pid
    await runner.shutdown(grace_s=10)

    job = env.store.get(job_id)
    assert job.state is S.PENDING and group_gone(pgid)
    assert job.latest_checkpoint["step"] == job.step  # saved on the stop request
    assert progress_steps(env, job_id) == list(range(1, job.step + 1))  # one writer
    [start] = [e.payload["text"] for e in env.events(job_id, "log")]
    assert "2 process(es)" in start
    lines = (Path(job.output_dir) / "worker.log").read_text().splitlines()
    stopped = [ln for ln in lines if '"event": "job_interrupted"' in ln]
    # Both ranks checkpointed-and-stopped cleanly (neither was killed by the runner).
    assert sorted('"rank": 0' in ln for ln in stopped) == [False, True]
