"""The orchestrator's SQLite database: schema, transactions, and the run-event log with
its live tail.

One connection (WAL) shared by the process under a lock; every write is one ``BEGIN
IMMEDIATE`` transaction, and the RunEvents appended in it become visible (to ``follow``
and its in-memory tail) only once it commits. ``follow`` replays stored events then waits
for new ones: an asyncio notification wakes tails in this process, and the newest events
of recently active runs are kept in memory so a caught-up watcher is served without a
database read (many watchers on one run cost one write, not one read each).
store.py holds the queries on top of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlx_unified.v1 import orchestrator_pb2 as opb
from orchestrator.records import RUN_TERMINAL, decode_page_token, encode_page_token
from services.runtime.errors import InvalidArgument

__all__ = ["SCHEMA", "Database"]

SCHEMA = """
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
CREATE TABLE IF NOT EXISTS models (
  name TEXT PRIMARY KEY, next_version INTEGER NOT NULL DEFAULT 1, create_time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS model_versions (
  name TEXT NOT NULL REFERENCES models(name), version INTEGER NOT NULL,
  checkpoint TEXT NOT NULL, path TEXT NOT NULL, base_model TEXT NOT NULL DEFAULT '',
  lineage TEXT, description TEXT NOT NULL DEFAULT '', create_time REAL NOT NULL,
  PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS model_aliases (
  name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL,
  PRIMARY KEY (name, alias));
"""


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


class Database:
    """The connection, its transactions and the run-event log (thread-safe)."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._notifier = _Notifier()
        self._tail = _Tail()
        self._pending: list[opb.RunEvent] = []  # appended by the open transaction
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=5000"):
            self._conn.execute(f"PRAGMA {pragma}")
        self._conn.executescript(SCHEMA)

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._pending = []
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._pending = []
                # A failed COMMIT (a full disk) leaves the transaction open: close it, or
                # every later write would fail too.
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise
            self._tail.add(self._pending)  # only committed events are ever served
            self._pending = []

    def one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        with self._lock:
            cur = self._conn.execute(sql, args)
            cols = [d[0] for d in cur.description]
            row = cur.fetchone()
        return None if row is None else dict(zip(cols, row, strict=True))

    def all(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._conn.execute(sql, args)
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def page(
        self, table: str, key: str, size: int, token: str, where: str, args: tuple
    ) -> tuple[list[dict[str, Any]], str]:
        """One page of ``table``, newest first by (create_time, ``key``), filtered by ``where``;
        returns (rows, next_page_token), the token empty on the last page."""
        if size < 0:
            raise InvalidArgument.one("page_size", "must be >= 0")
        size = min(size or 50, 500)
        cond, params = where, list(args)
        if token:
            tf, k = decode_page_token(token)
            cond += (
                " AND " if cond else ""
            ) + f"(create_time < ? OR (create_time = ? AND {key} < ?))"
            params += [tf, tf, k]
        sql = f"SELECT * FROM {table} {'WHERE ' + cond if cond else ''} "
        sql += f"ORDER BY create_time DESC, {key} DESC LIMIT ?"
        rows = self.all(sql, *params, size + 1)
        nxt = ""
        if len(rows) > size:
            rows = rows[:size]
            last = rows[-1]
            nxt = encode_page_token(last["create_time"], last[key])
        return rows, nxt

    def notify(self, run_id: str) -> None:
        """Wake the run's watchers (after the transaction that changed it committed)."""
        self._notifier.notify(run_id)

    def append(self, db, run_id: str, ev: opb.RunEvent, **relay: Any) -> opb.RunEvent:
        """Give ``ev`` the run's next seq and store it, inside the open transaction ``db``.

        ``relay`` (stage, attempt, job_seq) marks a relayed job event; a unique index on
        those columns backs up the store's check that none is relayed twice."""
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
        rows = self.all(
            "SELECT payload FROM run_events WHERE run_id=? AND seq>? ORDER BY seq LIMIT ?",
            run_id,
            after_seq,
            limit,
        )
        return [opb.RunEvent.FromString(r["payload"]) for r in rows]

    async def follow(self, run_id: str, after_seq: int = 0) -> AsyncIterator[opb.RunEvent]:
        """Stored events with seq > after_seq, then live ones; ends after the run ends."""
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
                        row = self.one("SELECT state FROM runs WHERE run_id=?", run_id)
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
