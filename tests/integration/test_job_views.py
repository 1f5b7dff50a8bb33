"""WatchJob's view (issue 12): events carry the BASIC job (no resolved_config) unless the
caller asks for FULL; GetJob always returns the full job. A real service on loopback runs a
real (tiny) job through the worker machinery."""

from __future__ import annotations

import grpc
import pytest

from mlx_unified.v1 import common_pb2
from services.runtime.jobs.testing import TEST_ENTRY
from tests.integration.helpers import TERMINAL, Stubs, violations

CONFIG = {"steps": 4, "checkpoint_every": 2, "note": "x" * 2000}


@pytest.fixture
def finished_job(serve):
    srv = serve("training")
    host = srv.running.handle.on_start.__self__  # the service's JobsHost
    job, _ = srv.call(
        host.start_job("sft", TEST_ENTRY, CONFIG, request_id="", output_name="", labels={})
    )
    stubs = Stubs(srv.address)
    final, _ = stubs.wait(job.job_id)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    yield stubs, final
    stubs.close()


def _watch(stubs: Stubs, job_id: str, view: int) -> list[common_pb2.WatchJobResponse]:
    req = common_pb2.WatchJobRequest(job_id=job_id, view=view)
    return list(stubs.jobs.WatchJob(req, timeout=60))


def test_watch_events_carry_the_basic_job_unless_full_is_asked(finished_job):
    stubs, final = finished_job
    assert final.resolved_config["steps"] == 4  # GetJob: the full job

    for view in (common_pb2.JOB_VIEW_UNSPECIFIED, common_pb2.JOB_VIEW_BASIC):
        resps = _watch(stubs, final.job_id, view)
        assert [r.event.seq for r in resps] == list(range(1, len(resps) + 1))
        kinds = {r.event.WhichOneof("payload") for r in resps}
        assert {"state_change", "progress", "checkpoint"} <= kinds
        for r in resps:
            assert not r.job.HasField("resolved_config")
            # What clients read from events is all there.
            assert r.job.job_id == final.job_id and r.job.kind == "sft"
            assert r.job.state in TERMINAL and r.job.step == 4 and r.job.total_steps == 4
            assert r.job.result.path == final.result.path
            assert dict(r.job.metrics) == dict(final.metrics)
            assert r.job.end_time == final.end_time

    full = _watch(stubs, final.job_id, common_pb2.JOB_VIEW_FULL)
    assert [r.event for r in full] == [r.event for r in resps]
    for r in full:
        assert r.job == final  # today's behaviour, config included
    # The point of BASIC: the config is not repeated on every event.
    basic_bytes = sum(r.ByteSize() for r in resps)
    full_bytes = sum(r.ByteSize() for r in full)
    assert basic_bytes + len(full) * 2000 < full_bytes


def test_an_unknown_view_is_invalid_argument(finished_job):
    stubs, final = finished_job
    with pytest.raises(grpc.RpcError) as err:
        _watch(stubs, final.job_id, 7)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "view" in violations(err.value)
