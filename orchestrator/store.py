"""Durable orchestrator state: pipelines, runs, stages, attempts and run events (SQLite, WAL).

Every state change and the RunEvent that reports it are written in one transaction; run
events carry a contiguous ``seq`` from 1 per run. Relayed job events are deduplicated by
(stage, attempt, job seq), so re-watching a service after a reconnect never repeats one.
``watch`` replays stored events then tails new ones (an asyncio notification wakes tails
in this process); the newest events of recently active runs are also kept in memory, so a
caught-up watcher is served without a database read (many watchers on one run cost one
write, not one read each). Create-pipeline and run are idempotent on ``request_id``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from orchestrator.pipeline import BY_NAME
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, shown

RS, SS = opb.RunState, opb.StageState
RUN_TERMINAL = {RS.RUN_STATE_SUCCEEDED, RS.RUN_STATE_FAILED, RS.RUN_STATE_CANCELLED}
STAGE_DONE = {SS.STAGE_STATE_SUCCEEDED, SS.STAGE_STATE_SKIPPED}
_RUN_NEXT = {
    RS.RUN_STATE_UNSPECIFIED: {RS.RUN_STATE_PENDING},
    RS.RUN_STATE_PENDING: {RS.RUN_STATE_RUNNING, RS.RUN_STATE_CANCELLED, RS.RUN_STATE_FAILED},
    RS.RUN_STATE_RUNNING: RUN_TERMINAL,
}
_STAGE_NEXT = {
    SS.STAGE_STATE_PENDING: {
        SS.STAGE_STATE_RUNNING,
        SS.STAGE_STATE_SKIPPED,
        SS.STAGE_STATE_CANCELLED,
        SS.STAGE_STATE_FAILED,
    },
    SS.STAGE_STATE_RUNNING: {
        SS.STAGE_STATE_SUCCEEDED,
        SS.STAGE_STATE_FAILED,
        SS.STAGE_STATE_CANCELLED,
        SS.STAGE_STATE_PENDING,  # the service lost the job: a new attempt follows
    },
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pipelines (
  pipeline_id TEXT PRIMARY KEY, request_id TEXT UNIQUE, request_hash TEXT NOT NULL DEFAULT '',
  name TEXT NOT NULL, spec TEXT NOT NULL, resolved TEXT NOT NULL, create_time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
  run_id TEXT PRIMARY KEY, pipeline_id TEXT NOT NULL REFERENCES pipelines(pipeline_id),
  request_id TEXT UNIQUE, state INTEGER NOT NULL, error TEXT NOT NULL DEFAULT '',
  result TEXT, cancel_reason TEXT, create_time REAL NOT NULL, start_time REAL, end_time REAL);
CREATE INDEX IF NOT EXISTS runs_by_pipeline ON runs(pipeline_id, create_time);
CREATE INDEX IF NOT EXISTS runs_by_state ON runs(state);
CREATE TABLE IF NOT EXISTS stages (
  run_id TEXT NOT NULL REFERENCES runs(run_id), idx INTEGER NOT NULL, name TEXT NOT NULL,
  kind INTEGER NOT NULL, service TEXT NOT NULL, state INTEGER NOT NULL,
  attempt INTEGER NOT NULL DEFAULT 0, job_id TEXT NOT NULL DEFAULT '', job TEXT, result TEXT,
  cached_from TEXT NOT NULL DEFAULT '', error TEXT NOT NULL DEFAULT '', cache_key TEXT,
  start_time REAL, end_time REAL, PRIMARY KEY (run_id, name));
CREATE INDEX IF NOT EXISTS stages_by_cache_key ON stages(cache_key, state);
CREATE TABLE IF NOT EXISTS attempts (
  run_id TEXT NOT NULL, stage TEXT NOT NULL, attempt INTEGER NOT NULL,
  idempotency_key TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL DEFAULT '', spec TEXT NOT NULL,
  inputs TEXT NOT NULL, last_job_seq INTEGER NOT NULL DEFAULT 0, create_time REAL NOT NULL,
  PRIMARY KEY (run_id, stage, attempt));
CREATE TABLE IF NOT EXISTS run_events (
  run_id TEXT NOT NULL, seq INTEGER NOT NULL, stage TEXT, attempt INTEGER, job_seq INTEGER,
  payload BLOB NOT NULL, PRIMARY KEY (run_id, seq));
CREATE UNIQUE INDEX IF NOT EXISTS run_events_job ON run_events(run_id, stage, attempt, job_seq)
  WHERE job_seq IS NOT NULL;
"""


def idempotency_key(run_id: str, stage: str, attempt: int) -> str:
    return f"runs/{run_id}/stages/{stage}/attempts/{attempt}"


@dataclass(frozen=True)
class Attempt:
    run_id: str
    stage: str
    number: int
    idempotency_key: str
    job_id: str
    spec: dict[str, Any]  # the exact spec sent to the service (JSON, proto field names)
    inputs: dict[str, Any]  # bound inputs: {input: {from_stage, path, sha256}}
    last_job_seq: int


@dataclass(frozen=True)
class CacheHit:
    run_id: str
    stage: str
    result: cpb.Checkpoint

    @property
    def ref(self) -> str:
        return f"runs/{self.run_id}/stages/{self.stage}"


def _ts(t: float | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def _dump(msg: Message | None) -> str | None:
    return None if msg is None else json_format.MessageToJson(msg, preserving_proto_field_name=True)


def _load(raw: str | None, cls: type[Message]) -> Any:
    return json_format.Parse(raw, cls()) if raw else None


def _state(db: sqlite3.Connection, sql: str, *args: Any) -> int:
    row = db.execute(sql, args).fetchone()
    if row is None:
        raise NotFound(f"no such run or stage: {' / '.join(map(str, args))}")
    return row[0]


class _Notifier:
    """Wakes asyncio tails of a run; safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def subscribe(self, run_id: str) -> tuple[asyncio.AbstractEventLoop, asyncio.Event]:
        w = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.setdefault(run_id, set()).add(w)
        return w

    def unsubscribe(self, run_id: str, w: tuple[asyncio.AbstractEventLoop, asyncio.Event]) -> None:
        with self._lock:
            self._waiters.get(run_id, set()).discard(w)

    def notify(self, run_id: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(run_id, ()))
        for loop, ev in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(ev.set)


class _Tail:
    """The newest committed events of the most recently active runs, in memory.

    Holds a contiguous run of seqs per run (what this process appended since it started);
    ``after`` answers from memory only when that covers the watcher's position.
    """

    def __init__(self, per_run: int = 1024, runs: int = 64) -> None:
        self._per_run, self._runs = per_run, runs
        self._events: OrderedDict[str, deque[opb.RunEvent]] = OrderedDict()

    def add(self, events: list[opb.RunEvent]) -> None:
        for ev in events:
            q = self._events.get(ev.run_id)
            if q is None or (q and q[-1].seq + 1 != ev.seq):
                q = self._events[ev.run_id] = deque(maxlen=self._per_run)
            q.append(ev)
            self._events.move_to_end(ev.run_id)
        while len(self._events) > self._runs:
            self._events.popitem(last=False)

    def after(self, run_id: str, seq: int) -> list[opb.RunEvent] | None:
        """Events with seq > ``seq`` (maybe none), or None when memory cannot tell."""
        q = self._events.get(run_id)
        if not q or q[0].seq > seq + 1 or q[-1].seq < seq:
            return None
        return [ev for ev in q if ev.seq > seq] if q[-1].seq > seq else []

    def last(self, run_id: str) -> opb.RunEvent | None:
        q = self._events.get(run_id)
        return q[-1] if q else None


def _ends_run(ev: opb.RunEvent) -> bool:
    return ev.WhichOneof("payload") == "run_state_change" and (
        ev.run_state_change.to_state in RUN_TERMINAL
    )


class Store:
    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._notifier = _Notifier()
        self._tail = _Tail()
        self._pending: list[opb.RunEvent] = []  # appended by the open transaction
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=5000"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._pending = []
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._pending = []
                # A failed COMMIT (a full disk) leaves the transaction open: close it, or
                # every later write would fail too.
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
            self._tail.add(self._pending)  # only committed events are ever served
            self._pending = []

    def _one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        with self._lock:
            cur = self._db.execute(sql, args)
            cols = [d[0] for d in cur.description]
            row = cur.fetchone()
        return None if row is None else dict(zip(cols, row, strict=True))

    def _all(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute(sql, args)
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    # ---- pipelines -------------------------------------------------------------------

    def create_pipeline(
        self,
        spec: opb.PipelineSpec,
        resolved: dict[str, Any],
        request_id: str = "",
        request_hash: str = "",
    ) -> tuple[opb.Pipeline, bool]:
        """Store a validated pipeline; the same ``request_id`` returns the existing one."""
        if request_id and (old := self.pipeline_for_request(request_id, request_hash)):
            return old, False
        pid = "pl-" + uuid.uuid4().hex[:16]
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO pipelines VALUES (?,?,?,?,?,?,?)",
                    (pid, request_id or None, request_hash, spec.name, _dump(spec),
                     json.dumps(resolved), time.time()),
                )  # fmt: skip
        except sqlite3.IntegrityError:  # a concurrent create with the same request_id won
            old = self.pipeline_for_request(request_id, request_hash)
            assert old is not None
            return old, False
        return self.get_pipeline(pid), True

    def pipeline_for_request(self, request_id: str, request_hash: str = "") -> opb.Pipeline | None:
        row = self._one("SELECT * FROM pipelines WHERE request_id=?", request_id)
        if row is None:
            return None
        if request_hash and row["request_hash"] and row["request_hash"] != request_hash:
            # As the trainer services answer a reused request_id (JobStore.create).
            raise FailedPrecondition(
                f"request_id {shown(request_id)} was used for a different request "
                f"(pipeline {row['pipeline_id']}); use a new request_id"
            )
        return self._pipeline(row)

    def get_pipeline(self, pipeline_id: str) -> opb.Pipeline:
        row = self._one("SELECT * FROM pipelines WHERE pipeline_id=?", pipeline_id)
        if row is None:
            raise NotFound(f"pipeline {pipeline_id!r} not found")
        return self._pipeline(row)

    def resolved(self, pipeline_id: str) -> dict[str, Any]:
        row = self._one("SELECT resolved FROM pipelines WHERE pipeline_id=?", pipeline_id)
        if row is None:
            raise NotFound(f"pipeline {pipeline_id!r} not found")
        return json.loads(row["resolved"])

    def list_pipelines(self, page_size: int = 0, page_token: str = "") -> tuple[list, str]:
        rows, token = self._page("pipelines", "pipeline_id", page_size, page_token, "", ())
        return [self._pipeline(r) for r in rows], token

    def _pipeline(self, row: dict[str, Any]) -> opb.Pipeline:
        p = opb.Pipeline(pipeline_id=row["pipeline_id"], create_time=_ts(row["create_time"]))
        json_format.Parse(row["spec"], p.spec)
        p.resolved.update(json.loads(row["resolved"]))
        return p

    def _page(
        self, table: str, key: str, size: int, token: str, where: str, args: tuple
    ) -> tuple[list[dict[str, Any]], str]:
        if size < 0:
            raise InvalidArgument.one("page_size", "must be >= 0")
        size = min(size or 50, 500)
        cond, params = where, list(args)
        if token:
            try:
                t, k = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
                tf = float(t)
            except Exception:
                raise InvalidArgument.one("page_token", "is not a token from this list") from None
            cond += (
                " AND " if cond else ""
            ) + f"(create_time < ? OR (create_time = ? AND {key} < ?))"
            params += [tf, tf, k]
        sql = f"SELECT * FROM {table} {'WHERE ' + cond if cond else ''} "
        sql += f"ORDER BY create_time DESC, {key} DESC LIMIT ?"
        rows = self._all(sql, *params, size + 1)
        nxt = ""
        if len(rows) > size:
            rows = rows[:size]
            last = rows[-1]
            nxt = base64.urlsafe_b64encode(f"{last['create_time']!r}|{last[key]}".encode()).decode()
        return rows, nxt

    # ---- runs ------------------------------------------------------------------------

    def create_run(self, pipeline_id: str, request_id: str = "") -> tuple[opb.Run, bool]:
        """A PENDING run with PENDING stages from the pipeline's resolved plan."""
        if request_id and (old := self._one("SELECT * FROM runs WHERE request_id=?", request_id)):
            if old["pipeline_id"] != pipeline_id:
                raise FailedPrecondition(
                    f"request_id {shown(request_id)} was used for a run of pipeline "
                    f"{old['pipeline_id']}; use a new request_id"
                )
            return self.get_run(old["run_id"]), False
        stages = self.resolved(pipeline_id)["stages"]
        rid = "run-" + uuid.uuid4().hex[:16]
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO runs (run_id, pipeline_id, request_id, state, create_time) "
                    "VALUES (?,?,?,?,?)",
                    (rid, pipeline_id, request_id or None, RS.RUN_STATE_PENDING, time.time()),
                )
                for i, s in enumerate(stages):
                    info = BY_NAME[s["kind"]]
                    db.execute(
                        "INSERT INTO stages (run_id, idx, name, kind, service, state) "
                        "VALUES (?,?,?,?,?,?)",
                        (rid, i, s["name"], info.kind, info.service, SS.STAGE_STATE_PENDING),
                    )
                change = opb.RunStateChange(to_state=RS.RUN_STATE_PENDING, reason="created")
                self._append(db, rid, opb.RunEvent(run_state_change=change))
        except sqlite3.IntegrityError:
            return self.create_run(pipeline_id, request_id)
        self._notifier.notify(rid)
        return self.get_run(rid), True

    def run_for_request(self, request_id: str) -> opb.Run | None:
        row = self._one("SELECT run_id FROM runs WHERE request_id=?", request_id)
        return None if row is None else self.get_run(row["run_id"])

    def get_run(self, run_id: str) -> opb.Run:
        row = self._one("SELECT * FROM runs WHERE run_id=?", run_id)
        if row is None:
            raise NotFound(f"run {run_id!r} not found")
        return self._run(row)

    def list_runs(self, pipeline_id: str = "", page_size: int = 0, page_token: str = ""):
        where, args = ("pipeline_id = ?", (pipeline_id,)) if pipeline_id else ("", ())
        rows, token = self._page("runs", "run_id", page_size, page_token, where, args)
        return [self._run(r) for r in rows], token

    def unfinished_runs(self) -> list[str]:
        rows = self._all(
            "SELECT run_id FROM runs WHERE state IN (?,?) ORDER BY create_time",
            RS.RUN_STATE_PENDING,
            RS.RUN_STATE_RUNNING,
        )
        return [r["run_id"] for r in rows]

    def _run(self, row: dict[str, Any]) -> opb.Run:
        run = opb.Run(
            run_id=row["run_id"],
            pipeline_id=row["pipeline_id"],
            state=row["state"],
            error=row["error"],
            create_time=_ts(row["create_time"]),
            start_time=_ts(row["start_time"]),
            end_time=_ts(row["end_time"]),
            result=_load(row["result"], cpb.Checkpoint),
        )
        for s in self._all("SELECT * FROM stages WHERE run_id=? ORDER BY idx", row["run_id"]):
            run.stages.add(
                name=s["name"],
                kind=s["kind"],
                state=s["state"],
                attempt=s["attempt"],
                service=s["service"],
                job_id=s["job_id"],
                job=_load(s["job"], cpb.Job),
                result=_load(s["result"], cpb.Checkpoint),
                cached_from=s["cached_from"],
                error=s["error"],
                start_time=_ts(s["start_time"]),
                end_time=_ts(s["end_time"]),
            )
        return run

    def set_run_state(
        self, run_id: str, to: int, reason: str, *, error: str = "", result=None
    ) -> opb.RunEvent:
        now = time.time()
        with self._tx() as db:
            frm = _state(db, "SELECT state FROM runs WHERE run_id=?", run_id)
            if to not in _RUN_NEXT.get(frm, ()):
                raise FailedPrecondition(
                    f"run {run_id} cannot go from {RS.Name(frm)} to {RS.Name(to)}"
                )
            db.execute(
                "UPDATE runs SET state=?, error=?, result=COALESCE(?, result), "
                "start_time=CASE WHEN ?=? THEN ? ELSE start_time END, "
                "end_time=CASE WHEN ? THEN ? ELSE end_time END WHERE run_id=?",
                (to, error, _dump(result), to, RS.RUN_STATE_RUNNING, now,
                 to in RUN_TERMINAL, now, run_id),
            )  # fmt: skip
            if to == RS.RUN_STATE_CANCELLED:
                # Stages that never started will never run: they end CANCELLED with the run
                # (in the same transaction, before the run's terminal event).
                rows = db.execute(
                    "SELECT name FROM stages WHERE run_id=? AND state=? ORDER BY idx",
                    (run_id, SS.STAGE_STATE_PENDING),
                ).fetchall()
                for (name,) in rows:
                    self._stage_change(
                        db, run_id, name, SS.STAGE_STATE_PENDING, SS.STAGE_STATE_CANCELLED,
                        f"not started: {reason or 'the run was cancelled'}",
                    )  # fmt: skip
            change = opb.RunStateChange(from_state=frm, to_state=to, reason=reason)
            ev = self._append(db, run_id, opb.RunEvent(run_state_change=change))
        self._notifier.notify(run_id)
        return ev

    def request_cancel(self, run_id: str, reason: str) -> None:
        """Durably note a cancel request, so a restarted scheduler finishes it."""
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET cancel_reason=COALESCE(cancel_reason, ?) WHERE run_id=?",
                (reason, run_id),
            )

    def cancel_reason(self, run_id: str) -> str | None:
        row = self._one("SELECT cancel_reason FROM runs WHERE run_id=?", run_id)
        return None if row is None else row["cancel_reason"]

    # ---- stages and attempts -----------------------------------------------------------

    def begin_attempt(
        self, run_id: str, stage: str, *, spec: dict, inputs: dict, cache_key: str = "",
        restart_reason: str = "",
    ) -> Attempt:  # fmt: skip
        """Record the next attempt and the exact spec it will send, before it is sent.

        With ``restart_reason`` the RUNNING stage goes back to PENDING in the same
        transaction (its job was lost), so a crash never leaves a stage without an attempt.
        """
        with self._tx() as db:
            (n, state) = db.execute(
                "SELECT attempt, state FROM stages WHERE run_id=? AND name=?", (run_id, stage)
            ).fetchone()
            if restart_reason:
                self._stage_change(db, run_id, stage, state, SS.STAGE_STATE_PENDING, restart_reason)
            key = idempotency_key(run_id, stage, n + 1)
            db.execute(
                "INSERT INTO attempts (run_id, stage, attempt, idempotency_key, spec, inputs, "
                "create_time) VALUES (?,?,?,?,?,?,?)",
                (run_id, stage, n + 1, key, json.dumps(spec), json.dumps(inputs), time.time()),
            )
            db.execute(
                "UPDATE stages SET attempt=?, cache_key=COALESCE(NULLIF(?, ''), cache_key) "
                "WHERE run_id=? AND name=?",
                (n + 1, cache_key, run_id, stage),
            )
        if restart_reason:
            self._notifier.notify(run_id)
        return self.attempt(run_id, stage, n + 1)

    def attempt(self, run_id: str, stage: str, number: int) -> Attempt:
        row = self._one(
            "SELECT * FROM attempts WHERE run_id=? AND stage=? AND attempt=?", run_id, stage, number
        )
        if row is None:
            raise NotFound(f"attempt {number} of stage {stage!r} of run {run_id!r} not found")
        return self._attempt(row)

    def attempts(self, run_id: str, stage: str) -> list[Attempt]:
        rows = self._all(
            "SELECT * FROM attempts WHERE run_id=? AND stage=? ORDER BY attempt", run_id, stage
        )
        return [self._attempt(r) for r in rows]

    def latest_attempt(self, run_id: str, stage: str) -> Attempt | None:
        found = self.attempts(run_id, stage)
        return found[-1] if found else None

    def _attempt(self, r: dict[str, Any]) -> Attempt:
        return Attempt(
            r["run_id"], r["stage"], r["attempt"], r["idempotency_key"], r["job_id"],
            json.loads(r["spec"]), json.loads(r["inputs"]), r["last_job_seq"],
        )  # fmt: skip

    def record_job(self, run_id: str, stage: str, attempt: int, job_id: str, reason: str):
        """The service accepted the attempt: the stage is RUNNING on ``job_id``."""
        with self._tx() as db:
            db.execute(
                "UPDATE attempts SET job_id=? WHERE run_id=? AND stage=? AND attempt=?",
                (job_id, run_id, stage, attempt),
            )
            state = _state(db, "SELECT state FROM stages WHERE run_id=? AND name=?", run_id, stage)
            ev = self._stage_change(
                db, run_id, stage, state, SS.STAGE_STATE_RUNNING, reason, job_id=job_id
            )
        self._notifier.notify(run_id)
        return ev

    def set_stage_state(
        self,
        run_id: str,
        stage: str,
        to: int,
        reason: str,
        *,
        error: str = "",
        result: cpb.Checkpoint | None = None,
        cached_from: str = "",
        cache_key: str = "",
        job: cpb.Job | None = None,
    ) -> opb.RunEvent:
        with self._tx() as db:
            frm = _state(db, "SELECT state FROM stages WHERE run_id=? AND name=?", run_id, stage)
            db.execute(
                "UPDATE stages SET error=?, result=COALESCE(?, result), cached_from=?, "
                "cache_key=COALESCE(NULLIF(?, ''), cache_key), job=COALESCE(?, job) "
                "WHERE run_id=? AND name=?",
                (error, _dump(result), cached_from, cache_key, _dump(job), run_id, stage),
            )
            ev = self._stage_change(db, run_id, stage, frm, to, reason)
        self._notifier.notify(run_id)
        return ev

    def _stage_change(
        self, db, run_id: str, stage: str, frm: int, to: int, reason: str, job_id: str = ""
    ) -> opb.RunEvent:
        if to not in _STAGE_NEXT.get(frm, ()):
            raise FailedPrecondition(
                f"stage {stage!r} of run {run_id} cannot go from {SS.Name(frm)} to {SS.Name(to)}"
            )
        now = time.time()
        done = to not in (SS.STAGE_STATE_PENDING, SS.STAGE_STATE_RUNNING)
        db.execute(
            "UPDATE stages SET state=?, job_id=CASE WHEN ?='' THEN job_id ELSE ? END, "
            "start_time=COALESCE(start_time, CASE WHEN ? THEN ? END), "
            "end_time=CASE WHEN ? THEN ? ELSE NULL END WHERE run_id=? AND name=?",
            (to, job_id, job_id, to == SS.STAGE_STATE_RUNNING, now, done, now, run_id, stage),
        )
        change = opb.StageStateChange(
            stage=stage, from_state=frm, to_state=to, reason=reason, job_id=job_id
        )
        return self._append(db, run_id, opb.RunEvent(stage_state_change=change))

    def relay(
        self, run_id: str, stage: str, attempt: int, event: cpb.JobEvent, job: cpb.Job
    ) -> opb.RunEvent | None:
        """Append a service's job event unless this (stage, attempt, seq) was relayed already."""
        with self._tx() as db:
            (last,) = db.execute(
                "SELECT last_job_seq FROM attempts WHERE run_id=? AND stage=? AND attempt=?",
                (run_id, stage, attempt),
            ).fetchone()
            if event.seq <= last:
                return None
            db.execute(
                "UPDATE attempts SET last_job_seq=? WHERE run_id=? AND stage=? AND attempt=?",
                (event.seq, run_id, stage, attempt),
            )
            db.execute(
                "UPDATE stages SET job=? WHERE run_id=? AND name=?", (_dump(job), run_id, stage)
            )
            ev = opb.RunEvent(job_event=opb.StageJobEvent(stage=stage, event=event))
            ev = self._append(db, run_id, ev, stage=stage, attempt=attempt, job_seq=event.seq)
        self._notifier.notify(run_id)
        return ev

    def find_cached(self, cache_key: str, exclude_run: str = "") -> CacheHit | None:
        row = self._one(
            "SELECT run_id, name, result FROM stages WHERE cache_key=? AND state=? AND run_id<>? "
            "AND result IS NOT NULL ORDER BY end_time DESC LIMIT 1",
            cache_key,
            SS.STAGE_STATE_SUCCEEDED,
            exclude_run,
        )
        if row is None:
            return None
        return CacheHit(row["run_id"], row["name"], _load(row["result"], cpb.Checkpoint))

    # ---- events ----------------------------------------------------------------------

    def _append(self, db, run_id: str, ev: opb.RunEvent, **relay: Any) -> opb.RunEvent:
        (seq,) = db.execute(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM run_events WHERE run_id=?", (run_id,)
        ).fetchone()
        ev.run_id, ev.seq = run_id, seq
        ev.time.GetCurrentTime()
        db.execute(
            "INSERT INTO run_events VALUES (?,?,?,?,?,?)",
            (run_id, seq, relay.get("stage"), relay.get("attempt"), relay.get("job_seq"),
             ev.SerializeToString()),
        )  # fmt: skip
        self._pending.append(ev)
        return ev

    def events(self, run_id: str, after_seq: int = 0, limit: int = 1000) -> list[opb.RunEvent]:
        rows = self._all(
            "SELECT payload FROM run_events WHERE run_id=? AND seq>? ORDER BY seq LIMIT ?",
            run_id,
            after_seq,
            limit,
        )
        return [opb.RunEvent.FromString(r["payload"]) for r in rows]

    async def watch(self, run_id: str, after_seq: int = 0) -> AsyncIterator[opb.RunEvent]:
        """Stored events with seq > after_seq, then live ones; ends after the run ends."""
        self.get_run(run_id)  # NotFound before the first yield
        seq = after_seq
        while True:
            waiter = self._notifier.subscribe(run_id)  # before reading: no lost wake-up
            try:
                with self._lock:  # a consistent view: no transaction commits in between
                    batch = self._tail.after(run_id, seq)
                    if batch is not None:
                        # Nothing is appended after a run's terminal event.
                        last = batch[-1] if batch else self._tail.last(run_id)
                        ended = last is not None and _ends_run(last)
                    else:
                        # Terminal state and its event commit together: read the state first.
                        row = self._one("SELECT state FROM runs WHERE run_id=?", run_id)
                        ended = row is not None and row["state"] in RUN_TERMINAL
                        batch = self.events(run_id, seq)
                        ended = ended and len(batch) < 1000
                for ev in batch:
                    seq = ev.seq
                    yield ev
                if ended:
                    return
                if not batch:
                    await waiter[1].wait()
            finally:
                self._notifier.unsubscribe(run_id, waiter)
