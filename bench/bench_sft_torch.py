"""The PyTorch peer of bench_sft.py: the same SFT job with transformers (+ peft for LoRA),
eager and under torch.compile. bench_sft.py runs it (``--peer torch``) as a child process::

    python bench/bench_sft_torch.py --child JOB.json

JOB.json is what bench_sft.py writes: the MLX model directory (its config.json builds a
LlamaForCausalLM; its safetensors, in Hugging Face names, are loaded when they fit, else the
weights stay random), the token sequences both MLX sides trained on (items), batch size,
max_seq_length, warmup / timed steps, learning rate, LoRA settings, dtype, and "side":
"torch-eager" or "torch-compile". Same optimizer (AdamW, constant lr), same loss (masked next
token cross entropy in float32, mean over the tokens that count).

Batches: the rows of each of our trainer's batches in its order (job "order": "ours"), else
as mlx-lm (sort by length, neighbours together, shuffled batch order); every batch padded to
one fixed width (the longest sequence, rounded up to 32) so torch.compile traces one shape.
Imports neither mlx nor services: the GPU machine may have torch alone.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import common

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _groups(items: list, batch: int, seed: int):
    """mlx-lm's order: sorted by length, neighbours batched, batches shuffled; endless."""
    import numpy as np

    by_len = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    groups = [by_len[i : i + batch] for i in range(0, len(by_len) - batch + 1, batch)]
    rng = np.random.default_rng(seed)
    while True:
        for g in rng.permutation(len(groups)):
            yield groups[g]


def _batches(items: list, groups, batch: int, pad_id: int):
    """(inputs, targets, mask, ntargets) on the CPU, all padded to one fixed width."""
    import numpy as np

    longest = max(len(t) for t, _ in items)
    width = 32 * math.ceil((longest - 1) / 32)
    for rows in groups:
        toks = np.full((batch, width + 1), pad_id, np.int64)
        mask = np.zeros((batch, width), np.float32)
        for r, i in enumerate(rows):
            t, prompt_len = items[i]
            toks[r, : len(t)] = t
            mask[r, max(prompt_len, 1) - 1 : len(t) - 1] = 1.0
        yield toks[:, :-1], toks[:, 1:], mask, int(mask.sum())


def _model(job: dict, torch, device: str, dtype) -> tuple[Any, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = Path(job["model"])
    raw = json.loads((model_dir / "config.json").read_text())
    drop = ("quantization", "quantization_config", "torch_dtype", "dtype")
    config = LlamaConfig(**{k: v for k, v in raw.items() if k not in drop})
    config._attn_implementation = "sdpa"
    config.use_cache = False
    torch.manual_seed(job["seed"])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    weights = "random"
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        state: dict[str, Any] = {}
        for f in files:
            state.update(load_file(str(f)))
        own = model.state_dict()
        fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = [k for k in own if k not in fits and not k.endswith("lm_head.weight")]
        if fits and not missing:
            model.load_state_dict({k: v.to(dtype) for k, v in fits.items()}, strict=False)
            if config.tie_word_embeddings:
                model.tie_weights()
            weights = "converted"
    return model, weights


def _lora(model, job: dict, n_layers: int):
    from peft import LoraConfig, get_peft_model

    lora = job["lora"]
    k = n_layers if lora["num_layers"] == -1 else min(lora["num_layers"], n_layers)
    keys = [key.split(".")[-1] for key in lora.get("keys") or []] or list(LORA_TARGETS)
    cfg = LoraConfig(
        r=lora["rank"],
        lora_alpha=lora["scale"] * lora["rank"],  # peft scales by alpha / r; mlx-lm by scale
        lora_dropout=lora["dropout"],
        target_modules=keys,
        layers_to_transform=list(range(n_layers - k, n_layers)),
        layers_pattern="layers",
        bias="none",
    )
    return get_peft_model(model, cfg)


def _blas(torch, device: str) -> str:
    if device == "cuda":
        return f"cuBLAS (CUDA {torch.version.cuda})"
    for line in torch.__config__.show().splitlines():
        if "BLAS_INFO" in line:
            return "torch " + line.split("BLAS_INFO=")[-1].split(",")[0]
    return "torch CPU"


def run(job: dict) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(job["dtype"], torch.float32)
    model, weights = _model(job, torch, device, dtype)
    n_layers = model.config.num_hidden_layers
    if job["method"] == "full":
        model.requires_grad_(True)
    else:
        model = _lora(model, job, n_layers)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=job["lr"], weight_decay=job["weight_decay"], fused=device == "cuda"
    )

    def loss_fn(inputs, targets, mask):
        logits = model(input_ids=inputs).logits
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        return (ce * mask.flatten()).sum() / mask.sum().clamp(min=1.0)

    compiled = job["side"] == "torch-compile"
    step_loss = torch.compile(loss_fn) if compiled else loss_fn

    saved = json.loads(Path(job["items"]).read_text())
    items = saved["items"]
    ours = job.get("order") == "ours" and saved.get("order")
    groups = iter(saved["order"]) if ours else _groups(items, job["batch"], job["seed"])
    pad_id = int(json.loads((Path(job["model"]) / "config.json").read_text()).get("pad_token_id")
                 or 0)  # fmt: skip
    data = _batches(items, groups, job["batch"], pad_id)
    warmup, total = job["warmup"], job["warmup"] + job["steps"]
    clock = common.StepClock(warmup)
    tokens = target = 0
    cpu = {}
    losses: dict[int, float] = {}
    peak_before = 0.0
    shapes = set()
    for step in range(1, total + 1):
        inputs, targets, mask, ntok = next(data)
        batch = [torch.from_numpy(a).to(device, non_blocking=True) for a in (inputs, targets, mask)]
        opt.zero_grad(set_to_none=True)
        loss = step_loss(*batch)
        loss.backward()
        opt.step()
        losses[step] = loss.item()  # waits for the step, as mx.eval / .item() on the MLX sides
        clock.mark(step)
        cpu[step] = time.process_time()
        if step > warmup:
            tokens += inputs.size
            target += ntok
            shapes.add(f"{inputs.shape[0]}x{inputs.shape[1]}")
        if step == warmup and device == "cuda":
            peak_before = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()
    timing = clock.summary()
    secs = timing["seconds"] or float("nan")
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    return {
        **timing,
        "target_tokens": target,
        "total_tokens": tokens,
        "target_tps": target / secs,
        "total_tps": tokens / secs,
        "cpu_s_per_step": (cpu[total] - cpu[warmup]) / max(total - warmup, 1),
        "shapes": sorted(shapes),
        "loss_first": losses[1],
        "loss_last": losses[total],
        "peak_train_gb": peak,
        "peak_all_gb": max(peak_before, peak) if peak is not None else None,
        "weights": weights,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "blas": _blas(torch, device),
        "torch": torch.__version__,
        "trainable": sum(p.numel() for p in params),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--child", type=Path, required=True, help="job file written by bench_sft.py")
    job = json.loads(p.parse_args(argv).child.read_text())
    out: dict[str, Any] = {"side": job["side"]}
    try:
        out.update(run(job))
    except ImportError as exc:
        out["error"] = f"PyTorch peer unavailable ({exc}); install torch, transformers, peft"
    except Exception as exc:  # noqa: BLE001 - the parent reports it in the table
        import traceback

        traceback.print_exc()
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["rss_gb"] = common.max_rss_gb()
    Path(job["result"]).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
