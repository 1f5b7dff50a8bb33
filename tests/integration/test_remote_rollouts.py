"""Remote rollouts (issue 15) with two real processes: PPO / GRPO here, their rollouts sampled
by the training service's GenerationService (SampleTokens) in another process, or by a real
mlx_lm.server. The policy reaches the server only as a checkpoint directory per version.

With the same seed the remote sampler runs the same code on the same weights, so grpc
rollouts are bitwise the local ones and the runs' losses and rewards are identical."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from services.runtime import checkpoints
from services.runtime.contract import Interrupted, JobContext
from tests.conftest import free_port, write_jsonl

WORDS = ["rain", "tea", "bread", "music", "books", "roads", "hills", "sun"]
KEY_ENV = "MLXU_TEST_ROLLOUT_KEY"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:  # noqa: ANN001
    rows = [{"prompt": f"Say something about {w}."} for w in WORDS]
    return write_jsonl(tmp_path_factory.mktemp("rl-prompts") / "prompts.jsonl", rows)


def _ctx(out: Path, reports: list, stop_after: int | None = None) -> JobContext:
    ctx = JobContext(job_id="test", output_dir=out, report=reports.append)
    ctx.log = lambda _m: None
    ctx.should_stop = lambda: stop_after is not None and len(reports) >= stop_after
    ctx.resume_from = checkpoints.latest(out)
    return ctx


def _cfg(model: Path, prompts: Path, remote: dict | None = None, **kw) -> dict:  # noqa: ANN003
    cfg = {
        "policy": {"model": str(model)},
        "dataset": {"path": str(prompts)},
        "reward": {"reward_function": "contains:e"},  # about half the samples: signal
        "method": "lora",
        "lora": {"rank": 4},
        "optimizer": {"learning_rate": 1e-2, "schedule": "constant"},
        "rollout": {"batch_size": 4, "sampling": {"max_tokens": 8}, "remote": remote or {}},
        "loop": {"max_steps": 4, "steps_per_report": 1, "steps_per_checkpoint": 100, "seed": 3},
    }
    cfg.update(kw)
    return cfg


def _run(
    trainer: str, cfg: dict, out: Path, reports: list | None = None, stop_after: int | None = None
) -> list:
    from services.rlhf.trainers import grpo, ppo

    reports = [] if reports is None else reports
    (grpo if trainer == "grpo" else ppo).run(cfg, _ctx(out, reports, stop_after))
    return reports


@pytest.fixture
def generation_server(service_process, monkeypatch):  # noqa: ANN001, ANN201
    """The training service (which serves GenerationService) in its own process, with an
    API key; the trainer finds the key in KEY_ENV."""
    sp = service_process("training")
    sp.env = {**sp.env, "MLXU_API_KEYS": "rollout-key", "MLXU_RATE_GENERATE_PER_MIN": "0"}
    monkeypatch.setenv(KEY_ENV, "rollout-key")
    return sp.start()


def _same(a: list, b: list, keys: tuple[str, ...]) -> None:
    assert [r.step for r in a] == [r.step for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k in keys:
            assert ra.metrics[k] == rb.metrics[k], (ra.step, k, ra.metrics[k], rb.metrics[k])


@pytest.mark.parametrize("trainer", ["grpo", "ppo"])
def test_grpc_rollouts_train_exactly_as_local_ones(
    trainer, generation_server, tiny_model, prompts, tmp_path
) -> None:  # noqa: ANN001
    remote = {"address": generation_server.address, "api_key_env": KEY_ENV}
    extra = {"group_size": 4} if trainer == "grpo" else {"minibatch_size": 2, "ppo_epochs": 2}
    t = time.monotonic()
    local = _run(trainer, _cfg(tiny_model, prompts, **extra), tmp_path / "local")
    t_local = time.monotonic() - t
    t = time.monotonic()
    far = _run(trainer, _cfg(tiny_model, prompts, remote, **extra), tmp_path / "remote")
    t_remote = time.monotonic() - t
    print(f"{trainer}: local {t_local:.1f} s, grpc {t_remote:.1f} s")
    _same(local, far, ("loss", "reward_mean", "completion_length", "entropy"))
    assert any(r.metrics["loss"] != 0 for r in far)  # the policy moved: versions differ
    for r in far:
        assert r.metrics["rollout_version_lag"] == 0.0
        # fp32 on the CPU: the server's KV-cached decode vs the trainer's full forward.
        assert r.metrics["rollout_logprob_gap"] < 1e-4, r.metrics
    versions = sorted(p.name for p in (tmp_path / "remote" / "policy").iterdir())
    assert versions == ["step_0000002", "step_0000003"]  # the newest two are kept
    assert (tmp_path / "remote" / "policy" / versions[-1] / "adapters.safetensors").is_file()


def test_a_wrong_key_is_refused_without_retries(generation_server, tiny_model, prompts, tmp_path):  # noqa: ANN001
    import grpc

    os.environ[KEY_ENV] = "not-the-key"
    remote = {"address": generation_server.address, "api_key_env": KEY_ENV}
    t = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        _run("grpo", _cfg(tiny_model, prompts, remote, group_size=2), tmp_path / "k")
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert time.monotonic() - t < 30


def test_an_unreachable_server_fails_the_job_with_the_reason(tiny_model, prompts, tmp_path):  # noqa: ANN001
    from services.runtime.remote import RemoteUnavailable

    dead = f"127.0.0.1:{free_port()}"
    remote = {"address": dead, "retry_deadline_seconds": 2, "timeout_seconds": 1}
    t = time.monotonic()
    with pytest.raises(RemoteUnavailable, match=f"rollout: {dead} unreachable for 2 s") as e:
        _run("grpo", _cfg(tiny_model, prompts, remote, group_size=2), tmp_path / "dead")
    assert e.value.reason == "REMOTE_UNAVAILABLE"
    assert 2 <= time.monotonic() - t < 30


def test_resume_reuses_the_due_policy_version(generation_server, tiny_model, prompts, tmp_path):  # noqa: ANN001
    """sync_every 2: a run stopped after step 3 resumes at step 3, whose rollouts come from
    version 2 (still on disk), so it matches the uninterrupted run exactly."""
    remote = {"address": generation_server.address, "api_key_env": KEY_ENV}
    cfg = _cfg(tiny_model, prompts, remote, group_size=4)
    cfg["rollout"] = {**cfg["rollout"], "sync_every": 2, "max_staleness": 1}
    cfg["loop"] = {**cfg["loop"], "max_steps": 5, "steps_per_checkpoint": 1}
    whole = _run("grpo", cfg, tmp_path / "a")
    assert [r.metrics["rollout_version_lag"] for r in whole] == [0, 1, 0, 1, 0]
    parts: list = []
    with pytest.raises(Interrupted):
        _run("grpo", cfg, tmp_path / "b", parts, stop_after=2)
    assert [r.step for r in parts] == [1, 2, 3]  # stopped with a checkpoint at step 3
    due = tmp_path / "b" / "policy" / "step_0000002" / "adapters.safetensors"
    written = due.stat().st_mtime_ns
    _run("grpo", cfg, tmp_path / "b", parts)
    assert due.stat().st_mtime_ns == written  # reused, not rewritten from step 3's weights
    _same(whole, parts, ("loss", "reward_mean", "rollout_version_lag"))


@pytest.fixture
def mlx_lm_server(tiny_model, home):  # noqa: ANN001, ANN201
    """A real mlx_lm.server (ships with mlx-lm) on loopback serving the tiny model."""
    port = free_port()
    log = open(home / "mlx_lm_server.log", "wb")  # noqa: SIM115 - closed at teardown
    cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(tiny_model)]
    proc = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if json.loads(r.read()).get("status") == "ok":
                    break
        except OSError:
            time.sleep(0.2)  # waiting for the server to listen, not faking work
    else:
        raise RuntimeError((home / "mlx_lm_server.log").read_text()[-2000:])
    yield f"{url}/v1"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()


@pytest.mark.parametrize("trainer", ["grpo", "ppo"])
def test_rollouts_from_a_real_mlx_lm_server(trainer, mlx_lm_server, tiny_model, prompts, tmp_path):  # noqa: ANN001
    """Looser than grpc: mlx_lm.server samples with its own sampler (one request per
    completion, re-tokenised text prompts), so rollouts differ from local ones. What must
    hold: the job trains on the server's tokens, each version's adapter reaches the server
    by path (``adapters``), and its log-probs agree with the trainer's recomputed ones."""
    remote = {"kind": "openai", "address": mlx_lm_server}
    extra = {"group_size": 2} if trainer == "grpo" else {"minibatch_size": 2, "ppo_epochs": 2}
    cfg = _cfg(tiny_model, prompts, remote, **extra)
    cfg["loop"] = {**cfg["loop"], "max_steps": 3}
    t = time.monotonic()
    reports = _run(trainer, cfg, tmp_path / "openai")
    print(f"{trainer} via mlx_lm.server: {time.monotonic() - t:.1f} s")
    assert [r.step for r in reports] == [1, 2, 3]
    for r in reports:
        m = r.metrics
        assert np.isfinite(m["loss"]) and m["completion_length"] > 0
        assert m["rollout_version_lag"] == 0.0
        # Temperature 1: mlx_lm's log-probs are the same distribution; the prompt may be
        # re-tokenised differently, which this gap would show.
        assert m["rollout_logprob_gap"] < 1e-3, m
    # The gap is that small only because each version's adapter was applied: the newest
    # version and the bare base answer the same seeded request differently.
    newest = sorted((tmp_path / "openai" / "policy").iterdir())[-1]
    body = {"model": str(tiny_model), "prompt": "Say something about tea.", "max_tokens": 4}
    body.update(temperature=1.0, logprobs=True, seed=11)
    base = _post(f"{mlx_lm_server}/completions", body)
    tuned = _post(f"{mlx_lm_server}/completions", {**body, "adapters": str(newest)})
    assert _lps(base) != _lps(tuned)


def _post(url: str, body: dict) -> dict:
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _lps(answer: dict) -> list[float]:
    return [t["logprob"] for t in answer["choices"][0]["logprobs"]["content"]]


def _grpo_job(model: Path, data: Path, remote, steps: int, method=None):  # noqa: ANN001, ANN202
    from mlx_unified.v1 import common_pb2, generation_pb2, rlhf_pb2

    return rlhf_pb2.StartGRPORequest(
        spec=rlhf_pb2.GRPOSpec(
            policy=common_pb2.ModelRef(model=str(model)),
            dataset=common_pb2.DatasetRef(path=str(data)),
            reward=rlhf_pb2.RewardSource(reward_function="contains:e"),
            method=method or common_pb2.FINETUNE_METHOD_FULL,
            optimizer=common_pb2.OptimizerConfig(
                learning_rate=1e-3, schedule=common_pb2.LR_SCHEDULE_CONSTANT
            ),
            loop=common_pb2.LoopConfig(
                batch_size=8, max_steps=steps, steps_per_report=1, steps_per_checkpoint=2
            ),
            rollout=rlhf_pb2.RolloutConfig(
                batch_size=4,
                sampling=generation_pb2.SamplingParams(max_tokens=8),
                remote=remote,
            ),
            group_size=2,
        )
    )


def test_a_grpo_job_with_full_weights_resumes_after_kill9_on_the_same_backend(
    serve, generation_server, tiny_model, prompts
) -> None:  # noqa: ANN001
    """Through the RLHF service: full fine-tuning (each version a full model directory),
    rollouts from the other process; the worker is killed after its first checkpoint and
    the second attempt continues with the stored remote spec."""
    from mlx_unified.v1 import common_pb2, rlhf_pb2_grpc
    from tests.integration.helpers import Stubs
    from tests.integration.test_resume import worker_pids

    stubs = Stubs(serve("rlhf").address)
    stub = rlhf_pb2_grpc.RLHFServiceStub(stubs.channel)
    remote = common_pb2.RemoteBackend(address=generation_server.address, api_key_env=KEY_ENV)
    job = stub.StartGRPO(_grpo_job(tiny_model, prompts, remote, 5), timeout=120).job
    for resp in stubs.watch(job.job_id):
        if resp.event.WhichOneof("payload") == "checkpoint":
            break
    for pid in worker_pids(job.job_id):
        os.kill(pid, signal.SIGKILL)
    final, events = stubs.wait(job.job_id)
    stubs.close()
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.attempts == 2
    steps = [e.progress.step for e in events if e.WhichOneof("payload") == "progress"]
    assert steps[-1] == 5 and steps.count(1) == 1
    lags = [e.progress.metrics["rollout_version_lag"] for e in events if e.progress.metrics]
    assert set(lags) == {0.0}
    assert final.metrics["rollout_logprob_gap"] < 1e-4
    versions = sorted((Path(final.output_dir) / "policy").iterdir())
    assert [v.name for v in versions] == ["step_0000003", "step_0000004"]
    assert (versions[-1] / "config.json").is_file()  # full weights, loadable by mlx-lm


def test_a_job_whose_rollout_server_is_down_fails_with_the_reason(
    serve, tiny_model, prompts
) -> None:  # noqa: ANN001
    from mlx_unified.v1 import common_pb2, rlhf_pb2_grpc
    from tests.integration.helpers import Stubs

    stubs = Stubs(serve("rlhf").address)
    stub = rlhf_pb2_grpc.RLHFServiceStub(stubs.channel)
    dead = common_pb2.RemoteBackend(address=f"127.0.0.1:{free_port()}", retry_deadline_seconds=1)
    job = stub.StartGRPO(_grpo_job(tiny_model, prompts, dead, 2), timeout=120).job
    final, _ = stubs.wait(job.job_id)
    stubs.close()
    assert final.state == common_pb2.JOB_STATE_FAILED
    assert final.error.startswith("RemoteUnavailable (REMOTE_UNAVAILABLE): rollout: ")
    assert "unreachable for 1 s" in final.error


def test_grpc_rollouts_over_tls(service_process, tiny_model, prompts, tmp_path) -> None:  # noqa: ANN001
    """A server with a (self-signed) certificate: remote.tls_ca verifies it."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    sp = service_process("training")
    sp.env = {**sp.env, "MLXU_TLS_CERT": str(cert), "MLXU_TLS_KEY": str(key)}
    sp.env["MLXU_RATE_GENERATE_PER_MIN"] = "0"
    _start_tls(sp, cert)
    remote = {"address": sp.address, "tls_ca": str(cert)}
    cfg = _cfg(tiny_model, prompts, remote, group_size=2)
    cfg["loop"] = {**cfg["loop"], "max_steps": 2}
    reports = _run("grpo", cfg, tmp_path / "tls")
    assert [r.metrics["rollout_version_lag"] for r in reports] == [0.0, 0.0]
    assert reports[-1].metrics["rollout_logprob_gap"] < 1e-4


def _start_tls(sp, cert: Path, timeout: float = 60) -> None:  # noqa: ANN001
    """ServiceProcess.start probes health in plaintext; this one over TLS."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cmd = [sys.executable, "-m", "services.runtime.rpc.server", sp.service]
    cmd += ["--port", str(sp.port), "--home", str(sp.home)]
    with open(sp.log, "ab") as log:
        sp.proc = subprocess.Popen(cmd, env=sp.env, stdout=log, stderr=log, start_new_session=True)
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    deadline = time.monotonic() + timeout
    with grpc.secure_channel(sp.address, creds) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            assert sp.proc.poll() is None, sp.log.read_text()[-2000:]
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                return
            except grpc.RpcError:
                time.sleep(0.2)  # waiting for the server to listen
    raise RuntimeError(sp.log.read_text()[-2000:])
