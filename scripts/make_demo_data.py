"""Write the demo datasets about this platform:

examples/data/mlxu_faq/{train,valid}.jsonl        chat rows (SFT)
examples/data/mlxu_faq_prefs/{train,valid}.jsonl  preference rows (DPO): the chosen answer
                                                  is the right one, the rejected one is the
                                                  answer to a different question

Each fact is asked several ways; some phrasings of every fact are held out for validation,
so validation loss measures whether the model learned the facts, not the exact questions.

    uv run python scripts/make_demo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "You are the MLX Unified Training assistant. Answer briefly and precisely."

FACTS = [
    (
        [
            "Which port does the training service listen on?",
            "What is the training service's port?",
            "On what port can I reach the core training service?",
            "Training service port?",
        ],
        "The training service listens on port 8500.",
    ),
    (
        [
            "Which port does the orchestrator use?",
            "What port is the orchestrator on?",
            "Where does the orchestrator listen?",
            "Orchestrator port?",
        ],
        "The orchestrator listens on port 8600.",
    ),
    (
        [
            "Which port does the distillation service use?",
            "What is the distillation port?",
            "Where can I reach the distillation service?",
            "Distillation service port?",
        ],
        "The distillation service listens on port 8300.",
    ),
    (
        [
            "Which port does the RLHF service use?",
            "What port is RLHF on?",
            "Where does the RLHF service listen?",
            "RLHF service port?",
        ],
        "The RLHF service listens on port 8400.",
    ),
    (
        [
            "How do I send my API key?",
            "Where does the API key go?",
            "How do I authenticate to a service?",
            "Which header carries the API key?",
        ],
        "Send it in the gRPC metadata key x-api-key.",
    ),
    (
        [
            "Where is my data stored?",
            "Which directory holds jobs and checkpoints?",
            "How do I change the data directory?",
            "What sets the data dir?",
        ],
        "Everything lives under MLXU_HOME, which defaults to ~/.mlxu.",
    ),
    (
        [
            "How do I start every service at once?",
            "What command runs all services locally?",
            "How can I launch the whole platform?",
            "Start all services?",
        ],
        "Run mlxu up to start all four services locally.",
    ),
    (
        [
            "How do I follow a job's progress?",
            "How can I watch a running job?",
            "How do I stream a job's events?",
            "Watch a job?",
        ],
        "Run mlxu jobs watch JOB_ID, which streams its events live.",
    ),
    (
        [
            "How do I stop a running job?",
            "How can I cancel training?",
            "What cancels a job?",
            "Cancel a job?",
        ],
        "Run mlxu jobs cancel JOB_ID; the worker process is stopped at once.",
    ),
    (
        [
            "What happens if the service restarts during training?",
            "Do I lose my job if the server crashes?",
            "Is a job resumed after a restart?",
            "What about a crash mid-job?",
        ],
        "The job resumes from its last checkpoint; nothing is lost.",
    ),
    (
        [
            "What is QLoRA here?",
            "How does QLoRA work in this platform?",
            "Which base does QLoRA train on?",
            "Explain QLoRA briefly.",
        ],
        "QLoRA trains LoRA adapters on a 4-bit or 8-bit quantized, frozen base model.",
    ),
    (
        [
            "Which optimizers can I use?",
            "What optimizers are supported?",
            "Can I pick the optimizer?",
            "List the optimizers.",
        ],
        "AdamW, Adam, SGD, Adafactor, Lion and Muon.",
    ),
    (
        [
            "What does a DPO stage use as its reference?",
            "Which reference model does DPO get?",
            "Is the DPO reference the base model?",
            "DPO reference?",
        ],
        "The DPO reference is the stage's input checkpoint, never silently the base model.",
    ),
    (
        [
            "What format are checkpoints in?",
            "Can mlx_lm load my checkpoint?",
            "How are checkpoints saved?",
            "Checkpoint format?",
        ],
        "Checkpoints are mlx-lm directories, so mlx_lm.load opens them directly.",
    ),
    (
        [
            "What is the default model?",
            "Which model does the quick start train?",
            "Which pretrained model ships offline?",
            "Default model?",
        ],
        "The default model is SmolLM2-135M-Instruct.",
    ),
    (
        [
            "How do I run a pipeline from a template?",
            "How do I use the chatbot template?",
            "How do templates work?",
            "Create a pipeline from a template?",
        ],
        "Run mlxu pipeline create --template chatbot, then mlxu pipeline run.",
    ),
]


def main() -> None:
    rng = random.Random(7)
    train, valid = [], []
    for questions, answer in FACTS:
        qs = list(questions)
        rng.shuffle(qs)
        for i, q in enumerate(qs):
            row = {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": answer},
                ]
            }
            (valid if i == 0 else train).append(row)
    rng.shuffle(train)
    out = Path(__file__).resolve().parent.parent / "examples" / "data" / "mlxu_faq"
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("valid", valid)):
        with open(out / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"{len(train)} train, {len(valid)} valid rows -> {out}")
    held_out = {r["messages"][1]["content"] for r in valid}
    write_preferences(rng, out.parent / "mlxu_faq_prefs", held_out)


def write_preferences(rng: random.Random, out: Path, held_out: set[str]) -> None:
    """The same questions held out as for SFT, so the demo's held-out question is unseen."""
    train, valid = [], []
    for i, (questions, answer) in enumerate(FACTS):
        for q in questions:
            wrong = FACTS[(i + 1 + rng.randrange(len(FACTS) - 1)) % len(FACTS)][1]
            row = {
                "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                "chosen": answer,
                "rejected": wrong,
            }
            (valid if q in held_out else train).append(row)
    rng.shuffle(train)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("valid", valid)):
        with open(out / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"{len(train)} train, {len(valid)} valid preference rows -> {out}")


if __name__ == "__main__":
    main()
