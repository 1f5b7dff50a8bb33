"""Real in-process services for the fuzz suite (module scope: every RPC's test sends over a
thousand requests), with job workers never launched: an accepted Start* records its job and
leaves it PENDING, so the suite fuzzes the edge and validation, not training.

MLXU_FUZZ_EXAMPLES: requests per RPC from the fast seeded generator (mutator.py; default
1000, the whole suite in about 100 s on 2 shared CPU cores). MLXU_FUZZ_HYPOTHESIS: Hypothesis
examples per RPC on top (default 20: Hypothesis needs 2-20 ms to draw one of these messages,
the fast generator ~0.1 ms). MLXU_FUZZ_SEED: the generator's seed (default 0; "random" draws
one, printed in the summary). The paths tests run MLXU_FUZZ_PATH_EXAMPLES Hypothesis
examples (default 1000).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlx_unified.v1 import common_pb2 as cpb
from services.runtime.settings import Limits, Settings
from tests.conftest import REPO, ThreadedServer, write_jsonl
from tests.fuzz import seeds
from tests.fuzz.strategies import Pools

EXAMPLES = int(os.environ.get("MLXU_FUZZ_EXAMPLES", "1000"))
HYPOTHESIS_EXAMPLES = int(os.environ.get("MLXU_FUZZ_HYPOTHESIS", "20"))
PATH_EXAMPLES = int(os.environ.get("MLXU_FUZZ_PATH_EXAMPLES", "1000"))
SEED = os.environ.get("MLXU_FUZZ_SEED", "0")
if SEED == "random":
    SEED = secrets.token_hex(4)
SUMMARY: list[str] = []  # one line per fuzzed RPC, shown at the end of the run
CHAT = [
    {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
    for i in range(6)
]
PREFS = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]
UNPAIRED = [{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(6)]
LIMITS = Limits(
    rate_start_per_min=0,
    rate_generate_per_min=0,
    generate_max_tokens=8,  # keeps an accepted Generate cheap
    generate_max_prompt_tokens=256,
    generate_max_seconds=20,
    score_max_items=4,  # keeps an accepted Score / ScoreCompletions cheap (past it: refused)
)


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001
    if SUMMARY:
        terminalreporter.section(f"fuzz: requests per RPC (MLXU_FUZZ_SEED={SEED})")
        for line in SUMMARY:
            terminalreporter.line(line)


@dataclass
class Stack:
    servers: dict[str, ThreadedServer]
    pools: Pools
    hosts: dict  # service -> JobsHost
    orchestrator_store: object

    def address(self, service: str) -> str:
        return self.servers[service].address


class IdleBackend:
    """The orchestrator's stage backend in the fuzz suite: a start is acknowledged and its
    job stays RUNNING until cancelled, so runs exercise the scheduler without training."""

    def __init__(self) -> None:
        self.cancelled: dict[str, asyncio.Event] = {}

    async def start(self, stage_kind: str, spec: object, idempotency_key: str) -> str:
        job_id = "job-fuzz-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:12]
        self.cancelled.setdefault(job_id, asyncio.Event())
        return job_id

    async def get(self, stage_kind: str, job_id: str) -> cpb.Job:
        done = self.cancelled.setdefault(job_id, asyncio.Event()).is_set()
        state = cpb.JOB_STATE_CANCELLED if done else cpb.JOB_STATE_RUNNING
        return cpb.Job(job_id=job_id, kind=stage_kind, state=state)

    async def watch(self, stage_kind: str, job_id: str, after_seq: int):  # noqa: ANN201
        await self.cancelled.setdefault(job_id, asyncio.Event()).wait()
        change = cpb.StateChange(from_state=cpb.JOB_STATE_RUNNING, to_state=cpb.JOB_STATE_CANCELLED)
        ev = cpb.JobEvent(job_id=job_id, seq=after_seq + 1, state_change=change)
        yield ev, await self.get(stage_kind, job_id)

    async def cancel(self, stage_kind: str, job_id: str, reason: str) -> None:
        self.cancelled.setdefault(job_id, asyncio.Event()).set()


def _warm_up(address: str, model: Path) -> None:
    """Load the model and MLX's kernels once, so the first fuzzed Generate is not timed
    on imports and compilation."""
    import grpc

    from mlx_unified.v1 import generation_pb2 as gpb
    from mlx_unified.v1 import generation_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        req = gpb.GenerateRequest(
            model=cpb.ModelRef(model=str(model)),
            prompt="hi",
            sampling=gpb.SamplingParams(max_tokens=2),
        )
        list(generation_pb2_grpc.GenerationServiceStub(ch).Generate(req, timeout=120))


async def _make_idle() -> IdleBackend:
    return IdleBackend()  # made on the server's loop: its Events belong there


def _no_launch(host) -> None:  # noqa: ANN001
    async def submit(job_id: str) -> None:
        return None

    host.runner.submit = submit


def _reward_checkpoint(tiny: Path, out: Path) -> Path:
    """The tiny model with a seeded reward head: what Score needs to score for real."""
    from services.rlhf.trainers import heads
    from services.runtime.models import load_model

    shutil.copytree(tiny, out)
    lm, _ = load_model(str(out))
    heads.save_head(heads.attach_head(lm), out, "reward")
    return out


def _fixtures(base: Path, tiny: Path, outside: Path) -> dict[str, str]:
    chat = write_jsonl(base / "chat.jsonl", CHAT)
    prefs = write_jsonl(base / "prefs.jsonl", PREFS)
    prompts = write_jsonl(base / "prompts.jsonl", [{"prompt": f"p{i}"} for i in range(6)])
    unpaired = write_jsonl(base / "unpaired.jsonl", UNPAIRED)
    ds = base / "dsdir"
    write_jsonl(ds / "train.jsonl", CHAT)
    evil = base / "evil-ds"
    evil.mkdir()
    write_jsonl(outside / "secret.jsonl", CHAT)
    (evil / "train.jsonl").symlink_to(outside / "secret.jsonl")
    linked = base / "linked-model"
    linked.mkdir()
    for f in tiny.iterdir():
        (linked / f.name).symlink_to(f.resolve())
    shutil.copytree(tiny, outside / "model")
    evil_model = base / "evil-model"
    evil_model.mkdir()
    for f in (outside / "model").iterdir():
        (evil_model / f.name).symlink_to(f)
    hosts = base / "hosts.json"
    hosts.write_text('[{"ssh": "h1"}, {"ssh": "h2"}]')
    (base / "fifo").unlink(missing_ok=True)
    os.mkfifo(base / "fifo")
    named = {
        "model": tiny, "chat": chat, "prefs": prefs, "prompts": prompts, "unpaired": unpaired,
        "dsdir": ds, "reward_model": _reward_checkpoint(tiny, base / "reward-model"),
        "evil_ds": evil, "linked_model": linked, "evil_model": evil_model, "hostfile": hosts,
        "fifo": base / "fifo", "outside": outside / "secret.jsonl", "dir": base,
        "missing": base / "missing.jsonl",
    }  # fmt: skip
    return {k: str(v) for k, v in named.items()}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    base = tmp_path_factory.mktemp("fuzz").resolve()
    home = base / "home"
    outside = Path(tempfile.mkdtemp(prefix="mlxu-fuzz-outside-")).resolve()
    roots = (home, tmp_path_factory.getbasetemp().resolve(), REPO)

    def settings(service: str, **kw: object) -> Settings:
        return Settings(
            service=service,
            home=home,
            allowed_roots=roots,
            limits=LIMITS,
            offline=True,
            **kw,  # type: ignore[arg-type]
        )

    servers: dict[str, ThreadedServer] = {}
    hosts: dict = {}
    try:
        for name in ("training", "rlhf", "distillation"):
            srv = ThreadedServer(settings(name))
            host = srv.running.handle.on_start.__self__
            _no_launch(host)
            servers[name], hosts[name] = srv, host
        endpoints = {n: servers[n].address for n in ("training", "rlhf", "distillation")}
        orch = ThreadedServer(settings("orchestrator", endpoints=endpoints))
        servers["orchestrator"] = orch
        scheduler = orch.running.handle.extra["scheduler"]
        scheduler.backend = orch.call(_make_idle())
        named = _fixtures(base, tiny_model, outside)
        pools = Pools(paths=list(named.values()), models=[str(tiny_model)], named=named)
        store = hosts["training"].store
        for state in ("PENDING", "CANCELLED", "SUCCEEDED"):
            job, _ = store.create("sft", "m:f", {}, str(home / "checkpoints" / state), None, {})
            if state != "PENDING":
                store.transition(job.job_id, "RUNNING")
                store.transition(job.job_id, state)
            pools.ids.append(job.job_id)
        pl, _ = scheduler.create_pipeline(seeds.pipeline(pools))
        run, _ = orch.call(scheduler.run_pipeline(pl.pipeline_id))
        pools.ids += [pl.pipeline_id, run.run_id]
        _warm_up(servers["training"].address, tiny_model)
        yield Stack(servers, pools, hosts, orch.running.handle.extra["store"])
    finally:
        for srv in servers.values():
            srv.stop(grace=1)
        shutil.rmtree(outside, ignore_errors=True)
