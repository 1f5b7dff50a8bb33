"""Orchestrator overhead: stage hand-off time, event latency worker -> subscriber, and many
watchers on one run. Real services in their own processes, the tiny model, LoRA SFT stages.

    uv run python bench/bench_orchestrator.py                 # 1-3 minutes on 2 CPU cores
    uv run python bench/bench_orchestrator.py --stages 5 --steps 60 --watchers 500

1. Hand-off: a pipeline of ``--stages`` SFT stages, each on the previous stage's adapter.
   For each hand-off, from the run and job event times (one clock: one host):
   stage k SUCCEEDED -> stage k+1's first training step, split into the orchestrator's part
   (SUCCEEDED -> job k+1 created on the training service), the service's (job created ->
   worker process up), the load (worker up -> model loaded and adapters applied: MLX import,
   weights) and data + first step. Target: total minus load < 2 s.
2. Event latency: every relayed job event, from the moment the worker stored it (JobEvent
   time) to the moment a WatchRun subscriber received it; also split at the orchestrator's
   relay (RunEvent time). Target p99 < 100 ms.
3. Fan-out: ``--watchers`` concurrent WatchRun streams on one run from seq 0; each must get
   every event exactly once (1..N, N = the run's final event count) and the latency is
   measured over all of them.

Results: bench/results/orchestrator-<host>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

import services  # noqa: F401 - first: loads OpenBLAS before anything imports mlx.core
from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from mlx_unified.v1 import orchestrator_pb2_grpc
from mlx_unified.v1 import training_pb2 as tpb

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} plus {a}?"},
            {"role": "assistant", "content": f"{a} plus {a} is {2 * a}."},
        ]
    }
    for a in range(1, 41)
]
COLUMNS = [("metric", "metric"), ("p50", "p50"), ("p99", "p99"), ("max", "max"),
           ("n", "n"), ("target", "target"), ("ok", "ok")]  # fmt: skip


# ---------------------------------------------------------------- services


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, name: str, home: Path, env: dict[str, str]) -> None:
        self.name, self.port = name, free_port()
        cmd = [sys.executable, "-m", "services.runtime.rpc.server", name]
        cmd += ["--port", str(self.port), "--home", str(home)]
        self.log = home / f"{name}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=common.REPO, env=env, stdout=log, stderr=log, start_new_session=True
            )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} not healthy after {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)


# ---------------------------------------------------------------- measuring


def seconds(ts: Any) -> float:
    return ts.ToNanoseconds() / 1e9


def sft_stage(name: str, steps: int, report_every: int = 1) -> opb.Stage:
    loop = cpb.LoopConfig(batch_size=4, max_steps=steps, steps_per_report=report_every,
                          steps_per_eval=-1,
                          steps_per_checkpoint=steps, max_seq_length=128, seed=1)  # fmt: skip
    opt = cpb.OptimizerConfig(learning_rate=1e-3, schedule=cpb.LR_SCHEDULE_CONSTANT)
    spec = tpb.SFTSpec(method=cpb.FINETUNE_METHOD_LORA, lora=cpb.LoraConfig(rank=4, num_layers=-1),
                       optimizer=opt, loop=loop)  # fmt: skip
    return opb.Stage(name=name, kind=opb.STAGE_KIND_SFT, sft=spec)


async def watch(stub: Any, run_id: str, out: list[tuple[float, opb.RunEvent]]) -> None:
    async for resp in stub.WatchRun(opb.WatchRunRequest(run_id=run_id)):
        out.append((time.time(), resp.event))


def dist(values: list[float], scale: float = 1.0) -> dict[str, Any]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    v = sorted(x * scale for x in values)
    p99 = v[min(len(v) - 1, round(0.99 * (len(v) - 1)))]
    return {"p50": statistics.median(v), "p99": p99, "max": v[-1], "n": len(v)}


def handoffs(events: list[opb.RunEvent], names: list[str]) -> list[dict[str, float]]:
    """Per hand-off k -> k+1: the phases, in seconds, from event times."""
    succeeded: dict[str, float] = {}
    jobs: dict[str, dict[str, float]] = {n: {} for n in names}
    for ev in events:
        which = ev.WhichOneof("payload")
        if which == "stage_state_change":
            ch = ev.stage_state_change
            if ch.to_state == opb.STAGE_STATE_SUCCEEDED:
                succeeded[ch.stage] = seconds(ev.time)
            elif ch.to_state == opb.STAGE_STATE_RUNNING:
                jobs[ch.stage]["acked"] = seconds(ev.time)
        elif which == "job_event":
            je, marks = ev.job_event.event, jobs[ev.job_event.stage]
            kind, t = je.WhichOneof("payload"), seconds(je.time)
            if kind == "state_change" and je.state_change.to_state == cpb.JOB_STATE_PENDING:
                marks.setdefault("created", t)
            elif kind == "log" and "starting from step" in je.log.text:
                marks.setdefault("worker_up", t)
            elif kind == "log" and "trainable parameters" in je.log.text:
                marks.setdefault("loaded", t)
            elif kind == "progress":
                marks.setdefault("first_step", t)
    out = []
    for prev, nxt in zip(names, names[1:], strict=False):
        m, done = jobs[nxt], succeeded[prev]
        total = m["first_step"] - done
        load = m["loaded"] - m["worker_up"]
        out.append({
            "orchestrator": m["created"] - done,
            "acked": m["acked"] - done,
            "service_spawn": m["worker_up"] - m["created"],
            "load": load,
            "data_first_step": m["first_step"] - m["loaded"],
            "total": total,
            "total_minus_load": total - load,
        })  # fmt: skip
    return out


def latencies(seen: list[tuple[float, opb.RunEvent]]) -> tuple[list, list, list]:
    """(worker -> subscriber, worker -> relay, relay -> subscriber) for progress events
    (they come while every watcher is subscribed: nothing is a replay)."""
    e2e, relay, fanout = [], [], []
    for recv, ev in seen:
        if ev.WhichOneof("payload") != "job_event":
            continue
        if ev.job_event.event.WhichOneof("payload") != "progress":
            continue
        stored, relayed = seconds(ev.job_event.event.time), seconds(ev.time)
        e2e.append(recv - stored)
        relay.append(relayed - stored)
        fanout.append(recv - relayed)
    return e2e, relay, fanout


async def run_pipeline(stub: Any, spec: opb.PipelineSpec, watchers: int) -> tuple[Any, list]:
    pl = (await stub.CreatePipeline(opb.CreatePipelineRequest(spec=spec), timeout=60)).pipeline
    run = (await stub.RunPipeline(opb.RunPipelineRequest(pipeline_id=pl.pipeline_id))).run
    outs: list[list] = [[] for _ in range(watchers)]
    await asyncio.gather(*(watch(stub, run.run_id, o) for o in outs))
    final = (await stub.GetRun(opb.GetRunRequest(run_id=run.run_id))).run
    return final, outs


async def measure(args: argparse.Namespace, orch: str, model: Path, data: Path) -> dict:
    channels = [aio.insecure_channel(orch) for _ in range(max(1, args.watchers // 50))]
    stubs = [orchestrator_pb2_grpc.OrchestratorServiceStub(ch) for ch in channels]
    base = {"base_model": cpb.ModelRef(model=str(model)), "dataset": cpb.DatasetRef(path=str(data))}
    names = [f"sft{i + 1}" for i in range(args.stages)]
    spec = opb.PipelineSpec(name="handoff", stages=[sft_stage(n, args.steps) for n in names],
                            cache=False, **base)  # fmt: skip
    final, (seen,) = await run_pipeline(stubs[0], spec, 1)
    if final.state != opb.RUN_STATE_SUCCEEDED:
        raise RuntimeError(f"hand-off run ended {final.state}: {final.error}")
    hand = handoffs([ev for _, ev in seen], names)
    single = latencies(seen)

    fanouts = [await fanout(args, stubs, base, every) for every in args.fanout_report]
    for ch in channels:
        await ch.close()
    return {"handoffs": hand, "single": single, "fanouts": fanouts}


async def fanout(args: argparse.Namespace, stubs: list, base: dict, every: int) -> dict:
    """``--watchers`` streams (spread over a few channels) on one run that reports every
    ``every`` steps; each must see 1..N exactly once."""
    stages = [sft_stage("a", args.steps, every), sft_stage("b", args.steps, every)]
    spec = opb.PipelineSpec(name="fanout", cache=False, stages=stages, **base)
    pl = (await stubs[0].CreatePipeline(opb.CreatePipelineRequest(spec=spec))).pipeline
    run = (await stubs[0].RunPipeline(opb.RunPipelineRequest(pipeline_id=pl.pipeline_id))).run
    outs: list[list] = [[] for _ in range(args.watchers)]
    tic = time.perf_counter()
    await asyncio.gather(*(watch(stubs[i % len(stubs)], run.run_id, o) for i, o in enumerate(outs)))
    wall = time.perf_counter() - tic
    replay: list = []
    await watch(stubs[0], run.run_id, replay)
    n = len(replay)
    bad = sum(1 for o in outs if [ev.seq for _, ev in o] != list(range(1, n + 1)))
    # The event rate while a stage trains (the gap between stages left out).
    times = [seconds(ev.job_event.event.time) for _, ev in replay if ev.WhichOneof("payload")
             == "job_event" and ev.job_event.event.WhichOneof("payload") == "progress"]  # fmt: skip
    gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b - a < 1.0]
    rate = 1 / statistics.median(gaps) if gaps else 0.0
    return {"every": every, "events": n, "bad": bad, "wall": wall, "rate": rate,
            "latency": latencies([x for o in outs for x in o])}  # fmt: skip


def table(res: dict, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(metric: str, values: list[float], scale: float, target: float | None) -> None:
        d = dist(values, scale)
        ok = "" if target is None or d["p99"] is None else ("yes" if d["p99"] < target else "NO")
        rows.append({"metric": metric, **d, "target": target or "", "ok": ok})

    hand = res["handoffs"]
    for key, label, target in (
        ("orchestrator", "hand-off: SUCCEEDED -> next job created (s)", None),
        ("acked", "hand-off: SUCCEEDED -> next stage RUNNING (s)", None),
        ("service_spawn", "hand-off: job created -> worker up (s)", None),
        ("load", "hand-off: load (MLX import + weights + adapters) (s)", None),
        ("data_first_step", "hand-off: data + first step (s)", None),
        ("total", "hand-off: SUCCEEDED -> first step (s)", None),
        ("total_minus_load", "hand-off: total minus load (s)", 2.0),
    ):
        row(label, [h[key] for h in hand], 1.0, target)
    e2e, relay, fan = res["single"]
    row("latency, 1 watcher: worker -> subscriber (ms)", e2e, 1e3, 100.0)
    row("latency, 1 watcher: worker -> relay (ms)", relay, 1e3, None)
    row("latency, 1 watcher: relay -> subscriber (ms)", fan, 1e3, None)
    for f in res["fanouts"]:
        e2e, _, fan = f["latency"]
        what = f"{args.watchers} watchers, {f['rate']:.0f} progress events/s"
        row(f"latency, {what}: worker -> subscriber (ms)", e2e, 1e3, 100.0)
        row(f"latency, {what}: relay -> subscriber (ms)", fan, 1e3, None)
        rows.append({"metric": f"{what}: watchers with a lost or duplicate event",
                     "p50": f["bad"], "n": args.watchers, "target": 0,
                     "ok": "yes" if f["bad"] == 0 else "NO"})  # fmt: skip
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stages", type=int, default=4, help="SFT stages in the hand-off pipeline")
    p.add_argument("--steps", type=int, default=40, help="training steps per stage")
    p.add_argument("--watchers", type=int, default=200)
    p.add_argument(
        "--fanout-report",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 10],
        help="fan-out runs report every N steps, one run per N (default 1,10)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp data dir")
    args = p.parse_args()

    from services.runtime.models import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    home = tmp / "home"
    home.mkdir()
    model = build_tiny_model(tmp / "tiny-llama")
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    env = {**os.environ, "MLXU_HOME": str(home), "MLXU_ALLOWED_ROOTS": str(tmp)}
    env.pop("MLXU_API_KEYS", None)
    training = Service("training", home, env)
    env.update(MLXU_TRAINING_ADDR=training.address, MLXU_DISTILLATION_ADDR="", MLXU_RLHF_ADDR="")
    orch = Service("orchestrator", home, env)
    load_before = os.getloadavg()[0]
    try:
        training.wait_healthy()
        orch.wait_healthy()
        res = asyncio.run(measure(args, orch.address, model, data))
    finally:
        orch.stop()
        training.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    rows = table(res, args)
    info = common.machine({"blas": common.describe_blas(common.blas_in_process())})
    settings = {"stages": args.stages, "steps": args.steps, "watchers": args.watchers,
                "fanout_report_every": ",".join(map(str, args.fanout_report)),
                "model": "tiny-llama (2 layers)", "method": "lora"}  # fmt: skip
    notes = [
        "Event times are wall-clock stamps from three processes on one host: the worker "
        "(JobEvent.time), the orchestrator (RunEvent.time) and the subscriber (receive).",
        "worker -> relay includes the training service's WatchJob poll of its job database "
        "(JobServicer poll_s).",
        *(
            f"Fan-out run reporting every {f['every']} step(s): {f['events']} events to each of "
            f"{args.watchers} watchers in {f['wall']:.1f} s, "
            f"{f['events'] * args.watchers / f['wall']:,.0f} messages/s on average."
            for f in res["fanouts"]
        ),
        f"1-minute load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after, on "
        f"{os.cpu_count()} cores (other work on the host inflates the latency tails).",
    ]
    _, md_path, text = common.write_results("orchestrator", rows, COLUMNS, info,
                                            settings=settings, notes=notes)  # fmt: skip
    print(text)
    print(f"written: {md_path}")
    bad = [r for r in rows if r.get("ok") == "NO"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
