"""Issue 16: a full disk is RESOURCE_EXHAUSTED with reason DISK_FULL, never INTERNAL; nothing
is half-written and the service works again once space is freed.

Two ways to fill a disk: SQLite's own ``max_page_count`` (a real SQLITE_FULL from SQLite,
portable, always runs) and, where this process may mount (root), a real 512 KiB tmpfs under
the job database, filled to ENOSPC (skipped elsewhere)."""

from __future__ import annotations

import contextlib
import errno
import subprocess
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mlx_unified.v1 import (
    common_pb2,
    common_pb2_grpc,
    orchestrator_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from mlx_unified.v1 import orchestrator_pb2 as opb
from services.runtime import errors
from services.runtime.jobs.store import JobStore
from services.runtime.rpc.status import to_status
from services.runtime.settings import Limits
from tests.conftest import write_jsonl
from tests.integration.test_training_service import CHAT_ROWS, sft_spec

NO_RATE = Limits(rate_start_per_min=0, rate_generate_per_min=0)


def _reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)
    info = error_details_pb2.ErrorInfo()
    for d in status.details if status else ():
        if d.Is(info.DESCRIPTOR):
            d.Unpack(info)
            return info.reason
    return ""


def test_sqlite_full_is_resource_exhausted_and_the_store_recovers(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.db")
    store.create("sft", "m:f", {"x": 1}, str(tmp_path / "o1"))
    conn = store._conn()
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count={pages}")  # the "disk" holds no more pages
    with pytest.raises(errors.ResourceExhausted) as err:
        store.create("sft", "m:f", {"blob": "x" * 200_000}, str(tmp_path / "o2"))
    assert err.value.reason == "DISK_FULL" and "disk is full" in str(err.value)
    status = to_status(err.value)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(store.list()[0]) == 1  # nothing half-written; reads still work
    conn.execute("PRAGMA max_page_count=1073741823")
    job, created = store.create("sft", "m:f", {"blob": "x" * 200_000}, str(tmp_path / "o2"))
    assert created and store.get(job.job_id).config["blob"] == "x" * 200_000
    # An ENOSPC anywhere else maps the same way.
    mapped = errors.storage_error(OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(mapped, errors.ResourceExhausted) and mapped.reason == "DISK_FULL"


@pytest.fixture
def tiny_state_fs(home: Path):
    """MLXU_HOME/state on a 512 KiB tmpfs (root only; skipped where mounting is refused)."""
    state = home / "state"
    state.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(state)],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a small tmpfs here ({e}); the SQLite test above still runs")
    try:
        yield state
    finally:
        for args in (["umount", str(state)], ["umount", "-l", str(state)]):
            if subprocess.run(args, capture_output=True, timeout=10).returncode == 0:
                break


def _fill(fs: Path) -> Path:
    """Write until the file system says ENOSPC; returns the filler (delete it to free)."""
    filler = fs / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (64 * 1024, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return filler


def test_a_full_disk_under_the_services_is_resource_exhausted(
    tiny_state_fs: Path, serve, tiny_model: Path, tmp_path: Path
):
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    training = serve("training", limits=NO_RATE)
    orch = serve(
        "orchestrator",
        limits=NO_RATE,
        endpoints={"training": training.address, "rlhf": "", "distillation": ""},
    )
    filler = _fill(tiny_state_fs)
    spec = sft_spec(tiny_model, data, steps=1)
    with grpc.insecure_channel(training.address) as ch:
        stub = training_pb2_grpc.TrainingServiceStub(ch)
        jobs = common_pb2_grpc.JobServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.StartSFT(training_pb2.StartSFTRequest(spec=spec), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        assert _reason(err.value) == "DISK_FULL" and "disk is full" in err.value.details()
        assert list(jobs.ListJobs(common_pb2.ListJobsRequest(), timeout=30).jobs) == []
    with grpc.insecure_channel(orch.address) as ch:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(ch)
        pl = opb.PipelineSpec(
            name="p",
            base_model=common_pb2.ModelRef(model=str(tiny_model)),
            dataset=common_pb2.DatasetRef(path=str(data)),
            stages=[opb.Stage(name="s", sft=spec)],
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.CreatePipeline(opb.CreatePipelineRequest(spec=pl), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        assert _reason(err.value) == "DISK_FULL"
        filler.unlink()  # space again: the same call now works (nothing was left wedged)
        created = stub.CreatePipeline(opb.CreatePipelineRequest(spec=pl), timeout=60)
        assert created.pipeline.pipeline_id
    training.stop()
    orch.stop()
