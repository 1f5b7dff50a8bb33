"""Standard gRPC health on a real loopback server: Check, and List (which grpcio's own
HealthServicer does not implement: it answered INTERNAL before services.runtime.rpc.health)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlx_unified.v1 import common_pb2
from services.runtime.rpc.status import to_status

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TRAINING_NAMES = {
    "",
    "mlx_unified.v1.TrainingService",
    "mlx_unified.v1.JobService",
    "mlx_unified.v1.GenerationService",
}


@pytest.fixture
def training(serve):
    # With API keys configured: health must still answer without one.
    return serve("training", api_keys=frozenset({"k1"}))


def _list(address: str) -> dict[str, int]:
    with grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).List(health_pb2.HealthListRequest(), timeout=10)
    return {name: r.status for name, r in resp.statuses.items()}


def test_health_list_names_every_service_serving_without_a_key(training):
    statuses = _list(training.address)
    assert set(statuses) == TRAINING_NAMES
    assert set(statuses.values()) == {SERVING}
    # List and Check agree.
    with grpc.insecure_channel(training.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in TRAINING_NAMES:
            assert stub.Check(health_pb2.HealthCheckRequest(service=name)).status == SERVING


def test_health_list_is_a_snapshot_of_current_statuses(training):
    name = common_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
    training.call(training.running.health.set(name, NOT_SERVING))
    statuses = _list(training.address)
    assert statuses[name] == NOT_SERVING
    assert statuses["mlx_unified.v1.TrainingService"] == SERVING


def test_a_method_no_servicer_implements_is_unimplemented_not_internal():
    # The generated base servicers raise this for any method a servicer does not override.
    status = to_status(NotImplementedError("Method not implemented!"))
    assert status.code == grpc.StatusCode.UNIMPLEMENTED
    # Any other NotImplementedError is still a server fault with an incident id.
    assert to_status(NotImplementedError("dtype int4")).code == grpc.StatusCode.INTERNAL
