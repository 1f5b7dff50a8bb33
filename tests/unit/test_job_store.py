import asyncio
import subprocess
import sys
import textwrap
import time

import pytest

from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from services.runtime.jobs.store import TRANSITIONS, JobState, JobStore, follow

ENTRY = "services.runtime.jobs.testing:run"
S = JobState


@pytest.fixture
def store(tmp_path):
    return JobStore(tmp_path / "state" / "jobs.db")


def new_job(store, config=None, kind="sft", request_id=None, labels=None):
    job, created = store.create(kind, ENTRY, config or {"steps": 3}, "/tmp/out", request_id, labels)
    assert created
    return job


# Shortest way to reach each state from a new job.
PATHS = {
    S.PENDING: [],
    S.RUNNING: [S.RUNNING],
    S.SUCCEEDED: [S.RUNNING, S.SUCCEEDED],
    S.FAILED: [S.FAILED],
    S.CANCELLED: [S.CANCELLED],
}


def job_in(store, state):
    job = new_job(store)
    for step in PATHS[state]:
        job = store.transition(job.job_id, step, "setup")
    assert job.state is state
    return job


def test_create_writes_job_and_first_event(store):
    job = new_job(store, {"steps": 3, "lr": 0.5}, labels={"team": "nlp"})
    assert job.state is S.PENDING
    assert job.config == {"steps": 3, "lr": 0.5}
    assert job.labels == {"team": "nlp"}
    assert (job.attempts, job.step, job.last_seq) == (0, 0, 1)
    assert job.start_time is None and job.end_time is None
    [ev] = store.events(job.job_id)
    assert (ev.seq, ev.type) == (1, "state")
    assert ev.payload == {"from": None, "to": "PENDING", "reason": "created"}
    assert store.get(job.job_id) == job


def test_get_unknown_job_is_not_found(store):
    with pytest.raises(NotFound, match="job 'nope' not found"):
        store.get("nope")
    with pytest.raises(NotFound):
        store.events("nope")


@pytest.mark.parametrize("src", list(S))
@pytest.mark.parametrize("dst", list(S))
def test_transition_table(store, src, dst):
    job = job_in(store, src)
    if dst in TRANSITIONS[src]:
        after = store.transition(job.job_id, dst, "because")
        assert after.state is dst
        assert after.last_seq == job.last_seq + 1
        assert store.events(job.job_id)[-1].payload == {
            "from": src.value,
            "to": dst.value,
            "reason": "because",
        }
    else:
        with pytest.raises(FailedPrecondition, match=f"is {src.value}; it cannot become"):
            store.transition(job.job_id, dst, "because")
        assert store.get(job.job_id) == job  # nothing written, no event


def test_terminal_states_allow_nothing():
    for state in (S.SUCCEEDED, S.FAILED, S.CANCELLED):
        assert TRANSITIONS[state] == frozenset()


def test_transition_bookkeeping(store):
    job = new_job(store)
    run1 = store.transition(job.job_id, S.RUNNING, "start", worker_pid=4242)
    assert (run1.attempts, run1.worker_pid) == (1, 4242)
    assert run1.start_time is not None
    back = store.transition(job.job_id, S.PENDING, "requeued")
    assert back.worker_pid is None and back.end_time is None and back.error == ""
    run2 = store.transition(job.job_id, S.RUNNING, "again")
    assert run2.attempts == 2
    assert run2.start_time == run1.start_time  # first start is kept
    failed = store.transition(job.job_id, S.FAILED, "ValueError: boom")
    assert failed.error == "ValueError: boom"
    assert failed.end_time >= failed.start_time
    assert [e.payload["to"] for e in store.events(job.job_id)] == [
        "PENDING",
        "RUNNING",
        "PENDING",
        "RUNNING",
        "FAILED",
    ]


def test_conditional_transition_cannot_overwrite_cancel(store):
    job = job_in(store, S.RUNNING)
    store.transition(job.job_id, S.CANCELLED, "user")
    # The worker finishing at the same moment: its write is refused, not an error.
    assert store.transition(job.job_id, S.SUCCEEDED, "done", expect={S.RUNNING}) is None
    final = store.get(job.job_id)
    assert final.state is S.CANCELLED and final.error == "user"
    assert store.events(job.job_id)[-1].payload["to"] == "CANCELLED"
    # expect matching but not allowed by the table still raises.
    with pytest.raises(FailedPrecondition):
        store.transition(job.job_id, S.RUNNING, expect={S.CANCELLED})


def test_create_is_idempotent_on_request_id(store):
    first, created = store.create("sft", ENTRY, {"steps": 3, "lr": 1}, "/a", "req-1", {})
    again, created_again = store.create("sft", ENTRY, {"lr": 1, "steps": 3}, "/b", "req-1", {})
    assert created and not created_again
    assert again == first  # key order of the config does not matter
    assert store.by_request_id("req-1") == first and store.by_request_id("other") is None
    assert len(store.events(first.job_id)) == 1
    with pytest.raises(FailedPrecondition, match="request_id 'req-1' was used for a different"):
        store.create("sft", ENTRY, {"steps": 4, "lr": 1}, "/a", "req-1", {})
    with pytest.raises(FailedPrecondition, match="different request"):
        store.create("dpo", ENTRY, {"steps": 3, "lr": 1}, "/a", "req-1", {})
    # No request id (or an empty one): every call is a new job.
    a, _ = store.create("sft", ENTRY, {}, "/a", None, {})
    b, _ = store.create("sft", ENTRY, {}, "/a", "", {})
    assert a.job_id != b.job_id
    assert len(store.list()[0]) == 3


def test_append_event_updates_job_and_skips_terminal(store):
    job = job_in(store, S.RUNNING)
    seq = store.append_event(
        job.job_id,
        "progress",
        {"step": 5, "metrics": {"loss": 1.5}},
        {"step": 5, "total_steps": 10, "metrics": {"loss": 1.5}, "eta_seconds": 3.0},
    )
    assert seq == 3
    ckpt = {"path": "/x/step_5", "step": 5}
    assert store.append_event(job.job_id, "checkpoint", ckpt, {"latest_checkpoint": ckpt}) == 4
    got = store.get(job.job_id)
    assert (got.step, got.total_steps, got.eta_seconds) == (5, 10, 3.0)
    assert got.metrics == {"loss": 1.5} and got.latest_checkpoint == ckpt
    assert [e.seq for e in store.events(job.job_id, after_seq=2)] == [3, 4]
    assert [e.seq for e in store.events(job.job_id, after_seq=1, limit=2)] == [2, 3]
    with pytest.raises(ValueError):
        store.append_event(job.job_id, "state", {})
    store.transition(job.job_id, S.SUCCEEDED, "done")
    assert store.append_event(job.job_id, "log", {"level": "info", "text": "late"}) is None
    assert store.events(job.job_id)[-1].payload["to"] == "SUCCEEDED"


_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from services.runtime.jobs.store import JobStore
    store = JobStore(Path(sys.argv[1]))
    print("ready", flush=True)
    go = Path(sys.argv[1]).with_name("go")
    while not go.exists():  # start barrier: all writers begin together
        time.sleep(0.001)
    for n in range(int(sys.argv[4])):
        store.append_event(sys.argv[2], "log", {"writer": sys.argv[3], "n": n}, {"step": n})
        time.sleep(0.0005)  # leave the lock free between writes so that writers interleave
    """
)


def test_seq_is_contiguous_under_concurrent_writers(store):
    job = job_in(store, S.RUNNING)
    n = 150
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(store.db_path), job.job_id, w, str(n)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in ("a", "b")
    ]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    store.db_path.with_name("go").touch()
    for i in range(n):  # this process writes too
        store.append_event(job.job_id, "log", {"writer": "main", "n": i})
        time.sleep(0.0005)
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    events = store.events(job.job_id, limit=10_000)
    assert [e.seq for e in events] == list(range(1, 3 * n + 3))
    assert store.get(job.job_id).last_seq == 3 * n + 2
    for writer in ("a", "b", "main"):
        mine = [e.payload["n"] for e in events if e.payload.get("writer") == writer]
        assert mine == list(range(n))
    # The writers really did interleave (otherwise this test proves nothing).
    writers = [e.payload.get("writer") for e in events[2:]]
    switches = sum(a != b for a, b in zip(writers, writers[1:], strict=False))
    assert switches > 10


def test_list_pages_newest_first_with_filters(store):
    ids = [new_job(store, kind="sft" if i % 2 else "dpo").job_id for i in range(7)]
    store.transition(ids[6], S.CANCELLED, "x")
    newest_first = ids[::-1]
    seen, token = [], ""
    for expected_len in (3, 3, 1):
        page, token = store.list(page_size=3, page_token=token)
        assert len(page) == expected_len
        seen += [j.job_id for j in page]
    assert token == "" and seen == newest_first
    sft, _ = store.list(kind="sft")
    assert [j.job_id for j in sft] == [i for i in newest_first if i in ids[1::2]]
    pending, token = store.list(states=["PENDING"], page_size=4)
    assert [j.job_id for j in pending] == newest_first[1:5] and token
    rest, last = store.list(states=["PENDING"], page_size=4, page_token=token)
    assert [j.job_id for j in rest] == newest_first[5:] and last == ""
    assert len(store.list(page_size=10_000)[0]) == 7  # capped at 500, not an error
    with pytest.raises(InvalidArgument, match="page_token"):
        store.list(page_token="garbage!")
    with pytest.raises(InvalidArgument, match="page_token"):
        store.list(states=["RUNNING"], page_size=4, page_token=token)  # other filters
    with pytest.raises(InvalidArgument, match="page_size"):
        store.list(page_size=-1)
    with pytest.raises(InvalidArgument, match="unknown job state"):
        store.list(states=["UNSPECIFIED"])


def test_job_ids_in_creation_order(store):
    ids = [new_job(store).job_id for _ in range(3)]
    store.transition(ids[1], S.RUNNING)
    assert store.job_ids([S.PENDING]) == [ids[0], ids[2]]
    assert store.job_ids([S.PENDING, S.RUNNING]) == ids


async def test_follow_replays_then_tails_until_terminal(store):
    job = job_in(store, S.RUNNING)
    store.append_event(job.job_id, "log", {"level": "info", "text": "before"})
    got = []

    async def watch():
        async for ev, snap in follow(store, job.job_id, after_seq=1, poll_s=0.01):
            got.append((ev.seq, ev.type, snap.last_seq >= ev.seq))

    task = asyncio.create_task(watch())
    await asyncio.sleep(0.05)
    assert not task.done()  # tailing a live job
    for step in (1, 2):
        store.append_event(job.job_id, "progress", {"step": step}, {"step": step})
        await asyncio.sleep(0.03)
    store.transition(job.job_id, S.SUCCEEDED, "done")
    await asyncio.wait_for(task, 2)
    assert got == [
        (2, "state", True),
        (3, "log", True),
        (4, "progress", True),
        (5, "progress", True),
        (6, "state", True),
    ]
    # A finished job: replay only, then the stream ends.
    replay = [ev.seq async for ev, _ in follow(store, job.job_id, after_seq=4)]
    assert replay == [5, 6]
    with pytest.raises(NotFound):
        async for _ in follow(store, "missing"):
            pass
