"""Issue 16: one Generate cannot starve GenerationService. A call stops when its deadline
passes or its client cancels (checked between prefill chunks), the queue is bounded, and a
call without a deadline is capped. Figures are printed (pytest -s) for the report."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from mlx_unified.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.runtime.settings import Limits

# ~24k tokens of the tiny tokenizer: a full prefill takes tens of seconds on 2 CPU cores.
HUGE = "word " * 8000
BASE = {"rate_start_per_min": 0, "rate_generate_per_min": 0, "generate_max_prompt_tokens": 30_000}


def _stub(srv) -> tuple[grpc.Channel, generation_pb2_grpc.GenerationServiceStub]:  # noqa: ANN001
    ch = grpc.insecure_channel(srv.address)
    return ch, generation_pb2_grpc.GenerationServiceStub(ch)


def _req(model: Path, prompt: str, max_tokens: int = 4) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        model=common_pb2.ModelRef(model=str(model)),
        prompt=prompt,
        sampling=generation_pb2.SamplingParams(max_tokens=max_tokens),
    )


def _small(gen, model: Path, timeout: float = 60) -> float:  # noqa: ANN001
    t = time.monotonic()
    chunks = list(gen.Generate(_req(model, "hi"), timeout=timeout))
    assert chunks[-1].finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
    return time.monotonic() - t


def _in_thread(fn) -> tuple[threading.Thread, dict]:  # noqa: ANN001
    out: dict = {}

    def run() -> None:
        t = time.monotonic()
        try:
            out["value"] = fn()
        except grpc.RpcError as e:
            out["code"] = e.code()
        out["seconds"] = time.monotonic() - t

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def _wait_running(srv, n: int = 1, timeout: float = 30) -> None:  # noqa: ANN001
    """Until the server has ``n`` generations admitted (running or queued) - not a sleep
    pretending to be progress: it polls the admission state the test is about."""
    adm = _admission(srv)
    end = time.monotonic() + timeout
    while adm.running + len(adm._waiting) < n:
        assert time.monotonic() < end, "the call never reached the server"
        time.sleep(0.01)


def _admission(srv):  # noqa: ANN001, ANN202
    return srv.generation.admission


@pytest.fixture
def gen_server(serve, monkeypatch):
    """A training service whose GenerationServicer the test can inspect."""
    from services.runtime.rpc import generation_servicer as gs

    made: list = []
    real = gs.GenerationServicer.__init__

    def init(self, settings, cache=None):  # noqa: ANN001
        real(self, settings, cache)
        made.append(self)

    monkeypatch.setattr(gs.GenerationServicer, "__init__", init)

    def make(**limits):  # noqa: ANN003, ANN202
        srv = serve("training", limits=Limits(**{**BASE, **limits}))
        srv.generation = made[-1]
        return srv

    return make


def test_a_huge_prompt_cannot_delay_another_clients_generate(gen_server, tiny_model):
    srv = gen_server()
    ch, gen = _stub(srv)
    _small(gen, tiny_model)  # loads the model
    alone = min(_small(gen, tiny_model) for _ in range(3))
    deadline = 1.5
    th, big = _in_thread(lambda: list(gen.Generate(_req(tiny_model, HUGE), timeout=deadline)))
    _wait_running(srv)
    t0 = time.monotonic()
    small = _small(gen, tiny_model)
    th.join(30)
    waited = time.monotonic() - t0
    print(
        f"\nsmall Generate alone {alone:.3f} s; behind a {len(HUGE)}-char (~24k-token) prompt "
        f"with a {deadline} s deadline: {small:.3f} s (the huge call ended "
        f"{big.get('code')} after {big.get('seconds', 0):.2f} s)"
    )
    assert big.get("code") == grpc.StatusCode.DEADLINE_EXCEEDED, big
    # Queue position 2: at most the call ahead of it (until its deadline, plus the prefill
    # chunk in flight) and its own time - never the huge prefill's tens of seconds.
    assert small < deadline + 1.5 + 2 * alone, (small, alone)
    assert waited < deadline + 2.0
    ch.close()


def test_the_queue_is_bounded_and_a_cancel_frees_the_slot(gen_server, tiny_model):
    srv = gen_server(generate_queue=1)
    ch, gen = _stub(srv)
    _small(gen, tiny_model)
    big = gen.Generate(_req(tiny_model, HUGE), timeout=120)
    th, first = _in_thread(lambda: list(big))
    _wait_running(srv, 1)
    th2, queued = _in_thread(lambda: _small(gen, tiny_model))
    _wait_running(srv, 2)
    t = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        _small(gen, tiny_model)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in err.value.details()
    assert time.monotonic() - t < 1.0  # refused at once, not after waiting
    cancelled_at = time.monotonic()
    big.cancel()  # the client goes away: its prefill stops within a chunk
    th2.join(30)
    th.join(30)
    freed = time.monotonic() - cancelled_at
    print(f"\nafter the client cancelled the huge call, the queued one finished in {freed:.2f} s")
    assert first.get("code") == grpc.StatusCode.CANCELLED
    assert "value" in queued and freed < 5.0, (queued, freed)
    assert _small(gen, tiny_model) < 10  # the service is free again
    ch.close()


def test_a_call_without_deadline_is_capped(gen_server, tiny_model):
    srv = gen_server(generate_max_seconds=1)
    ch, gen = _stub(srv)
    t = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(gen.Generate(_req(tiny_model, HUGE)))  # no deadline
    took = time.monotonic() - t
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "MLXU_GENERATE_MAX_SECONDS" in err.value.details()
    assert took < 30, took  # model load + 1 s + one chunk, not the whole prefill
    ch.close()
