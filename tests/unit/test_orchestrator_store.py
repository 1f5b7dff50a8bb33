"""Orchestrator store: idempotent creates, state machine, contiguous events, replay, tail."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from orchestrator.pipeline import normalize, resolve
from orchestrator.store import Store, idempotency_key
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound

RS, SS = opb.RunState, opb.StageState


def make_pipeline(store: Store, request_id: str = "") -> opb.Pipeline:
    spec = normalize(
        opb.PipelineSpec(
            name="p",
            base_model=cpb.ModelRef(model="base"),
            dataset=cpb.DatasetRef(path="/d.jsonl"),
            stages=[opb.Stage(kind=opb.STAGE_KIND_SFT), opb.Stage(kind=opb.STAGE_KIND_DPO)],
        )
    )
    plan = resolve(spec, ["training", "rlhf"])
    pl, _ = store.create_pipeline(spec, plan.to_json(), request_id, "h1" if request_id else "")
    return pl


def job_event(seq: int, step: int) -> tuple[cpb.JobEvent, cpb.Job]:
    ev = cpb.JobEvent(job_id="j1", seq=seq, progress=cpb.Progress(step=step, total_steps=9))
    return ev, cpb.Job(job_id="j1", state=cpb.JOB_STATE_RUNNING, step=step)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state" / "orchestrator.db")
    yield s
    s.close()


def test_pipelines_and_runs_are_idempotent_on_request_id(store: Store) -> None:
    a = make_pipeline(store, "req-1")
    b = make_pipeline(store, "req-1")
    assert a.pipeline_id == b.pipeline_id
    assert len(store.list_pipelines()[0]) == 1
    assert b.resolved["stages"][1]["spec"]["reference"]["model"] == "${stages.sft.result}"
    # Same key, different request: FAILED_PRECONDITION, as the trainer services answer it.
    with pytest.raises(FailedPrecondition, match="request_id 'req-1' was used"):
        store.create_pipeline(a.spec, {"stages": []}, "req-1", "other-hash")
    r1, created1 = store.create_run(a.pipeline_id, "run-req")
    r2, created2 = store.create_run(a.pipeline_id, "run-req")
    assert (created1, created2) == (True, False) and r1.run_id == r2.run_id
    assert [s.name for s in r1.stages] == ["sft", "dpo"]
    assert all(s.state == SS.STAGE_STATE_PENDING for s in r1.stages)
    with pytest.raises(NotFound):
        store.get_run("run-missing")


def test_event_seq_is_contiguous_and_relay_deduplicates(store: Store) -> None:
    pl = make_pipeline(store)
    run, _ = store.create_run(pl.pipeline_id)
    rid = run.run_id
    store.set_run_state(rid, RS.RUN_STATE_RUNNING, "started")
    att = store.begin_attempt(rid, "sft", spec={"output_name": "x"}, inputs={}, cache_key="k")
    assert (
        att.idempotency_key == idempotency_key(rid, "sft", 1) == f"runs/{rid}/stages/sft/attempts/1"
    )
    assert store.attempts(rid, "sft")[0].spec == {"output_name": "x"}
    store.record_job(rid, "sft", 1, "j1", "attempt 1")
    relayed = [store.relay(rid, "sft", 1, *job_event(i, i)) for i in (1, 2, 3)]
    # A re-watch after a reconnect replays seq 2..4: only 4 is new.
    again = [store.relay(rid, "sft", 1, *job_event(i, i)) for i in (2, 3, 4)]
    assert all(r is not None for r in relayed) and again[:2] == [None, None]
    assert again[2] is not None
    assert store.latest_attempt(rid, "sft").last_job_seq == 4
    assert store.get_run(rid).stages[0].job.step == 4
    ckpt = cpb.Checkpoint(path="/ck/sft", sha256="abc")
    store.set_stage_state(rid, "sft", SS.STAGE_STATE_SUCCEEDED, "done", result=ckpt)
    store.set_stage_state(rid, "dpo", SS.STAGE_STATE_SKIPPED, "cached", cached_from="runs/x")
    store.set_run_state(rid, RS.RUN_STATE_SUCCEEDED, "done", result=ckpt)

    events = store.events(rid)
    assert [e.seq for e in events] == list(range(1, 11))
    kinds = [e.WhichOneof("payload") for e in events]
    assert kinds[:3] == ["run_state_change", "run_state_change", "stage_state_change"]
    assert kinds[3:7] == ["job_event"] * 4
    assert [e.job_event.event.seq for e in events[3:7]] == [1, 2, 3, 4]
    assert events[2].stage_state_change.job_id == "j1"
    assert [e.seq for e in store.events(rid, after_seq=6)] == [7, 8, 9, 10]
    run = store.get_run(rid)
    assert run.state == RS.RUN_STATE_SUCCEEDED and run.result.path == "/ck/sft"
    assert run.stages[1].cached_from == "runs/x"
    hit = store.find_cached("k")
    assert hit is not None and hit.result.sha256 == "abc" and hit.ref == f"runs/{rid}/stages/sft"
    assert store.find_cached("k", exclude_run=rid) is None
    with pytest.raises(FailedPrecondition):  # terminal runs stay terminal
        store.set_run_state(rid, RS.RUN_STATE_RUNNING, "again")
    assert len(store.events(rid)) == 10  # the rejected change wrote nothing


def test_state_survives_reopen_and_lists_page(store: Store, tmp_path: Path) -> None:
    pl = make_pipeline(store)
    ids = [store.create_run(pl.pipeline_id)[0].run_id for _ in range(5)]
    store.set_run_state(ids[0], RS.RUN_STATE_CANCELLED, "no")
    other = Store(tmp_path / "state" / "orchestrator.db")
    try:
        assert set(other.unfinished_runs()) == set(ids[1:])
        page1, token = other.list_runs(pl.pipeline_id, page_size=3)
        page2, token2 = other.list_runs(pl.pipeline_id, page_size=3, page_token=token)
        assert token2 == "" and len(page1) == 3 and len(page2) == 2
        assert {r.run_id for r in page1 + page2} == set(ids)
        with pytest.raises(InvalidArgument):
            other.list_runs(page_token="garbage!")
    finally:
        other.close()


async def test_watch_replays_then_tails_until_the_run_ends(store: Store) -> None:
    pl = make_pipeline(store)
    rid = store.create_run(pl.pipeline_id)[0].run_id
    store.set_run_state(rid, RS.RUN_STATE_RUNNING, "started")
    got: list[int] = []

    async def consume() -> None:
        async for ev in store.watch(rid, after_seq=1):
            got.append(ev.seq)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)  # let it replay seq 2 and park
    assert got == [2]
    store.set_stage_state(rid, "sft", SS.STAGE_STATE_CANCELLED, "x")
    store.set_run_state(rid, RS.RUN_STATE_CANCELLED, "x")
    await asyncio.wait_for(task, 5)
    assert got == [2, 3, 4, 5]  # 4: the never-started dpo stage ends CANCELLED with the run
    # A late watcher of a finished run gets the replay and ends.
    assert [e.seq async for e in store.watch(rid)] == [1, 2, 3, 4, 5]
    with pytest.raises(NotFound):
        [e async for e in store.watch("run-nope")]
