"""How jobs sit in SQLite: the schema, connections and transactions, and the conversions
between rows and records.

The ``jobs`` table holds one row per job, its JSON fields (config, labels, metrics,
checkpoints) as canonical JSON text; ``events`` holds each job's event log, keyed by
(job_id, seq). List pages are addressed by opaque tokens bound to their filters.
store.py runs the queries; this module is what they stand on.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from services.runtime.errors import InvalidArgument, storage_error
from services.runtime.jobs.records import EventRecord, JobRecord, JobState

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "SCHEMA",
    "UPDATABLE",
    "canonical",
    "columns",
    "connect",
    "decode_token",
    "encode_token",
    "event",
    "record",
    "transaction",
]

MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50

# Columns callers may set through transition(**fields), update() and append_event(job_updates).
_JSON_FIELDS = {"metrics", "latest_checkpoint", "result"}
_PLAIN_FIELDS = {
    "step",
    "total_steps",
    "eta_seconds",
    "error",
    "worker_pid",
    "start_time",
    "end_time",
}
UPDATABLE = _JSON_FIELDS | _PLAIN_FIELDS

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    entry TEXT NOT NULL,
    state TEXT NOT NULL,
    request_id TEXT UNIQUE,
    config_json TEXT NOT NULL,
    output_dir TEXT NOT NULL,
    labels_json TEXT NOT NULL DEFAULT '{}',
    create_time REAL NOT NULL,
    start_time REAL,
    end_time REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    metrics_json TEXT NOT NULL DEFAULT '{}',
    latest_checkpoint_json TEXT,
    result_json TEXT,
    error TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_pid INTEGER,
    eta_seconds REAL NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs(job_id),
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    type TEXT NOT NULL CHECK (type IN ('state', 'progress', 'checkpoint', 'log')),
    payload_json TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"""


def connect(db_path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), rows by column name."""
    conn = sqlite3.connect(db_path, timeout=busy_timeout_s, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    # NORMAL is durable across process crashes in WAL mode; only power loss can drop
    # the last commits.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction; storage failures surface as services.runtime.errors."""
    try:
        # IMMEDIATE takes the write lock up front, so read-then-write (seq, state checks)
        # cannot interleave with another writer.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (a full disk) leaves the transaction open; SQLite may also
            # have rolled it back itself already.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        # A full disk or an unreadable database is an answer (RESOURCE_EXHAUSTED /
        # UNAVAILABLE with the reason), not an internal error.
        mapped = storage_error(exc)
        if mapped is None:
            raise
        raise mapped from exc


def canonical(obj: Any) -> str:
    """Stable JSON text: create() tells a retried request from another by comparing it."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _load(raw: str | None) -> Any:
    return None if raw is None else json.loads(raw)


def record(row: sqlite3.Row) -> JobRecord:
    """A ``jobs`` row as a JobRecord (JSON columns decoded, ``_rowid`` of list() dropped)."""
    cols = dict(zip(row.keys(), row, strict=True))
    cols.pop("_rowid", None)
    for name in ("config", "labels", "metrics", "latest_checkpoint", "result"):
        cols[name] = _load(cols.pop(f"{name}_json"))
    cols["state"] = JobState(cols["state"])
    return JobRecord(**cols)


def event(row: sqlite3.Row) -> EventRecord:
    """An ``events`` row as an EventRecord."""
    return EventRecord(
        row["job_id"], row["seq"], row["time"], row["type"], json.loads(row["payload_json"])
    )


def columns(fields: dict[str, Any]) -> dict[str, Any]:
    """Job fields as ``jobs`` columns to SET; TypeError for fields callers may not set."""
    unknown = set(fields) - UPDATABLE
    if unknown:
        raise TypeError(f"not updatable job fields: {sorted(unknown)}")
    out = {}
    for name, value in fields.items():
        if name in _JSON_FIELDS:
            out[f"{name}_json"] = None if value is None else canonical(value)
        else:
            out[name] = value
    return out


def encode_token(rowid: int, filters: str) -> str:
    """A list() page token: where the next page starts, bound to the filters that made it."""
    return base64.urlsafe_b64encode(f"v1:{rowid}:{filters}".encode()).decode().rstrip("=")


def decode_token(token: str, filters: str) -> int:
    """The rowid a page continues below; InvalidArgument for a foreign or forged token."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, rowid, token_filters = raw.split(":")
        if version != "v1" or token_filters != filters:
            raise ValueError(raw)
        return int(rowid)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidArgument.one(
            "page_token", "is not a token returned by an earlier call with the same filters"
        ) from None
