"""Scheduler against a deterministic fake of the trainer services (no gRPC, no training)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from orchestrator.scheduler import RetryPolicy, Scheduler, SchedulerConfig
from orchestrator.store import Store
from services.runtime.errors import InvalidArgument, NotFound, Unavailable

RS, SS, JS = opb.RunState, opb.StageState, cpb.JobState
TERMINAL = {JS.JOB_STATE_SUCCEEDED, JS.JOB_STATE_FAILED, JS.JOB_STATE_CANCELLED}
FAST = SchedulerConfig(
    retry=RetryPolicy(max_tries=4, initial_delay=0.001, max_delay=0.002), cancel_grace=5
)


class FakeJob:
    def __init__(self, job_id: str, kind: str, key: str, spec: Message) -> None:
        self.job = cpb.Job(job_id=job_id, kind=kind, state=JS.JOB_STATE_PENDING, request_id=key)
        self.spec = spec
        self.events: list[tuple[cpb.JobEvent, cpb.Job]] = []
        self.changed = asyncio.Event()
        self.gone = False

    def emit(self, **payload: Message) -> None:
        ev = cpb.JobEvent(job_id=self.job.job_id, seq=len(self.events) + 1, **payload)
        snap = cpb.Job()
        snap.CopyFrom(self.job)
        self.events.append((ev, snap))
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    def move(self, to: int, **fields: object) -> None:
        frm, self.job.state = self.job.state, to
        for k, v in fields.items():
            getattr(self.job, k).CopyFrom(v) if isinstance(v, Message) else setattr(self.job, k, v)
        self.emit(state_change=cpb.StateChange(from_state=frm, to_state=to))


class FakeBackend:
    """Jobs progress synchronously when started: RUNNING, `steps` progress events, a
    checkpoint, then SUCCEEDED (or FAILED for `fail_kinds`); `hold` kinds stay RUNNING
    until `release`. Start is idempotent on the key, like the real services."""

    def __init__(self, root: Path, steps: int = 3) -> None:
        self.root, self.steps = root, steps
        self.jobs: dict[str, FakeJob] = {}
        self.by_key: dict[str, str] = {}
        self.start_calls: list[str] = []
        self.start_errors: list[Exception] = []
        self.watch_calls: list[tuple[str, int]] = []
        self.cancel_calls: list[str] = []
        self.fail_kinds: set[str] = set()
        self.hold: set[str] = set()
        self.drop_watch_after: int | None = None
        self.start_gate: asyncio.Event | None = None
        self.created = 0

    async def start(self, stage_kind: str, spec: Message, idempotency_key: str) -> str:
        self.start_calls.append(idempotency_key)
        if self.start_errors:
            raise self.start_errors.pop(0)
        if idempotency_key not in self.by_key:
            self.created += 1
            job_id = f"{stage_kind}-{self.created}"
            job = self.jobs[job_id] = FakeJob(job_id, stage_kind, idempotency_key, spec)
            self.by_key[idempotency_key] = job_id
            job.move(JS.JOB_STATE_RUNNING)
            for step in range(1, self.steps + 1):
                job.job.step = step
                job.emit(progress=cpb.Progress(step=step, total_steps=self.steps))
            if stage_kind not in self.hold:
                self.finish(job_id)
        if self.start_gate is not None:  # the reply is lost: the caller never hears it
            await self.start_gate.wait()
        return self.by_key[idempotency_key]

    def finish(self, job_id: str) -> None:
        job = self.jobs[job_id]
        if job.job.kind in self.fail_kinds:
            job.move(JS.JOB_STATE_FAILED, error="loss went NaN at step 3")
            return
        out = self.root / job.spec.output_name / "final"
        out.mkdir(parents=True, exist_ok=True)
        sha = hashlib.sha256(str(out).encode()).hexdigest()
        if job.job.kind == "sft":  # SFT yields an adapter on its base; the others full models
            ckpt = cpb.Checkpoint(
                path=str(out), kind=cpb.CHECKPOINT_KIND_ADAPTER, sha256=sha,
                base_model=job.spec.model.model, job_id=job_id, step=self.steps,
            )  # fmt: skip
        else:
            ckpt = cpb.Checkpoint(path=str(out), kind=cpb.CHECKPOINT_KIND_FULL, sha256=sha)
        job.job.latest_checkpoint.CopyFrom(ckpt)
        job.emit(checkpoint=ckpt)
        job.move(JS.JOB_STATE_SUCCEEDED, result=ckpt)

    def forget(self, job_id: str) -> None:
        """The service lost its database: it no longer knows the job or its key."""
        job = self.jobs.pop(job_id)
        self.by_key.pop(job.job.request_id)
        job.gone = True
        job.changed.set()

    def _job(self, job_id: str) -> FakeJob:
        if job_id not in self.jobs:
            raise NotFound(f"job {job_id} not found")
        return self.jobs[job_id]

    async def get(self, stage_kind: str, job_id: str) -> cpb.Job:
        return self._job(job_id).job

    async def watch(
        self, stage_kind: str, job_id: str, after_seq: int
    ) -> AsyncIterator[tuple[cpb.JobEvent, cpb.Job]]:
        job = self._job(job_id)
        self.watch_calls.append((job_id, after_seq))
        sent = 0
        while True:
            changed = job.changed
            while after_seq < len(job.events):
                if self.drop_watch_after is not None and sent == self.drop_watch_after:
                    self.drop_watch_after = None
                    raise Unavailable("connection reset")
                ev, snap = job.events[after_seq]
                after_seq += 1
                sent += 1
                yield ev, snap
            if job.gone:
                raise NotFound(f"job {job_id} not found")
            if job.job.state in TERMINAL:
                return
            await changed.wait()

    async def cancel(self, stage_kind: str, job_id: str, reason: str) -> None:
        self.cancel_calls.append(job_id)
        job = self._job(job_id)
        if job.job.state not in TERMINAL:
            job.move(JS.JOB_STATE_CANCELLED, error=reason)


# ---- helpers -------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "orchestrator.db"


@pytest.fixture
def backend(tmp_path: Path) -> FakeBackend:
    return FakeBackend(tmp_path / "checkpoints")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    p = tmp_path / "prefs.jsonl"
    p.write_text('{"prompt": "hi", "chosen": "hello", "rejected": "go away"}\n')
    return p


_opened: list[Store] = []


@pytest.fixture(autouse=True)
def _close_stores() -> None:
    yield
    while _opened:
        _opened.pop().close()


def make(db: Path, backend: FakeBackend, config: SchedulerConfig = FAST) -> Scheduler:
    """A scheduler over ``db``; a second one over the same file is a restarted process."""
    _opened.append(Store(db))
    return Scheduler(_opened[-1], backend, services={"training", "rlhf"}, config=config)


def sft_dpo(dataset: Path, **extra: object) -> opb.PipelineSpec:
    d = {
        "name": "chat",
        "base_model": {"model": "tiny-llama"},
        "dataset": {"path": str(dataset)},
        "stages": [{"kind": "STAGE_KIND_SFT"}, {"kind": "STAGE_KIND_DPO"}],
    } | extra
    return json_format.ParseDict(d, opb.PipelineSpec())


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for the scheduler task to reach a state (yields to the event loop)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.001)


def assert_log_is_clean(store: Store, run_id: str) -> list[opb.RunEvent]:
    events = store.events(run_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    relayed = [
        (e.job_event.event.job_id, e.job_event.event.seq)
        for e in events
        if e.WhichOneof("payload") == "job_event"
    ]
    assert len(relayed) == len(set(relayed)), "a job event was relayed twice"
    return events


def stage(run: opb.Run, name: str) -> opb.StageRun:
    return next(s for s in run.stages if s.name == name)


# ---- tests ---------------------------------------------------------------------------


async def test_rejected_pipeline_stores_nothing(db: Path, backend: FakeBackend) -> None:
    s = make(db, backend)
    bad = opb.PipelineSpec(name="p", base_model=cpb.ModelRef(model="m"))
    bad.stages.add(kind=opb.STAGE_KIND_PPO)  # no dataset, no reward
    with pytest.raises(InvalidArgument) as e:
        s.create_pipeline(bad, request_id="r1")
    assert {v.field for v in e.value.violations} == {
        "spec.stages[0].ppo.reward",
        "spec.stages[0].ppo.dataset.path",
    }
    assert s.store.list_pipelines()[0] == []


async def test_two_stages_hand_off_path_and_hash(
    db: Path, backend: FakeBackend, dataset: Path
) -> None:
    s = make(db, backend)
    pl, created = s.create_pipeline(sft_dpo(dataset), request_id="create-1")
    assert created and s.create_pipeline(sft_dpo(dataset), "create-1")[0] == pl
    run, _ = await s.run_pipeline(pl.pipeline_id, request_id="run-1")
    watched = [ev async for ev in s.watch(run.run_id)]  # replay + tail until the end
    run = await s.wait(run.run_id)
    assert run.state == RS.RUN_STATE_SUCCEEDED, run.error
    sft, dpo = stage(run, "sft"), stage(run, "dpo")
    assert (sft.state, dpo.state) == (SS.STAGE_STATE_SUCCEEDED, SS.STAGE_STATE_SUCCEEDED)
    assert run.result == dpo.result and dpo.job.state == JS.JOB_STATE_SUCCEEDED

    att = s.store.latest_attempt(run.run_id, "dpo")
    assert att.idempotency_key == f"runs/{run.run_id}/stages/dpo/attempts/1"
    sent = backend.jobs[dpo.job_id].spec  # exactly what the service received
    assert json_format.MessageToDict(sent, preserving_proto_field_name=True) == att.spec
    adapter = {"model": "tiny-llama", "adapter_path": sft.result.path}
    assert att.spec["policy"] == att.spec["reference"] == adapter
    assert att.spec["labels"]["mlxu.input.model.sha256"] == sft.result.sha256
    assert att.spec["labels"]["mlxu.input.reference.path"] == sft.result.path
    assert att.inputs["model"] == {
        "from_stage": "sft",
        "path": sft.result.path,
        "sha256": sft.result.sha256,
    }
    assert att.spec["output_name"] == f"{run.run_id}-dpo"
    events = assert_log_is_clean(s.store, run.run_id)
    assert [e.seq for e in watched] == [e.seq for e in events]
    assert sum(e.WhichOneof("payload") == "job_event" for e in events) == 2 * 6
    await s.close()


async def test_stage_failure_fails_the_run(db: Path, backend: FakeBackend, dataset: Path) -> None:
    backend.fail_kinds = {"sft"}
    s = make(db, backend)
    run, _ = await s.run_pipeline(s.create_pipeline(sft_dpo(dataset))[0].pipeline_id)
    run = await s.wait(run.run_id)
    assert run.state == RS.RUN_STATE_FAILED
    assert "stage 'sft' failed" in run.error and "loss went NaN" in run.error
    assert stage(run, "dpo").state == SS.STAGE_STATE_PENDING  # never started
    assert len(backend.start_calls) == 1


async def test_unavailable_is_retried_with_the_same_key(
    db: Path, backend: FakeBackend, dataset: Path
) -> None:
    backend.start_errors = [Unavailable("connection refused")] * 2
    s = make(db, backend)
    run, _ = await s.run_pipeline(s.create_pipeline(sft_dpo(dataset))[0].pipeline_id)
    run = await s.wait(run.run_id)
    assert run.state == RS.RUN_STATE_SUCCEEDED
    sft_key = f"runs/{run.run_id}/stages/sft/attempts/1"
    assert backend.start_calls[:3] == [sft_key] * 3 and len(backend.start_calls) == 4
    assert len(backend.jobs) == 2


async def test_unavailable_too_long_fails_with_reason(
    db: Path, backend: FakeBackend, dataset: Path
) -> None:
    backend.start_errors = [Unavailable("connection refused")] * 10
    s = make(db, backend)
    run, _ = await s.run_pipeline(s.create_pipeline(sft_dpo(dataset))[0].pipeline_id)
    run = await s.wait(run.run_id)
    assert run.state == RS.RUN_STATE_FAILED
    assert "training service unavailable after 4 tries" in stage(run, "sft").error
    assert len(backend.start_calls) == 4 and not backend.jobs


async def test_invalid_argument_is_not_retried(
    db: Path, backend: FakeBackend, dataset: Path
) -> None:
    backend.start_errors = [InvalidArgument.one("spec.loop.batch_size", "must be > 0")]
    s = make(db, backend)
    run, _ = await s.run_pipeline(s.create_pipeline(sft_dpo(dataset))[0].pipeline_id)
    run = await s.wait(run.run_id)
    assert run.state == RS.RUN_STATE_FAILED
    assert "spec.loop.batch_size: must be > 0" in stage(run, "sft").error
    assert len(backend.start_calls) == 1


async def test_rewatch_after_reconnect_never_duplicates(
    db: Path, backend: FakeBackend, dataset: Path
) -> None:
    backend.drop_watch_after = 2
    s = make(db, backend)
    run, _ = await s.run_pipeline(s.create_pipeline(sft_dpo(dataset))[0].pipeline_id)
    run = await s.wait(run.run_id)
    assert run.state == RS.RUN_STATE_SUCCEEDED
    sft_job = stage(run, "sft").job_id
    assert [c for c in backend.watch_calls if c[0] == sft_job] == [(sft_job, 0), (sft_job, 2)]
    events = assert_log_is_clean(s.store, run.run_id)
    sft_seqs = [e.job_event.event.seq for e in events if e.job_event.stage == "sft"]
    assert sft_seqs == [1, 2, 3, 4, 5, 6]


async def test_cancel_propagates_to_the_job(db: Path, backend: FakeBackend, dataset: Path) -> None:
    backend.hold = {"sft"}
    s = make(db, backend)
    run, _ = await s.run_pipeline(s.create_pipeline(sft_dpo(dataset))[0].pipeline_id)
    await until(lambda: s.store.get_run(run.run_id).stages[0].state == SS.STAGE_STATE_RUNNING)
    run = await s.cancel_run(run.run_id, "changed my mind")
    assert run.state == RS.RUN_STATE_CANCELLED
    sft = stage(run, "sft")
    assert sft.state == SS.STAGE_STATE_CANCELLED and backend.cancel_calls == [sft.job_id]
    assert backend.jobs[sft.job_id].job.state == JS.JOB_STATE_CANCELLED
    assert stage(run, "dpo").state == SS.STAGE_STATE_CANCELLED  # never started
    assert (await s.cancel_run(run.run_id)).state == RS.RUN_STATE_CANCELLED  # idempotent
    last = s.store.events(run.run_id)[-1].run_state_change
    assert last.to_state == RS.RUN_STATE_CANCELLED and last.reason == "changed my mind"


async def test_recovery_reattaches_from_the_last_relayed_seq(
    db: Path, backend: FakeBackend, dataset: Path
) -> None:
    backend.hold = {"sft"}
    a = make(db, backend)
    run, _ = await a.run_pipeline(a.create_pipeline(sft_dpo(dataset))[0].pipeline_id)
    rid = run.run_id
    await until(lambda: (a.store.latest_attempt(rid, "sft") or _none).last_job_seq == 4)
    await a.close()  # the orchestrator "crashes": nothing more is written
    job_id = a.store.get_run(rid).stages[0].job_id
    backend.jobs[job_id].emit(log=cpb.LogMessage(text="while the orchestrator was down"))

    b = make(db, backend)  # a new process over the same database
    assert await b.recover() == [rid]
    await until(lambda: b.store.latest_attempt(rid, "sft").last_job_seq == 5)
    backend.finish(job_id)
    run = await b.wait(rid)
    assert run.state == RS.RUN_STATE_SUCCEEDED
    assert backend.watch_calls[-2:][0] == (job_id, 4)  # reattached after seq 4
    assert len(backend.start_calls) == 2 and stage(run, "sft").attempt == 1
    events = assert_log_is_clean(b.store, rid)
    assert [e.job_event.event.seq for e in events if e.job_event.stage == "sft"] == list(
        range(1, 8)
    )


async def test_recovery_restarts_a_job_the_service_lost(
    db: Path, backend: FakeBackend, dataset: Path
) -> None:
    backend.hold = {"sft"}
    a = make(db, backend)
    run, _ = await a.run_pipeline(a.create_pipeline(sft_dpo(dataset))[0].pipeline_id)
    rid = run.run_id
    await until(lambda: (a.store.latest_attempt(rid, "sft") or _none).last_job_seq == 4)
    await a.close()
    lost = a.store.get_run(rid).stages[0].job_id
    backend.forget(lost)
    backend.hold = set()

    b = make(db, backend)
    await b.recover()
    run = await b.wait(rid)
    assert run.state == RS.RUN_STATE_SUCCEEDED, run.error
    first, second = b.store.attempts(rid, "sft")
    assert second.idempotency_key.endswith("/stages/sft/attempts/2")
    assert second.spec == first.spec  # same output_name: the service resumes there
    assert second.spec["output_name"] == f"{rid}-sft"
    assert stage(run, "sft").attempt == 2 and stage(run, "sft").job_id != lost
    assert sum(k.endswith("sft/attempts/2") for k in backend.start_calls) == 1
    changes = [
        e.stage_state_change for e in b.store.events(rid) if e.HasField("stage_state_change")
    ]
    restart = next(c for c in changes if c.to_state == SS.STAGE_STATE_PENDING)
    assert "no longer knows job" in restart.reason
    assert_log_is_clean(b.store, rid)


async def test_recovery_resends_an_unacknowledged_start(
    db: Path, backend: FakeBackend, dataset: Path
) -> None:
    backend.start_gate = asyncio.Event()  # the service creates the job; the reply is lost
    a = make(db, backend)
    run, _ = await a.run_pipeline(a.create_pipeline(sft_dpo(dataset))[0].pipeline_id)
    await until(lambda: len(backend.jobs) == 1)
    await a.close()
    backend.start_gate = None

    b = make(db, backend)
    await b.recover()
    run = await b.wait(run.run_id)
    assert run.state == RS.RUN_STATE_SUCCEEDED
    sft_key = f"runs/{run.run_id}/stages/sft/attempts/1"
    assert backend.start_calls.count(sft_key) == 2
    assert len(backend.jobs) == 2  # one sft job (not two) + one dpo job


async def test_cache_hit_skips_identical_stages(
    db: Path, backend: FakeBackend, dataset: Path
) -> None:
    s = make(db, backend)
    pl, _ = s.create_pipeline(sft_dpo(dataset))
    first = await s.wait((await s.run_pipeline(pl.pipeline_id))[0].run_id)
    second = await s.wait((await s.run_pipeline(pl.pipeline_id))[0].run_id)
    assert second.state == RS.RUN_STATE_SUCCEEDED and len(backend.jobs) == 2
    for name in ("sft", "dpo"):
        st = stage(second, name)
        assert st.state == SS.STAGE_STATE_SKIPPED
        assert st.cached_from == f"runs/{first.run_id}/stages/{name}"
        assert st.result == stage(first, name).result
    assert second.result == first.result

    dataset.write_text(dataset.read_text() * 2)  # new data: nothing to reuse
    third = await s.wait((await s.run_pipeline(pl.pipeline_id))[0].run_id)
    assert [st.state for st in third.stages] == [SS.STAGE_STATE_SUCCEEDED] * 2

    off, _ = s.create_pipeline(sft_dpo(dataset, cache=False))
    fourth = await s.wait((await s.run_pipeline(off.pipeline_id))[0].run_id)
    assert [st.state for st in fourth.stages] == [SS.STAGE_STATE_SUCCEEDED] * 2
    assert len(backend.jobs) == 6


async def test_start_training_is_a_one_stage_run(
    db: Path, backend: FakeBackend, dataset: Path
) -> None:
    s = make(db, backend)
    st = opb.Stage(kind=opb.STAGE_KIND_SFT)
    st.sft.model.model = "tiny-llama"
    st.sft.dataset.path = str(dataset)
    run, pl = await s.start_training(st, request_id="t1")
    run = await s.wait(run.run_id)
    assert run.state == RS.RUN_STATE_SUCCEEDED and pl.spec.cache is False
    assert (await s.start_training(st, request_id="t1"))[0].run_id == run.run_id
    with pytest.raises(InvalidArgument) as e:
        await s.start_training(opb.Stage(kind=opb.STAGE_KIND_DPO))
    assert {v.field for v in e.value.violations} == {
        "stage.dpo.policy.model",
        "stage.dpo.dataset.path",
    }


class _None:
    last_job_seq = -1


_none = _None()
