"""What the job runner (in the service) and its workers (one process per job) agree on.

The two sides never call each other: the runner starts ``python -m WORKER_MODULE``, reads
its exit code and files, and both read and write the job database. This module is that
contract, in one place:

- exit codes: ``EXIT_OK`` (finished, or the job was no longer RUNNING), ``EXIT_FAILED`` (the
  trainer failed; the worker recorded FAILED), ``EXIT_INTERRUPTED`` (stopped after a
  checkpoint: requeue); 2 is argparse's bad command line;
- environment: ``JOB_SPEC_ENV`` carries a data-parallel job's ``JobSpec`` to every rank,
  ``DISTRIBUTED_ENV=1`` marks ranks started through mlx.launch, ``LOCAL_RANKS_ENV`` says how
  many ranks share this host (each pins its own cores);
- files under the job's output dir: ``WORKER_LOG`` (the worker's stdout and stderr),
  ``checkpoints/step_N/`` (complete once ``MANIFEST`` is in it) and
  ``RANKS_DIR/rank-<r>.json``, each rank's status.

A rank status is one JSON object, rewritten atomically: ``rank``, ``attempt``, ``pid``,
``host``, ``time``, ``state`` ("running" or "exited") and, once exited, ``code`` (an exit
code above), ``kind`` ("ok", "interrupted", "error" or "peer_lost") and ``reason``.
mlx.launch exits 0 whatever its ranks did, so these files are how the runner tells a
finished group from a rank that died or raised.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

__all__ = [
    "DISTRIBUTED_ENV",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "JOB_SPEC_ENV",
    "LOCAL_RANKS_ENV",
    "MANIFEST",
    "RANKS_DIR",
    "WORKER_LOG",
    "WORKER_MODULE",
    "JobSpec",
    "latest_complete_checkpoint",
    "rank_status_path",
    "read_rank_statuses",
    "write_rank_status",
]

WORKER_MODULE = "services.runtime.jobs.worker"
WORKER_LOG = "worker.log"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: try again later, from the checkpoint

JOB_SPEC_ENV = "MLXU_JOB_SPEC"
DISTRIBUTED_ENV = "MLXU_DISTRIBUTED"
LOCAL_RANKS_ENV = "MLXU_LOCAL_RANKS"

MANIFEST = "manifest.json"
RANKS_DIR = "ranks"
_STEP_DIR = re.compile(r"step_(\d+)$")

log = structlog.get_logger()


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """Newest dir under output_dir/checkpoints holding a manifest.json.

    The manifest is written last, so a dir without one is an interrupted save. Hidden and
    ``*.tmp`` dirs are in-progress atomic saves (temp dir + rename) and never count.
    """
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [
        d
        for d in root.iterdir()
        if d.is_dir()
        and not d.name.startswith(".")
        and not d.name.endswith(".tmp")
        and (d / MANIFEST).is_file()
    ]

    def order(d: Path) -> tuple[int, float]:
        m = _STEP_DIR.search(d.name)
        return (int(m.group(1)) if m else -1, d.stat().st_mtime)

    return max(done, key=order, default=None)


@dataclass(frozen=True)
class JobSpec:
    """What every rank of a job needs to run it, without the job database."""

    job_id: str
    entry: str
    config: dict
    output_dir: str
    attempts: int
    resume_from: str | None

    @classmethod
    def of(cls, job: Any, resume_from: Path | None) -> JobSpec:
        path = str(resume_from) if resume_from is not None else None
        return cls(job.job_id, job.entry, job.config, job.output_dir, job.attempts, path)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> JobSpec:
        return cls(**json.loads(raw))


def rank_status_path(output_dir: Path, rank: int) -> Path:
    return Path(output_dir) / RANKS_DIR / f"rank-{rank}.json"


def write_rank_status(output_dir: Path, rank: int, attempt: int, **fields: Any) -> None:
    """Atomically (re)write this rank's status file; never raises (it is diagnostics)."""
    path = rank_status_path(output_dir, rank)
    data = {"rank": rank, "attempt": attempt, "pid": os.getpid(), "host": socket.gethostname()}
    data.update(fields, time=time.time())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("rank_status_not_written", error=str(exc))


def read_rank_statuses(output_dir: Path, attempt: int | None = None) -> dict[int, dict]:
    """rank -> status of the ranks that wrote one (for ``attempt`` only, when given)."""
    out: dict[int, dict] = {}
    for f in sorted((Path(output_dir) / RANKS_DIR).glob("rank-*.json")):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if attempt is None or data.get("attempt") == attempt:
            out[int(data["rank"])] = data
    return out
