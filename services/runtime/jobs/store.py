"""Durable job state: one SQLite database (WAL) per service, shared with its worker processes.

Every state change and every event is one ``BEGIN IMMEDIATE`` transaction, so the service
process and any number of workers can write concurrently: SQLite serialises the writers and
``busy_timeout`` makes them wait instead of failing. Event ``seq`` numbers are contiguous per
job (``jobs.last_seq + 1`` inside the write transaction), and no event is appended after the
terminal state event, so a reader that has seen a terminal job and every ``seq <= last_seq``
has seen everything (see ``follow``).

This module is the queries; the schema, connections and row conversions are in db.py and
the states and records in records.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from services.runtime.jobs import db
from services.runtime.jobs.db import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from services.runtime.jobs.records import (
    EVENT_TYPES,
    TERMINAL,
    TRANSITIONS,
    EventRecord,
    JobRecord,
    JobState,
    new_job_id,
)

# The job model lives in records.py and the SQLite side in db.py; callers import the model
# from here as well.
__all__ = [
    "DEFAULT_PAGE_SIZE",
    "EVENT_TYPES",
    "MAX_PAGE_SIZE",
    "TERMINAL",
    "TRANSITIONS",
    "EventRecord",
    "JobRecord",
    "JobState",
    "JobStore",
    "follow",
    "new_job_id",
]


class JobStore:
    """Jobs and their events. Safe to share across threads (one connection per thread) and
    processes (each opens its own ``JobStore`` on the same path)."""

    def __init__(self, db_path: Path, *, busy_timeout_s: float = 30.0) -> None:
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        conn = self._conn()
        # WAL is a property of the file: set once, every later connection inherits it.
        conn.execute("PRAGMA journal_mode=WAL")
        # executescript() would COMMIT first: run the statements inside our own transaction.
        with self._tx() as tx:
            for stmt in filter(str.strip, db.SCHEMA.split(";")):
                tx.execute(stmt)

    # -- connections and transactions -------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        cached = getattr(self._local, "conn", None)
        # A connection must never cross a fork: reopen in the child.
        if cached is not None and cached[0] == os.getpid():
            return cached[1]
        conn = db.connect(self.db_path, self._busy_timeout_s)
        self._local.conn = (os.getpid(), conn)
        return conn

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return db.transaction(self._conn())

    def close(self) -> None:
        """Close this thread's connection (others close when their thread's store is dropped)."""
        cached = getattr(self._local, "conn", None)
        if cached is not None:
            cached[1].close()
            self._local.conn = None

    # -- jobs --------------------------------------------------------------------------------

    def create(
        self,
        kind: str,
        entry: str,
        config: dict[str, Any],
        output_dir: str,
        request_id: str | None = None,
        labels: dict[str, str] | None = None,
        *,
        job_id: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Create a PENDING job, or return the job an earlier call with ``request_id`` made.

        ``job_id`` may be chosen by the caller (``new_job_id()``) when ``output_dir`` must
        contain it; on an idempotent retry that id is simply unused.
        """
        if ":" not in entry:
            raise ValueError(f"entry must be 'module:function', got {entry!r}")
        request_id = request_id or None
        config_json = db.canonical(config)
        now = time.time()
        with self._tx() as tx:
            if request_id is not None:
                row = tx.execute(
                    "SELECT * FROM jobs WHERE request_id = ?", (request_id,)
                ).fetchone()
                if row is not None:
                    if row["kind"] != kind or row["config_json"] != config_json:
                        raise FailedPrecondition(
                            f"request_id {request_id!r} was used for a different request "
                            f"(job {row['job_id']}); use a new request_id"
                        )
                    return db.record(row), False
            job_id = job_id or new_job_id()
            tx.execute(
                "INSERT INTO jobs (job_id, kind, entry, state, request_id, config_json,"
                " output_dir, labels_json, create_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    kind,
                    entry,
                    JobState.PENDING.value,
                    request_id,
                    config_json,
                    str(output_dir),
                    db.canonical(labels or {}),
                    now,
                ),
            )
            payload = {"from": None, "to": JobState.PENDING.value, "reason": "created"}
            self._insert_event(tx, job_id, 0, "state", payload, now)
            return db.record(self._row(tx, job_id)), True

    def get(self, job_id: str) -> JobRecord:
        return db.record(self._row(self._conn(), job_id))

    def by_output_dir(self, output_dir: str) -> list[JobRecord]:
        """Jobs that wrote (or write) into ``output_dir``, newest first."""
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM jobs WHERE output_dir = ? ORDER BY create_time DESC",
                (str(output_dir),),
            )
            .fetchall()
        )
        return [db.record(r) for r in rows]

    def by_request_id(self, request_id: str) -> JobRecord | None:
        """The job an earlier create() with this request_id made, if any."""
        if not request_id:
            return None
        row = (
            self._conn()
            .execute("SELECT * FROM jobs WHERE request_id = ?", (request_id,))
            .fetchone()
        )
        return None if row is None else db.record(row)

    def list(
        self,
        states: Iterable[str] = (),
        kind: str = "",
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> tuple[list[JobRecord], str]:
        """Jobs newest first; returns (page, next_page_token), the token empty on the last page."""
        try:
            states = sorted({JobState(s).value for s in states})
        except ValueError as exc:
            raise InvalidArgument.one("states", f"unknown job state: {exc}") from None
        if page_size < 0:
            raise InvalidArgument.one("page_size", "must be >= 0")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        # The token is bound to the filters: reusing it with other filters would skip jobs.
        filters = hashlib.sha256(db.canonical([states, kind]).encode()).hexdigest()[:12]
        where, args = [], []
        if page_token:
            where.append("rowid < ?")
            args.append(db.decode_token(page_token, filters))
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        if kind:
            where.append("kind = ?")
            args.append(kind)
        sql = "SELECT rowid AS _rowid, * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY rowid DESC LIMIT ?"
        rows = self._conn().execute(sql, (*args, size + 1)).fetchall()
        token = db.encode_token(rows[size - 1]["_rowid"], filters) if len(rows) > size else ""
        return [db.record(r) for r in rows[:size]], token

    def job_ids(self, states: Iterable[str]) -> list[str]:
        """Ids of jobs in ``states``, oldest first (the runner's recovery order)."""
        states = [JobState(s).value for s in states]
        rows = self._conn().execute(
            f"SELECT job_id FROM jobs WHERE state IN ({','.join('?' * len(states))})"
            " ORDER BY rowid",
            states,
        )
        return [r["job_id"] for r in rows]

    def transition(
        self,
        job_id: str,
        to_state: str,
        reason: str = "",
        expect: Iterable[str] | None = None,
        **fields: Any,
    ) -> JobRecord | None:
        """Move a job to ``to_state`` and append its state event, in one transaction.

        With ``expect``, the change happens only if the current state is one of them, and
        None is returned otherwise (e.g. a worker's RUNNING->SUCCEEDED after a concurrent
        cancel). A change TRANSITIONS does not allow raises FailedPrecondition.
        Bookkeeping: entering RUNNING counts an attempt and sets start_time (first start);
        entering a terminal state sets end_time; FAILED/CANCELLED set error = reason unless
        given; leaving RUNNING clears worker_pid.
        """
        to = JobState(to_state)
        allowed = None if expect is None else {JobState(s) for s in expect}
        now = time.time()
        with self._tx() as tx:
            row = self._row(tx, job_id)
            current = JobState(row["state"])
            if allowed is not None and current not in allowed:
                return None
            if to not in TRANSITIONS[current]:
                raise FailedPrecondition(
                    f"job {job_id} is {current.value}; it cannot become {to.value}"
                )
            cols = db.columns(fields)
            cols["state"] = to.value
            if to is JobState.RUNNING:
                cols["attempts"] = row["attempts"] + 1
                if row["start_time"] is None:
                    cols.setdefault("start_time", now)
            elif current is JobState.RUNNING:
                cols.setdefault("worker_pid", None)
            if to in TERMINAL:
                cols.setdefault("end_time", now)
                cols["eta_seconds"] = 0.0
            if to in (JobState.FAILED, JobState.CANCELLED):
                cols.setdefault("error", reason)
            self._update(tx, job_id, cols)
            payload = {"from": current.value, "to": to.value, "reason": reason}
            self._insert_event(tx, job_id, row["last_seq"], "state", payload, now)
            return db.record(self._row(tx, job_id))

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Set job fields without a state change or event (e.g. the worker's pid)."""
        with self._tx() as tx:
            self._row(tx, job_id)
            self._update(tx, job_id, db.columns(fields))
            return db.record(self._row(tx, job_id))

    # -- events ------------------------------------------------------------------------------

    def append_event(
        self,
        job_id: str,
        type: str,
        payload: dict[str, Any],
        job_updates: dict[str, Any] | None = None,
    ) -> int | None:
        """Append one event (and update job fields with it); returns its seq.

        Returns None without writing when the job is already terminal: its terminal state
        event stays the last one (a cancelled worker may still report while it stops).
        State events are written by transition() only.
        """
        if type not in EVENT_TYPES or type == "state":
            raise ValueError(f"event type must be progress, checkpoint or log, got {type!r}")
        with self._tx() as tx:
            row = self._row(tx, job_id)
            if JobState(row["state"]) in TERMINAL:
                return None
            if job_updates:
                self._update(tx, job_id, db.columns(job_updates))
            return self._insert_event(tx, job_id, row["last_seq"], type, payload, time.time())

    def events(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[EventRecord]:
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, after_seq, limit),
            )
            .fetchall()
        )
        if not rows:
            self.get(job_id)  # NotFound for an unknown job rather than an empty list
        return [db.event(r) for r in rows]

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _row(conn: sqlite3.Connection, job_id: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id!r} not found")
        return row

    @staticmethod
    def _update(conn: sqlite3.Connection, job_id: str, cols: dict[str, Any]) -> None:
        if cols:
            sets = ", ".join(f"{c} = ?" for c in cols)
            conn.execute(f"UPDATE jobs SET {sets} WHERE job_id = ?", (*cols.values(), job_id))

    @staticmethod
    def _insert_event(
        conn: sqlite3.Connection,
        job_id: str,
        last_seq: int,
        type: str,
        payload: dict[str, Any],
        now: float,
    ) -> int:
        seq = last_seq + 1
        conn.execute(
            "INSERT INTO events (job_id, seq, time, type, payload_json) VALUES (?, ?, ?, ?, ?)",
            (job_id, seq, now, type, json.dumps(payload)),
        )
        conn.execute("UPDATE jobs SET last_seq = ? WHERE job_id = ?", (seq, job_id))
        return seq


async def follow(
    store: JobStore, job_id: str, after_seq: int = 0, *, poll_s: float = 0.25, batch: int = 500
) -> AsyncIterator[tuple[EventRecord, JobRecord]]:
    """Replay events with seq > after_seq, then tail new ones until the job is terminal.

    Yields (event, job) where job is a snapshot read after the event was stored (current
    state, step, metrics). Workers write from other processes, so new events are found by
    polling ``jobs.last_seq`` (one indexed row read per ``poll_s`` while idle). Raises
    NotFound for an unknown job. Stopping the iteration never affects the job.
    """
    cursor = max(after_seq, 0)

    def read(cursor: int) -> tuple[JobRecord, list[EventRecord]]:
        # One thread hop per poll: each hop is a wake-up that waits for a CPU when busy.
        job = store.get(job_id)
        if job.last_seq <= cursor:
            return job, []
        evs = store.events(job_id, cursor, batch)
        return store.get(job_id), evs

    while True:
        job, evs = await asyncio.to_thread(read, cursor)
        if evs:
            for ev in evs:
                yield ev, job
                cursor = ev.seq
            continue
        # Terminal and nothing after cursor: the terminal state event was the last one.
        if job.terminal:
            return
        await asyncio.sleep(poll_s)
