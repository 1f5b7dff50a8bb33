"""The orchestrator's vocabulary: run and stage state machines, attempts, cache hits, and
the conversions between stored rows and the proto messages the API returns.

The store (store.py) and the scheduler speak in these; ``*_from_row(s)`` turn the rows of
database.py's tables into ``opb`` messages, and ``dump`` / ``load`` store proto-valued
columns as JSON with proto field names.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from services.runtime.errors import InvalidArgument

__all__ = [
    "RS",
    "RUN_NEXT",
    "RUN_TERMINAL",
    "SS",
    "STAGE_DONE",
    "STAGE_NEXT",
    "Attempt",
    "CacheHit",
    "attempt_from_row",
    "decode_page_token",
    "dump",
    "encode_page_token",
    "idempotency_key",
    "load",
    "pipeline_from_row",
    "run_from_rows",
    "ts",
]

RS, SS = opb.RunState, opb.StageState
RUN_TERMINAL = {RS.RUN_STATE_SUCCEEDED, RS.RUN_STATE_FAILED, RS.RUN_STATE_CANCELLED}
STAGE_DONE = {SS.STAGE_STATE_SUCCEEDED, SS.STAGE_STATE_SKIPPED}
RUN_NEXT = {
    RS.RUN_STATE_UNSPECIFIED: {RS.RUN_STATE_PENDING},
    RS.RUN_STATE_PENDING: {RS.RUN_STATE_RUNNING, RS.RUN_STATE_CANCELLED, RS.RUN_STATE_FAILED},
    RS.RUN_STATE_RUNNING: RUN_TERMINAL,
}
STAGE_NEXT = {
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


def ts(t: float | None) -> Timestamp | None:
    if t is None:
        return None
    out = Timestamp()
    out.FromNanoseconds(int(t * 1e9))
    return out


def dump(msg: Message | None) -> str | None:
    return None if msg is None else json_format.MessageToJson(msg, preserving_proto_field_name=True)


def load(raw: str | None, cls: type[Message]) -> Any:
    return json_format.Parse(raw, cls()) if raw else None


def pipeline_from_row(row: dict[str, Any]) -> opb.Pipeline:
    p = opb.Pipeline(pipeline_id=row["pipeline_id"], create_time=ts(row["create_time"]))
    json_format.Parse(row["spec"], p.spec)
    p.resolved.update(json.loads(row["resolved"]))
    return p


def run_from_rows(row: dict[str, Any], stages: list[dict[str, Any]]) -> opb.Run:
    """A ``runs`` row and its ``stages`` rows (in plan order) as one Run message."""
    run = opb.Run(
        run_id=row["run_id"],
        pipeline_id=row["pipeline_id"],
        state=row["state"],
        error=row["error"],
        create_time=ts(row["create_time"]),
        start_time=ts(row["start_time"]),
        end_time=ts(row["end_time"]),
        result=load(row["result"], cpb.Checkpoint),
    )
    for s in stages:
        run.stages.add(
            name=s["name"],
            kind=s["kind"],
            state=s["state"],
            attempt=s["attempt"],
            service=s["service"],
            job_id=s["job_id"],
            job=load(s["job"], cpb.Job),
            result=load(s["result"], cpb.Checkpoint),
            cached_from=s["cached_from"],
            error=s["error"],
            start_time=ts(s["start_time"]),
            end_time=ts(s["end_time"]),
        )
    return run


def attempt_from_row(r: dict[str, Any]) -> Attempt:
    return Attempt(
        r["run_id"], r["stage"], r["attempt"], r["idempotency_key"], r["job_id"],
        json.loads(r["spec"]), json.loads(r["inputs"]), r["last_job_seq"],
    )  # fmt: skip


def encode_page_token(create_time: float, key: str) -> str:
    """Where the next page starts: lists run newest first by (create_time, id)."""
    return base64.urlsafe_b64encode(f"{create_time!r}|{key}".encode()).decode()


def decode_page_token(token: str) -> tuple[float, str]:
    try:
        t, k = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        return float(t), k
    except Exception:
        raise InvalidArgument.one("page_token", "is not a token from this list") from None
