"""Knowledge-distillation parity: our trainer (services.distillation.trainers.kd) against a
PyTorch reference on the same weights, batches and hyperparameters.

    uv run python bench/parity_kd.py                         # every case, CPU fp32
    uv run python bench/parity_kd.py --only kd_jsd --write-curves
    uv run python bench/parity_kd.py --build-teachers        # (re)build the committed teachers
    python3 bench/parity_kd.py --device gpu --dtype bfloat16 --out $OUT   # GPU machine

The student is the committed tiny llama (``pc.model_dir()``, 2 blocks x 64). The teachers are
committed beside it: ``tests/parity/teacher`` (3 blocks x 80, seed 2024) and
``tests/parity/teacher2`` (2 blocks x 48, seed 2025), built by ``pc.build_model`` with their
output heads multiplied by 40 afterwards (a 0.02-init random model is near uniform; a sharp
teacher makes the soft targets informative and the divergences large enough to compare).

The reference, per step (the same micro-batches our trainer consumed, recorded by
``pc.run_ours``; ``labels = targets where loss_mask else -100``):

    loss = (1 - alpha) * CE + alpha * T^2 * D(P_teacher^T || Q_student^T) + w_f * L_feat

* CE: transformers' ``ForCausalLMLoss`` (token mean over labels != -100).
* forward KL / reverse KL / JSD(beta): TRL 1.16 ``GKDTrainer.generalized_jsd_loss`` (beta 0,
  1, beta; temperature T), called on the torch student's and teacher's logits, with
  ``num_items_in_batch`` = counted tokens of the optimizer step: a sum over vocab and counted
  positions divided by the token count, which is also what its default "batchmean" gives for
  one micro-batch (``jsd[labels != -100].sum() / mask.sum()``), i.e. a per-token mean.
* T^2 and the (1 - alpha) CE + alpha KD mix: Hinton et al. 2015 (TRL's GKD has neither: it is
  alpha = 1, T = 1, where both agree).
* total variation: 1/2 sum_v |P - Q| (plain torch), with the same T^2 and token mean.
* several teachers: Hinton's ensemble soft targets, P = sum_i w_i softmax(z_i / T) with the
  normalised weights, passed to TRL's loss as logits T log P.
* adaptive temperature (docs/distillation.md, after AdaKD's inverse-difficulty rule):
  T_t = high - (high - low) * H(P_t) / log V, H at T = 1; TRL's loss with a per-token
  temperature and reduction "none", then sum_t T_t^2 D_t / N.
* feature matching (FitNets, Romero et al. 2015, in TinyBERT's form, Jiao et al. 2020):
  MSE(W h_student_m, h_teacher_g(m)) over counted tokens and hidden units, mean over the
  pairs; h = output of a transformer block (forward hooks on HF's decoder layers); W a learned
  Linear(64 -> 80, no bias) whose initial value is copied from ours; g(m) = round(m Lt / Ls)
  (1-based) so the last blocks align.
* teacher top-k cache: the same truncation as ours, written from its documented definition
  (docs/distillation.md): the T = 1 teacher's top-k tokens plus one bucket for the rest; the
  tempered teacher's rest bucket as if spread evenly over the other V - k tokens.
Optimizer: ``pc.torch_optimizer`` (torch.optim.AdamW + transformers scheduler) over the
student's weights (and the projection), ``clip_grad_norm_``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import parity_common as pc

TRAINER = "services.distillation.trainers.kd:run"
DATA = pc.DATA_DIR / "kd_completion.jsonl"
TEACHER = pc.PARITY / "teacher"
TEACHER2 = pc.PARITY / "teacher2"
# dir: (seed, sizes). Different depth and width from the student (2 x 64) on purpose.
TEACHERS = {
    TEACHER: (2024, {"num_layers": 3, "hidden_size": 80, "intermediate_size": 128}),
    TEACHER2: (2025, {"num_layers": 2, "hidden_size": 48, "intermediate_size": 96}),
}
HEAD_SCALE = 40.0
REFERENCE = (
    "TRL {trl} GKDTrainer.generalized_jsd_loss (forward KL beta=0, reverse KL beta=1, JSD) "
    "x T^2 (Hinton 2015) mixed (1-alpha) CE + alpha KD; CE transformers ForCausalLMLoss; "
    "TV / ensemble mixture / adaptive T / FitNets-TinyBERT feature MSE / top-k buckets in "
    "plain torch {torch}; torch.optim.AdamW + transformers scheduler + clip_grad_norm_"
)


def build_teachers() -> None:
    """Build the committed teachers (only where missing: the head scaling is not repeatable
    on an existing build)."""
    import mlx.core as mx

    for path, (seed, sizes) in TEACHERS.items():
        if (path / "model.safetensors").is_file():
            print(f"{pc.rel(path)} exists; delete it to rebuild")
            continue
        pc.build_model(path, seed=seed, **sizes)
        f = path / "model.safetensors"
        w = dict(mx.load(str(f)))
        w["lm_head.weight"] = w["lm_head.weight"] * HEAD_SCALE
        mx.save_safetensors(str(f), w, metadata={"format": "mlx"})
        print(f"built {pc.rel(path)}: {sizes}, seed {seed}, head x{HEAD_SCALE}")


def base_config(steps: int, dtype: str) -> dict[str, Any]:
    return {
        "student": {"model": pc.rel(pc.model_dir())},
        "teachers": [{"model": {"model": pc.rel(TEACHER)}}],
        "dataset": {"path": pc.rel(DATA), "valid_fraction": 0.0},
        "method": "full",
        "divergence": "forward_kl",
        "alpha": 0.5,
        "temperature": {"mode": "fixed", "initial": 2.0},
        "optimizer": {
            "name": "adamw",
            "learning_rate": 3e-3,
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
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        return cfg

    return make


TWO_TEACHERS = [
    {"model": {"model": pc.rel(TEACHER)}, "weight": 3.0},
    {"model": {"model": pc.rel(TEACHER2)}, "weight": 1.0},
]

VARIANTS: dict[str, tuple[Callable[[int, str], dict], int, str]] = {
    # name: (config, grad accumulation, what it checks)
    "kd_forward_kl": (_variant(), 1, "forward KL, T=2, alpha 0.5: Hinton KD"),
    "kd_reverse_kl": (_variant(divergence="reverse_kl"), 1, "reverse KL (TRL beta=1), T=2"),
    "kd_jsd": (_variant(divergence="jsd", jsd_beta=0.5), 1, "generalised JSD beta 0.5, T=2"),
    "kd_jsd_beta02": (
        _variant(divergence="jsd", jsd_beta=0.2, alpha=1.0, temperature={"initial": 1.0}),
        1,
        "JSD beta 0.2 (asymmetric: catches a swapped beta), alpha 1, T=1: TRL's GKD loss as is",
    ),
    "kd_tv": (_variant(divergence="total_variation"), 1, "total variation, T=2"),
    "kd_multi_teacher": (
        _variant(teachers=TWO_TEACHERS),
        1,
        "2 teachers (3 x 80, 2 x 48), weights 3:1, mixture in probability space",
    ),
    "kd_adaptive_temperature": (
        _variant(temperature={"mode": "adaptive", "initial": 3.0, "min": 1.0}),
        1,
        "per-token T in [1, 3] from the teacher's normalised entropy",
    ),
    "kd_annealed_temperature": (
        _variant(temperature={"mode": "annealed", "initial": 4.0, "final": 1.0}),
        2,
        "cosine-annealed T 4 -> 1 over the steps, 2 micro-batches per step",
    ),
    "kd_feature": (
        # Block outputs of 0.02-init models are ~0.03 in size: a large weight makes the MSE
        # term count in the loss (~2 of ~12 at step 1).
        _variant(features={"enabled": True, "loss": "mse", "weight": 2000.0}),
        1,
        "hidden-state MSE (weight 2000), uniform layer map, learned Linear(64 -> 80) + fwd KL",
    ),
    "kd_feature_cosine": (
        _variant(
            features={
                "enabled": True,
                "loss": "cosine",
                "weight": 1.0,
                "layer_map": [{"student_layer": 1, "teacher_layer": 1}],
            }
        ),  # fmt: skip
        1,
        "hidden-state 1 - cos, explicit layer map (1 -> 1)",
    ),
    "kd_lora": (
        _variant(
            method="lora",
            lora={"rank": 8, "alpha": 16.0, "num_layers": -1},
            optimizer={"learning_rate": 1e-2},
        ),  # fmt: skip
        1,
        "LoRA student (peft r 8, lora_alpha 16, all linears), forward KL, T=2",
    ),
    "kd_cache_topk": (
        _variant(teacher_cache={"enabled": True, "top_k": 32}),
        1,
        "teacher top-32 cache + rest bucket (our documented approximation), T=2",
    ),
    "kd_cache_multi_teacher": (
        _variant(
            teachers=TWO_TEACHERS, divergence="jsd", teacher_cache={"enabled": True, "top_k": 16}
        ),  # fmt: skip
        1,
        "cached T=1 mixture of 2 teachers (3:1), top-16 + rest, JSD, T=2",
    ),
}


# ---------------------------------------------------------------- the reference


def _temperature(cfg: dict, step: int, total: int) -> float:
    """The scheduled (global) temperature of optimizer step `step` (0-based), from the docs."""
    t = cfg.get("temperature") or {}
    mode, initial = t.get("mode") or "fixed", float(t.get("initial") or 2.0)
    if mode == "annealed":
        final = float(t.get("final") or 1.0)
        frac = step / max(total - 1, 1)
        return final + 0.5 * (initial - final) * (1 + math.cos(math.pi * frac))
    return initial


def _block_outputs(model, layers: list[int], store: dict[int, Any]) -> list:
    """Forward hooks that keep the output of transformer block i (HF decoder layer)."""
    hooks = []
    for i in layers:

        def hook(_mod, _inp, out, i=i):
            store[i] = out[0] if isinstance(out, tuple) else out

        hooks.append(model.model.layers[i].register_forward_hook(hook))
    return hooks


def _kd_sum(s_logits, t_logits_list, weights, labels, cfg, temp, n_items):
    """alpha-free KD term of one micro-batch: sum over counted tokens of T^2 D, / n_items."""
    import torch
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    jsd = GKDTrainer.generalized_jsd_loss
    mask = labels != -100
    kind = cfg.get("divergence", "forward_kl")
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(kind, float(cfg.get("jsd_beta") or 0.5))
    tcfg = cfg.get("temperature") or {}
    s_logits = s_logits.float()
    t_logits_list = [t.float() for t in t_logits_list]

    def mixture_logp(temperature):
        if len(t_logits_list) == 1:
            return torch.log_softmax(t_logits_list[0] / temperature, dim=-1)
        lps = [torch.log_softmax(t / temperature, dim=-1) for t in t_logits_list]
        return torch.logsumexp(
            torch.stack([lp + math.log(w) for lp, w in zip(lps, weights, strict=True)]), dim=0
        )

    if tcfg.get("mode") == "adaptive":
        high = float(tcfg.get("final") or tcfg.get("initial") or 2.0)
        low = float(tcfg.get("min") or min(1.0, high))
        p1 = mixture_logp(1.0)
        h = -(p1.exp() * p1).sum(-1, keepdim=True) / math.log(p1.shape[-1])
        temp = high - (high - low) * h.clamp(0.0, 1.0)  # [B, L, 1]
    else:
        temp = torch.full((*labels.shape, 1), float(temp), device=labels.device)
    t_lp = mixture_logp(temp)
    if kind == "total_variation":
        per_tok = 0.5 * (s_logits.div(temp).softmax(-1) - t_lp.exp()).abs().sum(-1)
        return (temp[..., 0].square() * per_tok)[mask].sum() / n_items
    # TRL's loss per element on (student logits, teacher logits: the teacher's own, or for a
    # mixture T log P, whose log_softmax(. / T) is log P); summed over the vocabulary and
    # weighted by each token's T^2.
    t_in = t_logits_list[0] if len(t_logits_list) == 1 else temp * t_lp
    per_elem = jsd(s_logits, t_in, labels=labels, beta=beta, temperature=temp,
                   reduction="none")  # fmt: skip
    return (temp[mask][:, 0].square() * per_elem.sum(-1)).sum() / n_items


def _kd_cached_sum(s_logits, t_logits_list, weights, labels, k, temp, cfg, n_items):
    """The top-k + rest-bucket divergence (docs/distillation.md's definition), x T^2: the
    cache holds the T = 1 mixture (mixed, then tempered)."""
    import torch

    kind = cfg.get("divergence", "forward_kl")
    mask = labels != -100
    v = t_logits_list[0].shape[-1]
    t1 = torch.logsumexp(torch.stack([torch.log_softmax(t.float(), -1) + math.log(w)
                                      for t, w in zip(t_logits_list, weights, strict=True)]),
                         dim=0)  # fmt: skip
    top, idx = torch.topk(t1, k, dim=-1)
    rest = torch.logsumexp(t1.scatter(-1, idx, float("-inf")), -1, keepdim=True)
    m = v - k
    rest_t = math.log(m) + (rest - math.log(m)) / temp
    t_b = torch.log_softmax(torch.cat([top / temp, rest_t], -1), -1)
    s_lp = torch.log_softmax(s_logits.float() / temp, -1)
    s_top = s_lp.gather(-1, idx)
    s_rest = torch.logsumexp(s_lp.scatter(-1, idx, float("-inf")), -1, keepdim=True)
    s_b = torch.cat([s_top, s_rest], -1)
    d = _plain_divergence(t_b, s_b, kind, float(cfg.get("jsd_beta") or 0.5))
    return temp**2 * d[mask].sum() / n_items


def _plain_divergence(lp, lq, kind: str, beta: float):
    """D(P || Q) per position from log-probs: the textbook definitions, for the bucketed case."""
    import torch

    def kl(a, b):
        return (a.exp() * (a - b)).sum(-1)

    if kind == "forward_kl":
        return kl(lp, lq)
    if kind == "reverse_kl":
        return kl(lq, lp)
    if kind == "jsd":  # GKD's JSD(beta): M = beta P + (1 - beta) Q
        m = torch.logaddexp(lp + math.log(beta), lq + math.log(1 - beta))
        return beta * kl(lp, m) + (1 - beta) * kl(lq, m)
    return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)


LORA_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _peft_student(model, config: dict, initial: dict[str, Any], device: str):
    """peft LoRA on every linear layer of every block (lora_alpha = alpha, dropout 0), with
    our initial A (and B = 0) copied in: A is random on both sides, so it must be the same."""
    import torch
    from peft import LoraConfig, get_peft_model

    lora = config.get("lora") or {}
    if lora.get("num_layers", -1) != -1 or lora.get("keys") or not lora.get("alpha"):
        raise ValueError("the LoRA reference covers num_layers -1, default keys, alpha set")
    pcfg = LoraConfig(r=int(lora["rank"]), lora_alpha=float(lora["alpha"]), lora_dropout=0.0,
                      target_modules=list(LORA_KEYS), bias="none")  # fmt: skip
    model = get_peft_model(model, pcfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in initial.items():
            if not k.endswith((".lora_a", ".lora_b")):
                continue  # feature projections: not part of the peft model
            head, leaf = k.rsplit(".", 1)
            leaf = {"lora_a": "lora_A.default.weight", "lora_b": "lora_B.default.weight"}[leaf]
            params[f"base_model.model.{head}.{leaf}"].copy_(pc.to_torch(v.T, device))
    return model


def _our_name(peft_name: str) -> str:
    """peft's parameter name -> ours (base_model.model.X.lora_A.default.weight -> X.lora_a)."""
    n = peft_name.removeprefix("base_model.model.")
    return n.replace(".lora_A.default.weight", ".lora_a").replace(
        ".lora_B.default.weight", ".lora_b"
    )


def _feature_pairs(cfg: dict, ls: int, lt: int) -> list[tuple[int, int]]:
    lm = (cfg.get("features") or {}).get("layer_map") or []
    if lm:
        return [(int(p["student_layer"]), int(p["teacher_layer"])) for p in lm]
    # TinyBERT's uniform map g(m) = m * Lt / Ls (1-based blocks), rounded: last blocks align.
    return [(m - 1, max(1, round(m * lt / ls)) - 1) for m in range(1, ls + 1)]


def reference(run: pc.OursRun, config: dict, device: str, dtype: str) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    if device == "cpu":
        # Tiny matmuls: torch's intra-op threads only contend with MLX's (and other jobs').
        torch.set_num_threads(1)
    td = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    student = pc.hf_model(Path(config["student"]["model"]), dtype, device)
    base = student  # the LlamaForCausalLM whose blocks the feature hooks read
    if config.get("method", "lora") != "full":
        student = _peft_student(student, config, run.initial, device)
    student.train()
    tspecs = config["teachers"]
    tmodels = []
    for t in tspecs:
        tm = pc.hf_model(Path(t["model"]["model"]), dtype, device).eval()
        tm.requires_grad_(False)
        tmodels.append(tm)
    raw_w = [float(t.get("weight") or 1.0) for t in tspecs]
    weights = [w / sum(raw_w) for w in raw_w]
    alpha = float(config.get("alpha", 0.5))
    feats = config.get("features") or {}
    cache = config.get("teacher_cache") or {}

    named = [(_our_name(n), p) for n, p in student.named_parameters() if p.requires_grad]
    projs: list[torch.nn.Linear] = []
    pairs: list[tuple[int, int]] = []
    if feats.get("enabled"):
        ls, lt = base.config.num_hidden_layers, tmodels[0].config.num_hidden_layers
        pairs = _feature_pairs(config, ls, lt)
        hs, ht = base.config.hidden_size, tmodels[0].config.hidden_size
        for k in range(len(pairs)):
            lin = torch.nn.Linear(hs, ht, bias=False).to(device=device, dtype=td)
            with torch.no_grad():
                lin.weight.copy_(pc.to_torch(run.initial[f"kd_projections.layers.{k}.weight"],
                                             device))  # fmt: skip
            projs.append(lin)
            named.append((f"kd_projections.layers.{k}.weight", lin.weight))
    params = [p for _, p in named]
    opt = config["optimizer"]
    total = len(run.batches)
    optimizer, sched = pc.torch_optimizer(params, opt, total)
    vocab = base.config.vocab_size
    s_store: dict[int, Any] = {}
    t_store: dict[int, Any] = {}
    hooks = _block_outputs(base, [s for s, _ in pairs], s_store)
    if pairs:
        hooks += _block_outputs(tmodels[0], [t for _, t in pairs], t_store)
    losses: list[float] = []
    parts: dict[str, list[float]] = {"ce_loss": [], "kd_loss": [], "feature_loss": []}
    for step, micro in enumerate(run.batches):
        n_items = float(sum(b["loss_mask"].sum() for b in micro))
        n_t = torch.tensor(max(n_items, 1.0))
        temp = _temperature(config, step, total)
        loss = 0.0
        sums = dict.fromkeys(parts, 0.0)
        for b in micro:
            inputs = pc.to_torch(b["inputs"], device).long()
            labels = pc.to_torch(np.where(b["loss_mask"] > 0, b["targets"], -100), device).long()
            s_logits = student(input_ids=inputs).logits.float()
            with torch.no_grad():
                t_logits = [tm(input_ids=inputs).logits.float()[..., :vocab] for tm in tmodels]
            ce = ForCausalLMLoss(s_logits, None, vocab, num_items_in_batch=n_t,
                                 shift_labels=labels)  # fmt: skip
            if cache.get("enabled"):
                kd = _kd_cached_sum(s_logits, t_logits, weights, labels,
                                    int(cache.get("top_k") or 32), temp, config, n_t)  # fmt: skip
            else:
                kd = _kd_sum(s_logits, t_logits, weights, labels, config, temp, n_t)
            term = (1 - alpha) * ce + alpha * kd
            sums["ce_loss"] += float(ce.detach())
            sums["kd_loss"] += float(kd.detach())
            if pairs:
                mask = labels != -100
                feat = 0.0
                for k, (si, ti) in enumerate(pairs):
                    s_h = projs[k](s_store[si]).float()[mask]
                    t_h = t_store[ti].float()[mask]
                    if feats.get("loss", "mse") == "cosine":
                        d = 1 - torch.nn.functional.cosine_similarity(s_h, t_h, dim=-1, eps=1e-8)
                    else:
                        d = (s_h - t_h).square().mean(-1)
                    feat = feat + d.sum() / n_t / len(pairs)
                term = term + float(feats.get("weight") or 1.0) * feat
                sums["feature_loss"] += float(feat.detach())
            loss = loss + term
        losses.append(float(loss.detach()))
        for k, v in sums.items():
            parts[k].append(v)
        pc.torch_step(loss, params, optimizer, sched, float(opt.get("grad_clip_norm") or 0))
    for h in hooks:
        h.remove()
    final = {}
    for n, p in named:
        arr = p.detach().float().cpu().numpy()
        final[n] = arr.T if n.endswith((".lora_a", ".lora_b")) else arr
    return {"losses": losses, "params": final, "parts": parts}


def _ours_params(run: pc.OursRun) -> dict[str, Any]:
    """The final student weights, plus the trained projections: the final export is a plain
    model without them, the last checkpoint (written at the end) holds them."""
    import mlx.core as mx
    import numpy as np

    out = pc.trainable_arrays(run.final)
    found = sorted(run.output_dir.glob("checkpoints/step_*/projections.safetensors"))
    if found:
        out.update({k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(found[-1])).items()})
    return out


# ---------------------------------------------------------------- cases


def run_case(name: str, args: argparse.Namespace) -> dict[str, Any]:

    make, accum, what = VARIANTS[name]
    stored = make(args.steps, args.dtype)
    if accum > 1:
        stored["loop"]["grad_accumulation_steps"] = accum
    config = pc.resolve_paths(copy.deepcopy(stored))
    trainer = pc.load_trainer(TRAINER)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ours = pc.run_ours(trainer, config, Path(tmp) / "out", accum=accum)
        t1 = time.perf_counter()
        ref = reference(ours, config, args.torch_device, args.dtype)
        t2 = time.perf_counter()
        gap = pc.param_gap(_ours_params(ours), ref["params"])  # every trained tensor, both sides
    cmp = pc.compare(ours.losses, ref["losses"])
    rtol = pc.CPU_RTOL if args.dtype == "float32" else pc.GPU_RTOL
    # The loss's parts, as our trainer reports them per step: a wrong term cannot hide
    # behind a larger one (feature_loss is 0 on both sides when off).
    parts = {}
    for key, ref_part in ref["parts"].items():
        mine_part = [float(m.get(f"train_{key}", 0.0)) for m in ours.metrics]
        d = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(mine_part, ref_part, strict=True)]
        parts[key] = {"max_rel": max(d), "first": [mine_part[0], ref_part[0]]}
    env = pc.environment()
    result = {
        "name": name,
        "trainer": TRAINER,
        "checks": what,
        "reference": REFERENCE.format(trl=env.get("trl", "?"), torch=env.get("torch", "?")),
        "device": args.device,
        "dtype": args.dtype,
        "ours_losses": ours.losses,
        "ref_losses": ref["losses"],
        **cmp,
        "param_gap": gap,
        "target_rtol": rtol,
        "parts": parts,
        "within_target": cmp["max_rel_dloss"] <= rtol
        and all(p["max_rel"] <= rtol for p in parts.values()),
        "seconds": {"ours": round(t1 - t0, 1), "reference": round(t2 - t1, 1)},
        "notes": what,
        "environment": env,
    }
    if args.write_curves and args.device == "cpu" and args.dtype == "float32":
        pc.write_curve(
            name, trainer=TRAINER, config=stored, reference=result["reference"],
            ref_losses=ref["losses"], ours_losses=ours.losses, gap=gap, accum=accum,
            notes=f"{what}. Teachers' model.safetensors sha256: "
            + ", ".join(f"{pc.rel(t)} {pc.weights_sha(t)}" for t in TEACHERS),
        )  # fmt: skip
    return result


CASES = {name: (lambda args, _n=name: run_case(_n, args)) for name in VARIANTS}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--build-teachers" in argv:
        build_teachers()
        return 0
    args = pc.parse_args("Distillation parity against TRL's GKD loss + torch", argv)

    def detail(r: dict) -> str:
        worst = max(r["parts"].items(), key=lambda kv: kv[1]["max_rel"])
        first = ", ".join(f"{k} {v['first'][0]:.4g}" for k, v in r["parts"].items())
        secs = r["seconds"]
        return (f"\n    parts: worst {worst[0]} rel {worst[1]['max_rel']:.1e}; first {first}; "
                f"time ours {secs['ours']} s, ref {secs['reference']} s")  # fmt: skip

    return pc.run_cases("parity-kd", CASES, args, detail)


if __name__ == "__main__":
    raise SystemExit(main())
