"""Property-based fuzzing of every RPC's request message against the real services.

For every example: the status is never INTERNAL or UNKNOWN (nor any other code that means
"the server broke"), a rejected request creates no job, pipeline or run, and the answer comes
back within LATENCY_S. Examples per RPC: MLXU_FUZZ_EXAMPLES (default 200, see conftest.py).

    MLXU_FUZZ_EXAMPLES=200 uv run pytest tests/fuzz -q
"""

from __future__ import annotations

import os
import time

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mlx_unified.v1 import (
    common_pb2,
    distillation_pb2,
    generation_pb2,
    orchestrator_pb2,
    rlhf_pb2,
    training_pb2,
)
from tests.fuzz import seeds
from tests.fuzz.conftest import EXAMPLES, Stack
from tests.fuzz.strategies import messages, mutated

LATENCY_S = 10.0
TAIL_S = 0.1  # how long a watch may tail before the fuzz moves on
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
}
# (service that serves it, full service name, module) for every service of the platform.
SERVICES = [
    ("training", "TrainingService", training_pb2),
    ("training", "JobService", common_pb2),
    ("training", "GenerationService", generation_pb2),
    ("rlhf", "RLHFService", rlhf_pb2),
    ("distillation", "DistillationService", distillation_pb2),
    ("orchestrator", "OrchestratorService", orchestrator_pb2),
]
RPCS = [
    (server, svc, m)
    for server, svc, mod in SERVICES
    for m in mod.DESCRIPTOR.services_by_name[svc].methods
]


def _counts(stack: Stack) -> tuple[int, ...]:
    """Jobs created by clients (not by orchestrator runs: request ids 'runs/...'),
    pipelines and runs."""
    out = []
    for name in ("training", "rlhf", "distillation"):
        conn = stack.hosts[name].store._conn()
        (n,) = conn.execute(
            "SELECT COUNT(*) FROM jobs WHERE request_id IS NULL OR request_id NOT LIKE 'runs/%'"
        ).fetchone()
        out.append(n)
    store = stack.orchestrator_store
    for table in ("pipelines", "runs"):
        out.append(store._one(f"SELECT COUNT(*) AS n FROM {table}")["n"])
    return tuple(out)


def _caller(channel: grpc.Channel, svc: str, method) -> callable:  # noqa: ANN001
    path = f"/{method.containing_service.full_name}/{method.name}"
    kw = {"request_serializer": lambda m: m.SerializeToString(), "response_deserializer": None}
    if method.server_streaming:
        stream = channel.unary_stream(path, **kw)

        tail = method.name.startswith("Watch")  # replays, then follows a live job / run

        def call(req: Message) -> grpc.StatusCode:
            # A watch of a live job / run with nothing new tails until its deadline: that
            # (or the first event) is its answer. Refusals come back at once.
            it = stream(req, timeout=TAIL_S if tail else LATENCY_S * 2)
            ended = {grpc.StatusCode.CANCELLED} | (
                {grpc.StatusCode.DEADLINE_EXCEEDED} if tail else set()
            )
            try:
                for _ in it:
                    if tail:
                        it.cancel()
                        return grpc.StatusCode.OK
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return grpc.StatusCode.OK if e.code() in ended else e.code()

        return call
    unary = channel.unary_unary(path, **kw)

    def call(req: Message) -> grpc.StatusCode:  # noqa: F811
        try:
            unary(req, timeout=LATENCY_S * 2)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    return call


@pytest.fixture(scope="module")
def channels(stack: Stack):
    chans = {name: grpc.insecure_channel(stack.address(name)) for name in stack.servers}
    yield chans
    for ch in chans.values():
        ch.close()


@pytest.mark.parametrize(
    ("server", "svc", "method"), RPCS, ids=[f"{s}.{m.name}" for _, s, m in RPCS]
)
def test_fuzz_rpc(stack: Stack, channels, server: str, svc: str, method) -> None:  # noqa: ANN001
    call = _caller(channels[server], svc, method)
    bases = seeds.for_method(f"{svc}.{method.name}", stack.pools)
    strategy = messages(method.input_type, stack.pools)
    if bases:  # two in three examples: a valid request with a field or two changed
        strategy = st.one_of(strategy, mutated(bases, stack.pools), mutated(bases, stack.pools))
    seen: dict[grpc.StatusCode, int] = {}
    slowest, in_calls, started = [0.0], [0.0], time.monotonic()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=os.environ.get("MLXU_FUZZ_SEED", "") != "random",
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(req=strategy)
    def one(req: Message) -> None:
        before = _counts(stack)
        t = time.monotonic()
        code = call(req)
        took = time.monotonic() - t
        seen[code] = seen.get(code, 0) + 1
        slowest[0] = max(slowest[0], took)
        in_calls[0] += took
        if os.environ.get("MLXU_FUZZ_DEBUG") and took > 0.2:
            print(f"slow {took:.2f}s {code.name}: {str(req)[:300]!r}")
        assert code in ALLOWED, f"{method.name} answered {code.name} to {req}"[:4000]
        assert took < LATENCY_S, f"{method.name} took {took:.1f} s for {req}"[:4000]
        if code != grpc.StatusCode.OK:
            assert _counts(stack) == before, f"{method.name} refused but created: {req}"[:4000]

    for base in bases:  # the valid requests themselves, every run
        one = example(req=base)(one)
    one()
    summary = ", ".join(f"{c.name} {n}" for c, n in sorted(seen.items(), key=lambda x: -x[1]))
    total = time.monotonic() - started
    print(
        f"\n{svc}.{method.name}: {sum(seen.values())} requests ({summary}); slowest "
        f"{slowest[0]:.2f} s; {total:.1f} s in all, {in_calls[0]:.1f} s of it in calls"
    )


def test_every_rpc_is_fuzzed() -> None:
    """A new service or RPC joins the fuzz suite by being in SERVICES."""
    names = {f"{s}.{m.name}" for _, s, m in RPCS}
    assert len(names) == 27, sorted(names)  # 25 + StartKTO, StartORPO
    assert {"OrchestratorService.CreatePipelineFromTemplate", "GenerationService.Generate"} <= names
