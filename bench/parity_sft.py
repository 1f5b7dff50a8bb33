"""SFT parity: our trainer (services.training.trainers.sft) against transformers + peft +
torch.optim on the same weights, batches and hyperparameters.

    uv run python bench/parity_sft.py                       # every case, CPU fp32
    uv run python bench/parity_sft.py --only sft_lora --write-curves
    python3 bench/parity_sft.py --device gpu --dtype bfloat16 --out $OUT   # GPU machine

The reference: ``LlamaForCausalLM`` loaded from the same directory, peft ``LoraConfig`` (r,
``lora_alpha = scale * r``, every linear layer of every block, dropout 0, ``use_dora``) with
our initial A matrices copied in (B = 0 on both sides; DoRA's magnitude starts as the row
norms on both), transformers' own causal-LM loss (``ForCausalLMLoss`` with
``num_items_in_batch``, i.e. HF Trainer's token-weighted mean over the accumulated
micro-batches), ``torch.optim.AdamW``, ``clip_grad_norm_`` and a transformers LR scheduler.
QLoRA: the same LoRA on a base whose weights are our dequantized 4-bit weights (bitsandbytes'
NF4 is another quantizer; what is compared is the training on a quantized base).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import parity_common as pc

TRAINER = "services.training.trainers.sft:run"
DATA = pc.DATA_DIR / "sft_completion.jsonl"
LORA_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base_config(steps: int, dtype: str) -> dict[str, Any]:
    return {
        "model": {"model": pc.rel(pc.model_dir())},
        "dataset": {"path": pc.rel(DATA), "valid_fraction": 0.0},
        "method": "lora",
        "lora": {"rank": 8, "alpha": 16.0, "num_layers": -1},
        "optimizer": {
            "name": "adamw",
            "learning_rate": 1e-2,
            "weight_decay": 0.01,
            "schedule": "cosine",
            "warmup_steps": 3,
            "grad_clip_norm": 1.0,
        },
        "loop": {
            "batch_size": 4,
            "max_steps": steps,
            "max_seq_length": 128,
            "steps_per_report": 1,
            "steps_per_eval": -1,
            "steps_per_checkpoint": -1,
            "seed": 0,
            "dtype": dtype,
        },
    }


def _variant(**changes: Any) -> Callable[[int, str], dict]:
    def make(steps: int, dtype: str) -> dict:
        cfg = base_config(steps, dtype)
        for key, value in changes.items():
            if isinstance(value, dict):
                cfg[key] = {**cfg.get(key, {}), **value}
            else:
                cfg[key] = value
        return cfg

    return make


VARIANTS: dict[str, tuple[Callable[[int, str], dict], int, str]] = {
    # name: (config, grad accumulation, what it checks)
    "sft_full": (
        _variant(method="full", optimizer={"learning_rate": 3e-3}),
        1,
        "every weight trains (AdamW + weight decay on all, clipping, warmup + cosine)",
    ),
    "sft_lora": (_variant(), 1, "peft LoRA, lora_alpha 16 / r 8"),
    "sft_lora_accum": (
        _variant(loop={"grad_accumulation_steps": 2}, optimizer={"schedule": "linear"}),
        2,
        "2 micro-batches per step, token-weighted as HF Trainer's num_items_in_batch",
    ),
    "sft_dora": (_variant(method="dora"), 1, "peft DoRA (use_dora), magnitude trained"),
    "sft_qlora": (
        _variant(method="qlora", quantization={"bits": 4, "group_size": 64}),
        1,
        "LoRA on our 4-bit affine base, reference on its dequantized weights",
    ),
    "sft_adam_constant": (
        _variant(
            optimizer={
                "name": "adam",
                "schedule": "constant",
                "warmup_steps": 0,
                "grad_clip_norm": 0.0,
                "learning_rate": 3e-3,
            },  # fmt: skip
        ),
        1,
        "Adam (no weight decay), constant lr, no clipping",
    ),
    "sft_full_sgd": (
        _variant(
            method="full",
            optimizer={
                "name": "sgd",
                "learning_rate": 0.1,
                "momentum": 0.9,
                "weight_decay": 0.01,
                "schedule": "linear",
            },  # fmt: skip
        ),
        1,
        "SGD with momentum and (coupled) weight decay, as torch.optim.SGD",
    ),
    "sft_full_adafactor": (
        _variant(method="full", optimizer={"name": "adafactor", "learning_rate": 1e-2}),
        1,
        "transformers' Adafactor (factored second moment, update clipping, external lr)",
    ),
    "sft_full_muon": (
        _variant(
            method="full",
            optimizer={
                "name": "muon",
                "learning_rate": 2e-2,
                "momentum": 0.95,
                "weight_decay": 0.01,
                "schedule": "constant",
                "warmup_steps": 0,
            },  # fmt: skip
        ),
        1,
        "torch.optim.Muon on the blocks' matrices, AdamW on embeddings, head and norms "
        "(in fp32 runs the reference's Newton-Schulz runs in fp32: torch's runs it in bf16 by "
        "design, which alone moves the weights ~2%)",
    ),
}


class _Both:
    """Two torch optimizers (Muon + AdamW) stepped as one, as our MultiOptimizer does."""

    def __init__(self, *parts) -> None:
        self.parts = parts

    def step(self) -> None:
        for p in self.parts:
            p.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parts:
            p.zero_grad(set_to_none=set_to_none)


def _muon_reference(trainable: list, opt: dict, total: int):
    import torch

    def is_matrix(name: str, p) -> bool:  # services.runtime.optim._muon_filter
        return p.ndim >= 2 and "embed" not in name and "lm_head" not in name

    mats = [p for n, p in trainable if is_matrix(n, p)]
    rest = [p for n, p in trainable if not is_matrix(n, p)]
    lr, wd = float(opt["learning_rate"]), float(opt.get("weight_decay") or 0.0)
    if mats and mats[0].dtype == torch.float32:
        import torch.optim._muon as tm

        original = tm._zeropower_via_newtonschulz

        def fp32_ns(grad, coefficients, steps, eps):  # same iteration, without the bf16 cast
            x = grad.float()
            x = x.T if grad.size(0) > grad.size(1) else x
            x = x / x.norm().clamp(min=eps)
            a, b, c = coefficients
            for _ in range(steps):
                gram = x @ x.T
                x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
            return x.T if grad.size(0) > grad.size(1) else x

        tm._zeropower_via_newtonschulz = fp32_ns
        assert original is not fp32_ns
    muon = torch.optim.Muon(mats, lr=lr, weight_decay=wd, momentum=float(opt["momentum"]),
                            nesterov=True)  # fmt: skip
    adamw, sched_b = pc.torch_optimizer(rest, opt | {"name": "adamw"}, total)
    return _Both(muon, adamw), sched_b


# ---------------------------------------------------------------- the reference


def _dequantized_state(config: dict) -> dict[str, Any]:
    """Our base after quantization, dequantized, by HF weight name (QLoRA's reference)."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from services.runtime import models

    model, _ = models.load_model(config["model"]["model"], dtype="float32")
    q = config.get("quantization", {})
    models.quantize(model, q.get("bits", 4), q.get("group_size", 64))
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding):
            w = mx.dequantize(
                module.weight, module.scales, module.biases, module.group_size, module.bits
            )
            out[f"{name}.weight"] = np.array(w.astype(mx.float32))
    return out


def _peft_name(ours: str) -> str:
    # model.layers.0.self_attn.q_proj.lora_a -> ...q_proj.lora_A.default.weight (transposed)
    head, leaf = ours.rsplit(".", 1)
    leaf = {"lora_a": "lora_A.default.weight", "lora_b": "lora_B.default.weight",
            "m": "lora_magnitude_vector.default.weight"}[leaf]  # fmt: skip
    return f"base_model.model.{head}.{leaf}"


def reference(run: pc.OursRun, config: dict, device: str, dtype: str) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    method = config["method"]
    model = pc.hf_model(Path(config["model"]["model"]), "float32", device)
    if method == "qlora":
        deq = _dequantized_state(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in deq:
                    p.copy_(pc.to_torch(deq[name], device))
    lora = config.get("lora", {})
    if method != "full":
        from peft import LoraConfig, get_peft_model

        scale = lora["alpha"] / lora["rank"] if lora.get("alpha") else lora.get("scale", 20.0)
        pcfg = LoraConfig(
            r=lora["rank"], lora_alpha=scale * lora["rank"], lora_dropout=0.0,
            target_modules=list(LORA_KEYS), use_dora=method == "dora", bias="none",
        )  # fmt: skip
        model = get_peft_model(model, pcfg)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in run.initial.items():
                t = v.T if k.endswith(("lora_a", "lora_b")) else v
                target = params[_peft_name(k)]
                assert tuple(target.shape) == t.shape, (k, target.shape, t.shape)
                target.copy_(pc.to_torch(t, device))
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    opt = config["optimizer"]
    total = len(run.batches)
    if opt.get("name") == "muon":  # constant lr only: one scheduler drives the AdamW half
        optimizer, sched = _muon_reference(trainable, opt, total)
    else:
        optimizer, sched = pc.torch_optimizer(params, opt, total)
    losses = []
    vocab = model.config.vocab_size
    for micro in run.batches:
        n_items = float(sum(b["loss_mask"].sum() for b in micro))
        loss = 0.0
        for b in micro:
            inputs = pc.to_torch(b["inputs"], device).long()
            labels = np.where(b["loss_mask"] > 0, b["targets"], -100)
            logits = model(input_ids=inputs).logits
            loss = loss + ForCausalLMLoss(
                logits, None, vocab, num_items_in_batch=torch.tensor(n_items),
                shift_labels=pc.to_torch(labels, device).long(),
            )  # fmt: skip
        losses.append(float(loss.detach()))
        pc.torch_step(loss, params, optimizer, sched, float(opt.get("grad_clip_norm") or 0))
    final = {}
    for n, p in trainable:
        arr = p.detach().float().cpu().numpy()
        if method == "full":
            final[n] = arr
        else:  # back to our names and layout
            head = n.removeprefix("base_model.model.")
            if ".lora_A.default.weight" in head:
                final[head.replace(".lora_A.default.weight", ".lora_a")] = arr.T
            elif ".lora_B.default.weight" in head:
                final[head.replace(".lora_B.default.weight", ".lora_b")] = arr.T
            elif ".lora_magnitude_vector.default.weight" in head:
                final[head.replace(".lora_magnitude_vector.default.weight", ".m")] = arr
    return {"losses": losses, "params": final}


def _ours_params(run: pc.OursRun, method: str) -> dict[str, Any]:
    arrays = pc.trainable_arrays(run.final)
    if method == "full":
        return arrays
    return {k: v for k, v in arrays.items() if k.endswith(("lora_a", "lora_b", ".m"))}


# ---------------------------------------------------------------- cases


def run_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import services  # noqa: F401

    make, accum, what = VARIANTS[name]
    stored = make(args.steps, args.dtype)
    config = pc.resolve_paths(copy.deepcopy(stored))
    trainer = pc.load_trainer(TRAINER)
    ours_config = copy.deepcopy(config)
    ours_config["optimizer"].update(args.ours_optimizer)
    with tempfile.TemporaryDirectory() as tmp:
        ours = pc.run_ours(trainer, ours_config, Path(tmp) / "out", accum=accum)
        ref = reference(ours, config, args.torch_device, args.dtype)
        gap = pc.param_gap(_ours_params(ours, config["method"]), ref["params"])
    cmp = pc.compare(ours.losses, ref["losses"])
    rtol = pc.CPU_RTOL if args.dtype == "float32" else pc.GPU_RTOL
    result = {
        "name": name,
        "trainer": TRAINER,
        "checks": what,
        "reference": "transformers ForCausalLMLoss + peft LoraConfig + torch.optim + "
        "clip_grad_norm_ + transformers scheduler",
        "device": args.device,
        "dtype": args.dtype,
        "ours_losses": ours.losses,
        "ref_losses": ref["losses"],
        **cmp,
        "param_gap": gap,
        "target_rtol": rtol,
        "within_target": cmp["max_rel_dloss"] <= rtol,
        "environment": pc.environment(),
    }
    if args.ours_optimizer:
        result["ours_optimizer_override"] = args.ours_optimizer
    if (
        args.write_curves
        and args.device == "cpu"
        and args.dtype == "float32"
        and not (args.ours_optimizer)
    ):
        pc.write_curve(
            name, trainer=TRAINER, config=stored, reference=result["reference"],
            ref_losses=ref["losses"], ours_losses=ours.losses, gap=gap, accum=accum,
            notes=what,
        )  # fmt: skip
    return result


CASES = {name: (lambda args, _n=name: run_case(_n, args)) for name in VARIANTS}


def main(argv: list[str] | None = None) -> int:
    return pc.run_cases("parity-sft", CASES, parse(argv))


def parse(argv: list[str] | None) -> argparse.Namespace:
    return pc.parse_args("SFT parity against transformers + peft + torch.optim", argv)


if __name__ == "__main__":
    raise SystemExit(main())
