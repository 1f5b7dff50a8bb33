"""A test trainer for the cancel/complete race (entry ``ENTRY``): it publishes its final
checkpoint, says so with ``<output_dir>/ready``, then waits for ``<output_dir>/go`` before it
returns - a trainer past its last ``should_stop`` check, as a real one is while it finishes.
The test decides which lands first: the cancel or the finish."""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx

from services.runtime.contract import CheckpointInfo, JobContext
from services.runtime.jobs.testing import save_checkpoint

ENTRY = "tests.integration.race_trainer:run"


def run(config: dict, ctx: JobContext) -> CheckpointInfo:
    out = Path(ctx.output_dir)
    info = save_checkpoint(out, "final", 1, mx.zeros((2,)), 0.5, ctx.job_id)
    (out / "ready").write_text("final written")
    end = time.monotonic() + float(config.get("wait_s", 30))
    while not (out / "go").exists() and time.monotonic() < end:
        time.sleep(0.01)  # waiting for the test's signal (a file), not faking work
    return info
