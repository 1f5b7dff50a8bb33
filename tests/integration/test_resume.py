"""kill -9 mid-job: of the worker, of the service, of the service with its workers. The job
continues from its last checkpoint and its loss curve matches an uninterrupted run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from mlx_unified.v1 import common_pb2
from tests.conftest import ThreadedServer, write_jsonl
from tests.integration.helpers import Stubs, losses
from tests.integration.test_training_service import CHAT_ROWS, sft_spec

STEPS, EVERY = 200, 25


def worker_pids(job_id: str) -> list[int]:
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"services.runtime.jobs.worker" in cmd and job_id.encode() in cmd:
            pids.append(int(proc.name))
    return pids


def spec(model: Path, data: Path, name: str):
    s = sft_spec(model, data, steps=STEPS, ckpt_every=EVERY)
    s.output_name = name
    s.loop.steps_per_eval = -1
    return s


def run_until_checkpoint(stubs: Stubs, job_id: str) -> int:
    """Follow the job until its first checkpoint event; returns that checkpoint's step."""
    for resp in stubs.watch(job_id):
        if resp.event.WhichOneof("payload") == "checkpoint":
            return resp.event.checkpoint.step
    raise AssertionError("job ended before writing a checkpoint")


def curve_by_step(events) -> dict[int, float]:
    """The loss each step reported; a resumed attempt overwrites the killed one's later steps."""
    return dict(losses(events))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", CHAT_ROWS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, data) -> dict[int, float]:
    """The uninterrupted run every interrupted one is compared with (same service code)."""
    from services.runtime.settings import Settings

    home = tmp_path_factory.mktemp("reference-home")
    base = tmp_path_factory.getbasetemp().resolve()
    srv = ThreadedServer(Settings(service="training", home=home, allowed_roots=(home, base)))
    stubs = Stubs(srv.address)
    try:
        job = stubs.start_sft(spec(tiny_model, data, "reference"))
        final, events = stubs.wait(job.job_id)
    finally:
        stubs.close()
        srv.stop()
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    return curve_by_step(events)


def assert_resumed(final, events, reference: dict[int, float], killed_after: int) -> None:
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.attempts == 2
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    running = [
        e.seq
        for e in events
        if e.WhichOneof("payload") == "state_change"
        and e.state_change.to_state == common_pb2.JOB_STATE_RUNNING
    ]
    assert len(running) == 2
    second = [
        e.progress.step
        for e in events
        if e.WhichOneof("payload") == "progress" and e.seq > running[1]
    ]
    # The second attempt starts right after a checkpoint, not from step 1.
    first = second[0]
    assert first > 1 and (first - 1) % EVERY == 0 and first - 1 >= killed_after, second[:3]
    assert second == list(range(first, STEPS + 1))
    logs = [e.log.text for e in events if e.WhichOneof("payload") == "log"]
    assert any("resuming from" in t for t in logs), logs
    curve = curve_by_step(events)
    for step in second:
        assert curve[step] == pytest.approx(reference[step], abs=1e-4), step


def test_kill9_worker_resumes_from_checkpoint(serve, tiny_model, data, reference):
    srv = serve("training")
    stubs = Stubs(srv.address)
    job = stubs.start_sft(spec(tiny_model, data, "killed-worker"))
    ckpt = run_until_checkpoint(stubs, job.job_id)
    pids = worker_pids(job.job_id)
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    final, events = stubs.wait(job.job_id)
    reasons = [e.state_change.reason for e in events if e.WhichOneof("payload") == "state_change"]
    assert any("signal 9" in r for r in reasons), reasons
    assert_resumed(final, events, reference, ckpt)


def test_kill9_service_reattaches_to_its_running_worker(service_process, tiny_model, data):
    svc = service_process("training").start()
    stubs = Stubs(svc.address)
    s = spec(tiny_model, data, "service-killed")
    job = stubs.start_sft(s)
    run_until_checkpoint(stubs, job.job_id)
    svc.kill9()
    assert worker_pids(job.job_id), "the worker must outlive its service"
    svc.start()
    final, events = stubs.wait(job.job_id)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.attempts == 1 and final.step == STEPS
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    stubs.close()


def test_kill9_service_and_workers_resumes_after_restart(
    service_process, tiny_model, data, reference
):
    svc = service_process("training").start()
    stubs = Stubs(svc.address)
    job = stubs.start_sft(spec(tiny_model, data, "all-killed"))
    ckpt = run_until_checkpoint(stubs, job.job_id)
    pids = worker_pids(job.job_id)
    svc.kill9()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    svc.start()
    final, events = stubs.wait(job.job_id)
    reasons = [e.state_change.reason for e in events if e.WhichOneof("payload") == "state_change"]
    assert any("restarted" in r for r in reasons), reasons
    assert_resumed(final, events, reference, ckpt)
    stubs.close()


def test_sigterm_parks_jobs_and_restart_resumes(service_process, tiny_model, data):
    svc = service_process("training").start()
    stubs = Stubs(svc.address)
    job = stubs.start_sft(spec(tiny_model, data, "sigterm"))
    run_until_checkpoint(stubs, job.job_id)
    assert svc.terminate() == 0
    assert not worker_pids(job.job_id)
    svc.start()
    final, events = stubs.wait(job.job_id)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    reasons = [e.state_change.reason for e in events if e.WhichOneof("payload") == "state_change"]
    assert any("shutting down" in r for r in reasons), reasons
    stubs.close()
