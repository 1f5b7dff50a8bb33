"""Rollout throughput: local batched sampling vs our GenerationService (grpc SampleTokens, the
training service in its own process) vs mlx_lm.server (openai completions), on the same
LoRA policy of a real model, plus the log-prob gap each backend leaves against the trainer's
own recomputed log-probs (what PPO / GRPO train on).

    uv run python bench/bench_remote_rollout.py --part rollout [--model smollm2-135m-instruct]
        [--prompts 8] [--group 2] [--max-tokens 32] [--repeats 2]

Writes bench/results/remote-rollout-<host>-<date>.{json,md}. Each backend gets one untimed
warm-up batch (model load, first compile), then ``--repeats`` timed batches; "cold" is the
first batch after a new policy version (the server loads the new adapter directory).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import services  # noqa: F401  (OpenBLAS before mlx)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROMPTS = [
    "Write one sentence about the sea.",
    "Describe a rainy morning in a city.",
    "What makes a good cup of tea?",
    "Give me a short review of a film you liked.",
    "Explain why the sky is blue, briefly.",
    "Name three things to pack for a hike.",
    "Tell me about a quiet village.",
    "What is a pleasant way to spend Sunday?",
]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, timeout: float = 180) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)  # polling a starting server
    raise RuntimeError(f"{what} did not come up in {timeout} s")


def _spawn(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    f = open(log, "wb")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(cmd, env=env, stdout=f, stderr=f, start_new_session=True)


def _fp32_copy(src: str, dst: Path) -> str:
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from services.runtime.models import load_model

    model, _ = load_model(src, dtype="float32")
    dst.mkdir(parents=True)
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())))
    for f in Path(src).iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float32"}))
    return str(dst)


def _gap(policy, rows: list[list[int]], got, temp: float) -> dict[str, float]:  # noqa: ANN001
    import mlx.core as mx

    from services.rlhf.trainers import pad_id
    from services.rlhf.trainers.losses import token_logps
    from services.rlhf.trainers.rollout import Rollout, Sampled, completion_logits, pack
    from services.rlhf.trainers.rollout import rollout_metrics as metrics

    batch = pack(rows, got.completion_ids, pad_id(policy.tokenizer))
    lg = completion_logits(policy.model(batch["inputs"]), batch, temp)
    rec = token_logps(lg, batch["tokens"])
    mx.eval(rec)
    ro = Rollout(rows, got.completion_ids, got.logprobs, got.finished)
    s = Sampled(batch, [], [], [], 0.0, ro, got.version)
    m = metrics(s, got.version, rec)
    return {
        "logprob_gap": m["rollout_logprob_gap"],
        "logprob_gap_max": m["rollout_logprob_gap_max"],
    }


def _measure(name: str, backend, policy, prompts, a, versions) -> dict:  # noqa: ANN001
    import mlx.core as mx

    key = mx.random.key(0)
    rows = [p for p in prompts for _ in range(a.group)]
    backend.sample(prompts, a.group, key, 0)  # warm-up: load, compile
    times, toks, got = [], 0, None
    for r in range(a.repeats):
        t = time.perf_counter()
        got = backend.sample(prompts, a.group, mx.random.key(r + 1), 0)
        times.append(time.perf_counter() - t)
        toks += sum(len(c) for c in got.completion_ids)
    row = {
        "backend": name,
        "completions": len(rows),
        "tokens": toks,
        "seconds": round(sum(times), 3),
        "tokens_per_s": round(toks / sum(times), 1),
        **{k: float(f"{v:.3g}") for k, v in _gap(policy, rows, got, a.temperature).items()},
    }
    row["gap_mean"] = f"{row['logprob_gap']:.1e}"  # the markdown table's (tiny) figures
    row["gap_max"] = f"{row['logprob_gap_max']:.1e}"
    if versions is not None:  # a new version: written, then loaded by the server
        t = time.perf_counter()
        got = backend.sample(prompts, a.group, mx.random.key(99), 1)
        row["cold_batch_s"] = round(time.perf_counter() - t, 3)
        row["cold_tokens_per_s"] = round(
            sum(len(c) for c in got.completion_ids) / row["cold_batch_s"], 1
        )
        t = time.perf_counter()
        versions.write(2)
        row["version_write_s"] = round(time.perf_counter() - t, 3)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--part", default="rollout", choices=["rollout"])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backends", default="local,grpc,openai")
    a = ap.parse_args()

    from services.rlhf.trainers import load_policy
    from services.rlhf.trainers.policy_versions import PolicyVersions
    from services.rlhf.trainers.rollout_backends import (
        GrpcBackend,
        LocalBackend,
        OpenAIBackend,
    )
    from services.runtime.models import resolve_model
    from services.runtime.settings import Settings
    from services.schema.common import LoraSettings, ModelSettings, RemoteSettings
    from services.schema.rollouts import RolloutSampling

    s = Settings.from_env("rlhf")
    src = common.local_model(a.model) or str(resolve_model(a.model, s.home, s.allowed_roots))
    work = tempfile.TemporaryDirectory(dir=s.home)
    # Every side samples fp32 weights: mlx_lm.server would serve the fp16 files as they are
    # (slow on a CPU, and a different distribution from the trainer's fp32 policy).
    model_dir = _fp32_copy(src, Path(work.name) / "base-fp32")
    policy = load_policy(ModelSettings(model=model_dir), "lora", LoraSettings(), "float32")
    tok = policy.tokenizer
    prompts = [
        list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
        for p in (PROMPTS * 8)[: a.prompts]
    ]
    sampling = RolloutSampling(temperature=a.temperature, max_tokens=a.max_tokens)
    uptime = Path("/proc/loadavg").read_text().split()[:3]
    rows, procs = [], []
    with work as tmp:
        out = Path(tmp)
        env = {**os.environ, "MLXU_HOME": str(out / "home"), "MLXU_RATE_GENERATE_PER_MIN": "0"}
        env["MLXU_ALLOWED_ROOTS"] = os.pathsep.join([str(out), model_dir, str(s.home)])
        env.pop("MLXU_API_KEYS", None)
        try:
            for name in a.backends.split(","):
                if name == "local":
                    local = LocalBackend(policy, sampling)
                    rows.append(_measure(name, local, policy, prompts, a, None))
                    continue
                port = _free_port()
                versions = PolicyVersions(out / name, policy, 1)  # steps 0, 1, 2 for each
                if name == "grpc":
                    cmd = [sys.executable, "-m", "services.runtime.rpc.server", "training"]
                    cmd += ["--port", str(port), "--home", str(out / "home")]
                    procs.append(_spawn(cmd, env, out / "grpc.log"))
                    remote = RemoteSettings(address=f"127.0.0.1:{port}", kind="grpc")
                    # No wait: the warm-up call retries (with_retry) until it listens.
                    backend = GrpcBackend(remote, policy, sampling, versions)
                else:
                    cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", model_dir]
                    cmd += ["--host", "127.0.0.1", "--port", str(port)]
                    procs.append(_spawn(cmd, env, out / "openai.log"))
                    url = f"http://127.0.0.1:{port}"
                    _wait(lambda u=url: urllib.request.urlopen(f"{u}/health", timeout=2), "mlx_lm")
                    remote = RemoteSettings(address=f"{url}/v1", kind="openai")
                    backend = OpenAIBackend(remote, policy, sampling, versions)
                rows.append(_measure(name, backend, policy, prompts, a, versions))
        finally:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    end = Path("/proc/loadavg").read_text().split()[:3]
    info = common.machine({"loadavg_start": uptime, "loadavg_end": end, "model": a.model})
    settings = {
        "prompts": a.prompts,
        "group": a.group,
        "max_tokens": a.max_tokens,
        "temperature": a.temperature,
        "repeats": a.repeats,
        "dtype": "float32",
        "method": "lora",
    }
    columns = [
        ("backend", "backend"),
        ("tokens_per_s", "tokens/s (warm)"),
        ("cold_tokens_per_s", "tokens/s (new version)"),
        ("version_write_s", "version write s"),
        ("gap_mean", "mean |Δ logp|"),
        ("gap_max", "max |Δ logp|"),
    ]
    notes = [
        "grpc: the training service's SampleTokens in its own process (same batched sampler).",
        "openai: mlx_lm.server, one request per completion (no n, seeded requests are not "
        "batched), prompts sent as text and re-tokenised by the server.",
        "logprob gap: backend log-probs vs the trainer's full-forward recomputation.",
    ]
    _, md_path, md = common.write_results(
        "remote-rollout", rows, columns, info, settings=settings, notes=notes
    )
    print(md)


if __name__ == "__main__":
    main()
