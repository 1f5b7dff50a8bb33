"""Data-parallel jobs: 2 ranks under mlx.launch (ring backend, this host, CPU) through the real
services, against 1-process jobs with the same global batch and seed; a rank killed mid-job;
ranks that fail, get cancelled, or are planned over hosts that do not fit."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pytest

from mlx_unified.v1 import (
    common_pb2,
    distillation_pb2,
    distillation_pb2_grpc,
    generation_pb2,
    rlhf_pb2,
    rlhf_pb2_grpc,
)
from services.runtime.jobs import testing
from services.runtime.jobs.runner import (
    JobRunner,
    LaunchError,
    build_command,
    describe_ranks,
    plan_hostfile,
)
from services.runtime.jobs.store import JobState, JobStore
from services.runtime.settings import Settings
from tests.conftest import write_jsonl
from tests.integration.helpers import Stubs, losses
from tests.integration.test_distillation_service import spec as distill_spec
from tests.integration.test_resume import worker_pids
from tests.integration.test_rlhf_service import const_lr, loop, preferences
from tests.integration.test_training_service import CHAT_ROWS, sft_spec

STEPS, EVERY = 25, 5
# Same global batch and seed: the curves differ by float32 summation order only (~1e-5).
# (At lr >= 1e-3 this tiny LoRA model trains chaotically and Adam amplifies that noise
# into visible differences after ~15 steps; at 1e-4 it trains steadily, 6.33 -> 5.42.)
TOL = 2e-4
LR = 1e-4
PROMPTS = [{"prompt": f"Tell me about {w}."} for w in ("cats", "dogs", "rain", "tea")]


def with_procs(spec, n: int, name: str):
    spec.resources.num_processes = n
    spec.resources.backend = common_pb2.DISTRIBUTED_BACKEND_RING
    spec.output_name = name
    return spec


def curve(events) -> dict[int, float]:
    """The loss each step reported; a resumed attempt overwrites the killed one's later steps."""
    return dict(losses(events))


def assert_same_curve(got: dict[int, float], want: dict[int, float], steps) -> None:
    for step in steps:
        assert got[step] == pytest.approx(want[step], abs=TOL), (step, got[step], want[step])


def rank_pids(job_id: str) -> dict[int, int]:
    """rank -> pid of the job's live ranks (mlx.launch exports MLX_RANK to each)."""
    out = {}
    for pid in worker_pids(job_id):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [e.split(b"=", 1)[1] for e in env if e.startswith(b"MLX_RANK=")]
        if rank:
            out[int(rank[0])] = pid
    return out


def assert_all_exit(job_id: str, within: float = 20.0) -> None:
    """Every process of the job (launcher and ranks) is gone within ``within`` seconds: a
    job is terminal as soon as rank 0 records it, its processes exit just after."""
    deadline = time.monotonic() + within
    while worker_pids(job_id):
        assert time.monotonic() < deadline, f"left running: {worker_pids(job_id)}"
        time.sleep(0.05)  # polling the process table, not waiting for progress


def wait_for_checkpoint(stubs: Stubs, job_id: str) -> int:
    for resp in stubs.watch(job_id):
        if resp.event.WhichOneof("payload") == "checkpoint":
            return resp.event.checkpoint.step
    raise AssertionError("job ended before writing a checkpoint")


def reasons(events) -> list[str]:
    return [e.state_change.reason for e in events if e.WhichOneof("payload") == "state_change"]


def progress_steps(events, after_seq: int = 0) -> list[int]:
    return [
        e.progress.step
        for e in events
        if e.WhichOneof("payload") == "progress" and e.seq > after_seq
    ]


def running_seqs(events) -> list[int]:
    return [
        e.seq
        for e in events
        if e.WhichOneof("payload") == "state_change"
        and e.state_change.to_state == common_pb2.JOB_STATE_RUNNING
    ]


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", CHAT_ROWS)


def sft(model: Path, data: Path, n: int, name: str):
    s = sft_spec(model, data, steps=STEPS, ckpt_every=EVERY, lr=LR)
    s.loop.steps_per_eval = -1
    return with_procs(s, n, name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, chat) -> dict:
    """The 1-process SFT run every 2-process run is compared with: its curve and tokens."""
    from tests.conftest import ThreadedServer

    home = tmp_path_factory.mktemp("reference-home")
    base = tmp_path_factory.getbasetemp().resolve()
    srv = ThreadedServer(Settings(service="training", home=home, allowed_roots=(home, base)))
    stubs = Stubs(srv.address)
    try:
        final, events = stubs.wait(stubs.start_sft(sft(tiny_model, chat, 1, "one")).job_id)
    finally:
        stubs.close()
        srv.stop()
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    return {"curve": curve(events), "tokens": final.metrics["tokens"]}


# ---- same global batch, same seed: same loss curve ----


def exit_codes(output_dir: Path, timeout: float = 30.0) -> list[int | None]:
    """Each rank's exit code from its status file. A rank writes it as it exits, which may
    be just after rank 0 recorded the job's end, so wait for both (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [
            json.loads(p.read_text()).get("code")
            for p in sorted(output_dir.glob("ranks/rank-*.json"))
        ]
        if (len(codes) == 2 and None not in codes) or time.monotonic() > deadline:
            return codes
        time.sleep(0.1)


def test_sft_two_processes_match_one(serve, tiny_model, chat, reference):
    stubs = Stubs(serve("training").address)
    job = stubs.start_sft(sft(tiny_model, chat, 2, "two"))
    final, events = stubs.wait(job.job_id)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    # Rank 0 alone writes: every step reported once, one start log naming both processes.
    assert progress_steps(events) == list(range(1, STEPS + 1))
    logs = [e.log.text for e in events if e.WhichOneof("payload") == "log"]
    assert sum("2 process(es)" in t for t in logs) == 1, logs
    assert_same_curve(curve(events), reference["curve"], range(1, STEPS + 1))
    # Tokens are summed over ranks: the same count as the one-process run.
    assert final.metrics["tokens"] == reference["tokens"] > 0
    manifest = json.loads((Path(final.result.path) / "manifest.json").read_text())
    assert manifest["job_id"] == job.job_id
    assert exit_codes(Path(final.result.path).parent) == [0, 0]
    assert_all_exit(job.job_id)
    stubs.close()


def test_dpo_two_processes_match_one(serve, tiny_model, tmp_path):
    stubs = Stubs(serve("rlhf").address)
    stub = rlhf_pb2_grpc.RLHFServiceStub(stubs.channel)
    data = write_jsonl(tmp_path / "prefs.jsonl", preferences(32))
    curves, finals = {}, {}
    for n in (1, 2):
        spec = rlhf_pb2.DPOSpec(
            policy=common_pb2.ModelRef(model=str(tiny_model)),
            dataset=common_pb2.DatasetRef(path=str(data), valid_fraction=0.25),
            method=common_pb2.FINETUNE_METHOD_LORA,
            lora=common_pb2.LoraConfig(rank=8, num_layers=-1),
            optimizer=const_lr(1e-3),
            # 2 micro-batches of 4 pairs (2 per rank): gradients are averaged once per update.
            loop=loop(6, steps_per_eval=6, grad_accumulation_steps=2),
            beta=0.1,
        )
        with_procs(spec, n, f"dpo{n}")
        job = stub.StartDPO(rlhf_pb2.StartDPORequest(spec=spec), timeout=120).job
        final, events = stubs.wait(job.job_id)
        assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
        curves[n], finals[n] = curve(events), dict(final.result.metrics)
    assert sorted(curves[2]) == list(range(1, 7))
    assert_same_curve(curves[2], curves[1], range(1, 7))
    assert abs(curves[1][6] - curves[1][1]) > 1e-3  # it trained: not a comparison of constants
    # Validation covers both ranks' halves of the 8 held-out pairs.
    for key in ("val_loss", "val_accuracies", "val_margins"):
        assert finals[2][key] == pytest.approx(finals[1][key], abs=TOL), key
    stubs.close()


def test_kd_two_processes_match_one(serve, tiny_model, chat):
    stubs = Stubs(serve("distillation").address)
    stub = distillation_pb2_grpc.DistillationServiceStub(stubs.channel)
    curves = {}
    for n in (1, 2):
        spec = distill_spec(tiny_model, chat)
        spec.loop.max_steps, spec.loop.steps_per_checkpoint = 6, -1
        with_procs(spec, n, f"kd{n}")
        req = distillation_pb2.StartDistillationRequest(spec=spec)
        job = stub.StartDistillation(req, timeout=120).job
        final, events = stubs.wait(job.job_id)
        assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
        curves[n] = curve(events)
    assert sorted(curves[2]) == list(range(1, 7))
    assert_same_curve(curves[2], curves[1], range(1, 7))
    assert abs(curves[1][6] - curves[1][1]) > 1e-3  # it trained: not a comparison of constants
    stubs.close()


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_rollouts_are_sharded_and_reduced_over_ranks(serve, tiny_model, tmp_path, method):
    """Rollouts sharded over 2 ranks: the reported tokens and rewards cover both shares."""
    stubs = Stubs(serve("rlhf").address)
    stub = rlhf_pb2_grpc.RLHFServiceStub(stubs.channel)
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    common = dict(
        policy=common_pb2.ModelRef(model=str(tiny_model)),
        dataset=common_pb2.DatasetRef(path=str(data)),
        reward=rlhf_pb2.RewardSource(reward_function="length"),
        method=common_pb2.FINETUNE_METHOD_LORA,
        optimizer=const_lr(1e-3),
        loop=loop(2, batch_size=4),
        rollout=rlhf_pb2.RolloutConfig(
            batch_size=4, sampling=generation_pb2.SamplingParams(max_tokens=8, temperature=1.0)
        ),
    )
    if method == "ppo":
        spec = rlhf_pb2.PPOSpec(**common, minibatch_size=2, ppo_epochs=1, adaptive_kl=True)
        with_procs(spec, 2, method)
        job, completions = stub.StartPPO(rlhf_pb2.StartPPORequest(spec=spec), timeout=120).job, 4
    else:
        spec = rlhf_pb2.GRPOSpec(**common, group_size=2, beta=0.0)
        with_procs(spec, 2, method)
        job, completions = stub.StartGRPO(rlhf_pb2.StartGRPORequest(spec=spec), timeout=120).job, 8
    final, events = stubs.wait(job.job_id)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    prog = [e.progress for e in events if e.WhichOneof("payload") == "progress"]
    assert [p.step for p in prog] == [1, 2]
    before = 0
    for p in prog:
        # Tokens of all completions of both ranks; the "length" reward is a completion's
        # length without its end token, so its mean over all of them is at most the mean
        # completion length.
        assert p.tokens - before == round(p.metrics["completion_length"] * completions), p
        assert 0 < p.metrics["reward_mean"] <= p.metrics["completion_length"] + 1e-6
        before = p.tokens
    stubs.close()


# ---- a rank killed mid-job ----


def test_killed_rank_is_a_crash_the_job_resumes_from_its_checkpoint(
    serve, tiny_model, chat, reference
):
    stubs = Stubs(serve("training").address)
    job = stubs.start_sft(sft(tiny_model, chat, 2, "killed"))
    saved = wait_for_checkpoint(stubs, job.job_id)
    ranks = rank_pids(job.job_id)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)
    final, events = stubs.wait(job.job_id)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.attempts == 2
    why = reasons(events)
    assert any("rank 1 exited with signal 9 (SIGKILL)" in r for r in why), why
    assert any("resuming from checkpoint step" in r for r in why), why
    second = progress_steps(events, after_seq=running_seqs(events)[1])
    first = second[0]
    assert first > 1 and (first - 1) % EVERY == 0 and first - 1 >= saved, second[:3]
    assert second == list(range(first, STEPS + 1))
    assert_same_curve(curve(events), reference["curve"], second)
    assert_all_exit(job.job_id)
    stubs.close()


def test_killed_rank_on_last_attempt_fails_cleanly_and_one_process_resumes(
    serve, tiny_model, chat, reference
):
    """max_attempts=1: the dead rank fails the job with a reason, nothing is left running;
    a new job on the same output (1 process now) resumes from the 2-process checkpoint."""
    stubs = Stubs(serve("training", max_attempts=1).address)
    job = stubs.start_sft(sft(tiny_model, chat, 2, "resized"))
    saved = wait_for_checkpoint(stubs, job.job_id)
    os.kill(rank_pids(job.job_id)[0], signal.SIGKILL)
    final, _ = stubs.wait(job.job_id)
    assert final.state == common_pb2.JOB_STATE_FAILED
    assert "rank 0 exited with signal 9 (SIGKILL)" in final.error, final.error
    assert "(attempt 1 of 1)" in final.error
    assert_all_exit(job.job_id)

    again = stubs.start_sft(sft(tiny_model, chat, 1, "resized"))
    final, events = stubs.wait(again.job_id)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    steps = progress_steps(events)
    assert steps[0] - 1 >= saved and (steps[0] - 1) % EVERY == 0, steps[:3]
    assert steps == list(range(steps[0], STEPS + 1))
    assert_same_curve(curve(events), reference["curve"], steps)
    stubs.close()


# ---- the runner's side, with the tiny test trainer ----


class Runner:
    def __init__(self, tmp: Path, **settings) -> None:
        self.home = tmp / "home"
        self.settings = Settings(service="training", home=self.home, **settings)
        self.store = JobStore(self.settings.db_path)
        self.runner = JobRunner(self.store, self.settings, poll_s=0.02, rank_grace_s=5)

    def job(self, name: str, **config) -> str:
        config = {"resources": {"num_processes": 2}, **config}
        out = str(self.home / "jobs" / name)
        return self.store.create("sft", testing.TEST_ENTRY, config, out)[0].job_id


async def test_a_rank_that_raises_fails_the_job_without_retry(tmp_path):
    env = Runner(tmp_path)
    job_id = env.job("raises", steps=50, fail_at_step=3)
    await env.runner.submit(job_id)
    job = await env.runner.wait(job_id, timeout=60)
    assert job.state is JobState.FAILED and job.attempts == 1
    assert job.error.startswith("rank 0 of 2 failed: RuntimeError: fail_at_step=3"), job.error
    assert_all_exit(job_id)


async def test_cancel_takes_down_every_rank(tmp_path):
    env = Runner(tmp_path)
    job_id = env.job("cancelled", steps=100_000, step_delay_s=0.02)
    await env.runner.submit(job_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while env.store.get(job_id).step < 3 or len(rank_pids(job_id)) < 2:
        assert loop.time() < deadline, "no progress"
        await asyncio.sleep(0.05)
    await env.runner.cancel(job_id, "test")
    await env.runner.wait(job_id, timeout=30)
    assert env.store.get(job_id).state is JobState.CANCELLED
    while worker_pids(job_id):  # SIGTERM, then SIGKILL after kill_grace_s
        assert loop.time() < deadline + 10, worker_pids(job_id)
        await asyncio.sleep(0.05)


def test_launch_plans(tmp_path):
    env = Runner(tmp_path)
    job = env.store.get(env.job("plan", steps=1))

    def planned(default: str = "", **res):
        res = {"num_processes": 2, **res}
        return plan_hostfile(dataclasses.replace(job, config={"resources": res}), default)

    hosts = [{"ssh": f"mac{i}", "ips": [f"10.0.0.{i}"], "rdma": [None] * 3} for i in range(3)]
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps({"backend": "jaccl", "hosts": hosts}))
    # The service's hostfile, cut to the job's 2 hosts (their RDMA lists too).
    cut = json.loads(Path(planned(str(hostfile))).read_text())
    assert cut["backend"] == "jaccl" and [h["ssh"] for h in cut["hosts"]] == ["mac0", "mac1"]
    assert all(len(h["rdma"]) == 2 for h in cut["hosts"])
    assert planned(str(hostfile), num_processes=3) == str(hostfile)
    with pytest.raises(LaunchError, match="lists 3 hosts; the job asks for 4"):
        planned(str(hostfile), num_processes=4)
    with pytest.raises(LaunchError, match="evenly"):
        planned(hosts=["a", "b"], num_processes=3)
    assert planned() is None
    argv = build_command(job, env.store.db_path, port=40000, remote_env={"MLXU_HOME": "/h"})
    sep = argv.index("--")
    assert argv[3:sep] == [
        "-n", "2", "--starting-port", "40000", "--nccl-port", "40000",
        "--env", "MLXU_DISTRIBUTED=1", "--env", "MLXU_HOME=/h",
    ]  # fmt: skip


def test_describe_ranks():
    killed = "\x1b[33m[WARN] Node with rank 1 exited with code -9 \x1b[0m\n"
    lost = {0: {"state": "exited", "code": 1, "kind": "peer_lost", "reason": "[ring] lost"}}
    what, fatal = describe_ranks({**lost, 1: {"state": "running"}}, 2, killed)
    assert fatal is None
    assert what == "rank 1 exited with signal 9 (SIGKILL); rank(s) 0 lost their peers"
    error = {"state": "exited", "code": 1, "kind": "error", "reason": "ValueError: x", "time": 1}
    _, fatal = describe_ranks({**lost, 1: error}, 2)
    assert fatal == "rank 1 of 2 failed: ValueError: x"
    stopped = {r: {"state": "exited", "code": 75, "kind": "interrupted"} for r in (0, 1)}
    assert describe_ranks(stopped, 2) == ("interrupted", None)
    what, _ = describe_ranks({0: stopped[0]}, 2)
    assert what == "rank 1 never reported (it did not start, or it died at once)"
    what, _ = describe_ranks({0: {"state": "running"}, 1: {}}, 2, killed, "were killed")
    assert what == "rank 1 exited with signal 9 (SIGKILL); rank(s) 0 were killed"


def test_rollout_batches_must_split_evenly_over_processes():
    from services.rlhf.trainers.grpo import GRPOConfig
    from services.rlhf.trainers.ppo import PPOConfig
    from services.runtime.errors import InvalidArgument

    base = {"policy": {"model": "m"}, "reward": {"reward_function": "length"},
            "resources": {"num_processes": 2}}  # fmt: skip
    ppo = {**base, "rollout": {"batch_size": 6}, "minibatch_size": 3}
    with pytest.raises(InvalidArgument) as err:
        PPOConfig.from_dict(ppo, prefix="spec")
    assert [v.field for v in err.value.violations] == ["spec.minibatch_size"]
    grpo = {**base, "rollout": {"batch_size": 3}, "loop": {"batch_size": 4}}
    with pytest.raises(InvalidArgument) as err:
        GRPOConfig.from_dict(grpo, prefix="spec")
    assert [v.field for v in err.value.violations] == ["spec.rollout.batch_size"]
    assert PPOConfig.from_dict({**ppo, "minibatch_size": 2}).resources.num_processes == 2
