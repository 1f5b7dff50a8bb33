"""Durable orchestrator state: pipelines, runs, stages and attempts (SQLite, WAL).

Every state change and the RunEvent that reports it are written in one transaction; run
events carry a contiguous ``seq`` from 1 per run. Relayed job events are deduplicated by
(stage, attempt, job seq), so re-watching a service after a reconnect never repeats one.
``watch`` replays stored events then tails new ones. Create-pipeline and run are
idempotent on ``request_id``.

This module is the queries. The schema, transactions and the event log with its in-memory
tail are in database.py; the state machines, records and row conversions in records.py.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from orchestrator.database import Database
from orchestrator.pipeline import BY_NAME
from orchestrator.records import (
    RS,
    RUN_NEXT,
    RUN_TERMINAL,
    SS,
    STAGE_DONE,
    STAGE_NEXT,
    Attempt,
    CacheHit,
    attempt_from_row,
    dump,
    idempotency_key,
    load,
    pipeline_from_row,
    run_from_rows,
)
from services.runtime.errors import FailedPrecondition, NotFound, shown

# The records and state tables live in records.py; callers import them from here as well.
__all__ = [
    "RUN_TERMINAL",
    "STAGE_DONE",
    "Attempt",
    "CacheHit",
    "Store",
    "idempotency_key",
]


def _state(db: sqlite3.Connection, sql: str, *args: Any) -> int:
    row = db.execute(sql, args).fetchone()
    if row is None:
        raise NotFound(f"no such run or stage: {' / '.join(map(str, args))}")
    return row[0]


class Store:
    """Pipelines, runs, stages and attempts; every change and its RunEvent in one transaction."""

    def __init__(self, path: str | Path) -> None:
        self.db = self._db = db = Database(path)  # the model registry shares it
        # The queries below use these four; tests and tools read through ``_one`` too.
        self._tx, self._one, self._all, self._append = db.tx, db.one, db.all, db.append

    def close(self) -> None:
        self._db.close()

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
                    (pid, request_id or None, request_hash, spec.name, dump(spec),
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
        return pipeline_from_row(row)

    def get_pipeline(self, pipeline_id: str) -> opb.Pipeline:
        row = self._one("SELECT * FROM pipelines WHERE pipeline_id=?", pipeline_id)
        if row is None:
            raise NotFound(f"pipeline {pipeline_id!r} not found")
        return pipeline_from_row(row)

    def resolved(self, pipeline_id: str) -> dict[str, Any]:
        row = self._one("SELECT resolved FROM pipelines WHERE pipeline_id=?", pipeline_id)
        if row is None:
            raise NotFound(f"pipeline {pipeline_id!r} not found")
        return json.loads(row["resolved"])

    def list_pipelines(self, page_size: int = 0, page_token: str = "") -> tuple[list, str]:
        rows, token = self._db.page("pipelines", "pipeline_id", page_size, page_token, "", ())
        return [pipeline_from_row(r) for r in rows], token

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
        self._db.notify(rid)
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
        rows, token = self._db.page("runs", "run_id", page_size, page_token, where, args)
        return [self._run(r) for r in rows], token

    def unfinished_runs(self) -> list[str]:
        rows = self._all(
            "SELECT run_id FROM runs WHERE state IN (?,?) ORDER BY create_time",
            RS.RUN_STATE_PENDING,
            RS.RUN_STATE_RUNNING,
        )
        return [r["run_id"] for r in rows]

    def _run(self, row: dict[str, Any]) -> opb.Run:
        stages = self._all("SELECT * FROM stages WHERE run_id=? ORDER BY idx", row["run_id"])
        return run_from_rows(row, stages)

    def set_run_state(
        self, run_id: str, to: int, reason: str, *, error: str = "", result=None, also=None
    ) -> opb.RunEvent:
        """``also(db)``, when given, writes in the same transaction (register_as)."""
        now = time.time()
        with self._tx() as db:
            frm = _state(db, "SELECT state FROM runs WHERE run_id=?", run_id)
            if to not in RUN_NEXT.get(frm, ()):
                raise FailedPrecondition(
                    f"run {run_id} cannot go from {RS.Name(frm)} to {RS.Name(to)}"
                )
            db.execute(
                "UPDATE runs SET state=?, error=?, result=COALESCE(?, result), "
                "start_time=CASE WHEN ?=? THEN ? ELSE start_time END, "
                "end_time=CASE WHEN ? THEN ? ELSE end_time END WHERE run_id=?",
                (to, error, dump(result), to, RS.RUN_STATE_RUNNING, now,
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
            if also is not None:
                also(db)
            change = opb.RunStateChange(from_state=frm, to_state=to, reason=reason)
            ev = self._append(db, run_id, opb.RunEvent(run_state_change=change))
        self._db.notify(run_id)
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
            self._db.notify(run_id)
        return self.attempt(run_id, stage, n + 1)

    def attempt(self, run_id: str, stage: str, number: int) -> Attempt:
        row = self._one(
            "SELECT * FROM attempts WHERE run_id=? AND stage=? AND attempt=?", run_id, stage, number
        )
        if row is None:
            raise NotFound(f"attempt {number} of stage {stage!r} of run {run_id!r} not found")
        return attempt_from_row(row)

    def attempts(self, run_id: str, stage: str) -> list[Attempt]:
        rows = self._all(
            "SELECT * FROM attempts WHERE run_id=? AND stage=? ORDER BY attempt", run_id, stage
        )
        return [attempt_from_row(r) for r in rows]

    def latest_attempt(self, run_id: str, stage: str) -> Attempt | None:
        found = self.attempts(run_id, stage)
        return found[-1] if found else None

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
        self._db.notify(run_id)
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
                (error, dump(result), cached_from, cache_key, dump(job), run_id, stage),
            )
            ev = self._stage_change(db, run_id, stage, frm, to, reason)
        self._db.notify(run_id)
        return ev

    def _stage_change(
        self, db, run_id: str, stage: str, frm: int, to: int, reason: str, job_id: str = ""
    ) -> opb.RunEvent:
        if to not in STAGE_NEXT.get(frm, ()):
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
                "UPDATE stages SET job=? WHERE run_id=? AND name=?", (dump(job), run_id, stage)
            )
            ev = opb.RunEvent(job_event=opb.StageJobEvent(stage=stage, event=event))
            ev = self._append(db, run_id, ev, stage=stage, attempt=attempt, job_seq=event.seq)
        self._db.notify(run_id)
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
        return CacheHit(row["run_id"], row["name"], load(row["result"], cpb.Checkpoint))

    # ---- events ----------------------------------------------------------------------

    def events(self, run_id: str, after_seq: int = 0, limit: int = 1000) -> list[opb.RunEvent]:
        return self._db.events(run_id, after_seq, limit)

    async def watch(self, run_id: str, after_seq: int = 0) -> AsyncIterator[opb.RunEvent]:
        """Stored events with seq > after_seq, then live ones; ends after the run ends."""
        self.get_run(run_id)  # NotFound before the first yield
        async with contextlib.aclosing(self._db.follow(run_id, after_seq)) as events:
            async for ev in events:
                yield ev
