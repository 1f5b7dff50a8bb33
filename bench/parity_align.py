"""Alignment parity: our KTO and ORPO trainers (services.rlhf.trainers.kto / .orpo) against
TRL 1.16's own loss code, transformers + peft models and torch.optim, on the same weights,
batches and hyperparameters.

    uv run python bench/parity_align.py                       # every case, CPU fp32
    uv run python bench/parity_align.py --only kto --write-curves
    python3 bench/parity_align.py --device gpu --dtype bfloat16 --out $OUT   # GPU machine

The reference calls TRL's methods unbound, with a ``SimpleNamespace`` standing in for the
trainer (the attributes those methods read; bench/parity_pref.py's identity accelerator):

- KTO: ``KTOTrainer._compute_loss`` on ``LlamaForCausalLM`` with TRL's ``add_fused_lm_head``
  (the outputs KTOTrainer asks for), fed our recorded batches as its collator lays them
  out: ``input_ids`` / ``attention_mask`` / ``completion_mask``, the mismatched
  ``KL_input_ids`` / ``KL_attention_mask`` / ``KL_completion_mask`` our batch carries (row k's
  prompt with row k-1's completion, TRL's rotation) and ``label``. TRL computes every
  reference log-prob itself (``precompute_ref_log_probs=False``, its default): the adapter
  disabled for LoRA, a separate frozen copy for full training. Ours come from our cache; the
  largest gap to TRL's ``compute_ref_log_probs`` is reported per case.
- ORPO: ``ORPOTrainer.get_batch_loss_metrics`` (trl.experimental.orpo) on ``LlamaForCausalLM``,
  fed ``chosen_`` / ``rejected_`` ``input_ids``, ``attention_mask`` and ``labels`` (-100 on
  the prompt and the padding) built from our batches.

LoRA cases: every linear layer of every block (r 8, lora_alpha 16), our initial A copied in
(B = 0 on both sides). ``torch.optim.AdamW`` + a transformers scheduler
(``pc.torch_optimizer``), ``clip_grad_norm_`` where the config clips; with gradient
accumulation each micro-batch's loss is divided by the number of micro-batches, as
transformers' Trainer does for these trainers (``loss_is_scaled_for_ga = False``).
Hyperparameters our config leaves unset take TRL's KTOConfig / ORPOConfig defaults on the
reference side, so a drifted default shows.

Not compared (the same tensors on both sides by construction): tokenization and the order of
rows. TRL renders string rows as plain text and, for KTO, trains in dataset order with the
KL rows paired once over consecutive rows; ours renders them through the chat template and
pairs the KL rows within each shuffled batch (the same rotation).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import parity_common as pc
import parity_pref as pp

KTO = "services.rlhf.trainers.kto:run"
ORPO = "services.rlhf.trainers.orpo:run"
UNPAIRED = pc.DATA_DIR / "unpaired.jsonl"
PREFS = pc.DATA_DIR / "preference.jsonl"


def base_config(trainer: str, steps: int, dtype: str) -> dict[str, Any]:
    return {
        "policy": {"model": pc.rel(pc.model_dir())},
        "dataset": {"path": pc.rel(UNPAIRED if trainer == KTO else PREFS), "valid_fraction": 0.0},
        "method": "lora",
        "lora": {"rank": 8, "alpha": 16.0, "num_layers": -1},
        "optimizer": {
            "name": "adamw",
            "learning_rate": 5e-3,
            "weight_decay": 0.01,
            "grad_clip_norm": 1.0,
            "schedule": "constant",
            "warmup_steps": 0,
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


def _variant(trainer: str, **changes: Any):
    def make(steps: int, dtype: str) -> dict:
        cfg = base_config(trainer, steps, dtype)
        for key, value in changes.items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
        return cfg

    return make


COSINE = {"schedule": "cosine", "warmup_steps": 3}
VARIANTS = {
    # name: (trainer, config, what it checks)
    "kto": (KTO, _variant(KTO), "KTO with our defaults (loss, beta, weights unset) vs TRL's"),
    "kto_weighted_accum": (
        KTO,
        _variant(
            KTO,
            beta=0.3,
            desirable_weight=0.7,
            undesirable_weight=1.4,
            optimizer=COSINE,
            loop={"batch_size": 8, "grad_accumulation_steps": 2},
        ),  # fmt: skip
        "beta 0.3, desirable_weight 0.7 / undesirable_weight 1.4; 2 micro-batches of 4 a "
        "step (one KL estimate per micro-batch); warmup 3 + cosine",
    ),
    "kto_apo_zero": (
        KTO,
        _variant(KTO, loss_type="apo_zero_unpaired", beta=0.2),
        "apo_zero_unpaired (no KL term, no KL rows), beta 0.2",
    ),
    "kto_full_paired": (
        KTO,
        _variant(
            KTO, method="full", dataset={"path": pc.rel(PREFS)}, optimizer={"learning_rate": 1e-3}
        ),
        "full training, a frozen reference copy; preference rows unpaired (chosen true, "
        "rejected false), as TRL's unpair_preference_dataset",
    ),
    "orpo": (ORPO, _variant(ORPO), "ORPO with our default beta vs TRL ORPOConfig's"),
    "orpo_beta_accum": (
        ORPO,
        _variant(
            ORPO, beta=0.5, optimizer=COSINE, loop={"batch_size": 8, "grad_accumulation_steps": 2}
        ),  # fmt: skip
        "beta 0.5; 2 micro-batches of 4 a step; warmup 3 + cosine",
    ),
    "orpo_full": (
        ORPO,
        _variant(ORPO, method="full", optimizer={"learning_rate": 1e-3}),
        "full training",
    ),
}


def _trl_default(module: str, config_class: str, name: str) -> Any:
    import importlib

    cls = getattr(importlib.import_module(module), config_class)
    return {f.name: f for f in dataclasses.fields(cls)}[name].default


def _model(config: dict, device: str, dtype: str, fused: tuple[str, ...] | None):
    """The torch policy: LlamaForCausalLM (+ TRL's fused head) (+ peft LoRA, our A)."""
    import torch
    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = pc.hf_model(Path(config["policy"]["model"]), "float32", device)
    if fused:  # as KTOTrainer.__init__: on the base model, before peft wraps it
        add_fused_lm_head(model, outputs=fused)
    if config["method"] != "full":
        model = get_peft_model(model, pp._lora(config, "CAUSAL_LM"))
    return model


def _cast(model, dtype: str):
    import torch

    if model is None or dtype != "bfloat16":
        return model
    return model.to(torch.bfloat16)


def _train(model, run: pc.OursRun, config: dict, loss_of) -> dict[str, Any]:
    """One TRL loss per recorded micro-batch (each divided by their number), one step."""
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    opt = config["optimizer"]
    optimizer, sched = pc.torch_optimizer(params, opt, len(run.batches))
    losses, checks = [], defaultdict(float)
    for micro in run.batches:
        total = 0.0
        for b in micro:
            loss, extra = loss_of(model, b)
            for k, v in extra.items():
                checks[k] = max(checks[k], v)
            total = total + loss / len(micro)
        losses.append(float(total.detach()))
        pc.torch_step(total, params, optimizer, sched, float(opt.get("grad_clip_norm") or 0))
    final = {}
    for n, p in trainable:
        arr = p.detach().float().cpu().numpy()
        if config["method"] == "full":
            final[n] = arr
        elif (ours := pp._lora_back(n)) is not None:
            final[ours] = arr.T
    return {"losses": losses, "params": final, "checks": dict(checks)}


def _metrics_self(model, device: str, **attrs: Any) -> SimpleNamespace:
    return SimpleNamespace(
        model=model,
        accelerator=pp._Accelerator(device),
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **attrs,
    )


# ---------------------------------------------------------------- KTO


def kto_reference(run: pc.OursRun, config: dict, device: str, dtype: str) -> dict[str, Any]:
    import torch
    from trl.trainer.kto_trainer import KTOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model = _model(config, device, dtype, ("log_probs", "entropy", "mean_logits"))
    ref_model = None
    if config["method"] == "full":
        ref_model = pc.hf_model(Path(config["policy"]["model"]), "float32", device)
        add_fused_lm_head(ref_model)
        ref_model.eval().requires_grad_(False)
    else:
        pp._copy_lora(model, run.initial, device)
    model, ref_model = _cast(model, dtype), _cast(ref_model, dtype)

    def default(name: str) -> Any:
        return config.get(name, _trl_default("trl", "KTOConfig", name))

    loss_type = default("loss_type")
    trl_self = _metrics_self(
        model, device, ref_model=ref_model,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        precompute_ref_logps=False, loss_type=loss_type,
        calculate_KL=loss_type != "apo_zero_unpaired", beta=float(default("beta")),
        desirable_weight=float(default("desirable_weight")),
        undesirable_weight=float(default("undesirable_weight")),
    )  # fmt: skip
    trl_self._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(trl_self, m, b)

    def loss_of(model, b):
        inputs = pp._token_layout(b, device)
        if trl_self.calculate_KL:
            kl = {k.removeprefix("kl_"): b[k] for k in ("kl_inputs", "kl_targets",
                                                       "kl_loss_mask", "kl_lengths")}  # fmt: skip
            inputs.update({f"KL_{k}": v for k, v in pp._token_layout(kl, device).items()})
        inputs["label"] = torch.from_numpy(b["label"] > 0)
        scorer = ref_model if ref_model is not None else model  # as _precompute_ref_logps
        trl_ref, trl_ref_kl = KTOTrainer.compute_ref_log_probs(trl_self, scorer, dict(inputs))
        checks = {"ref_logps_max_abs_diff": _gap(trl_ref, b["ref_logps"])}
        if trl_ref_kl is not None:
            checks["ref_kl_logps_max_abs_diff"] = _gap(trl_ref_kl, b["ref_kl_logps"])
        loss = KTOTrainer._compute_loss(trl_self, model, inputs, return_outputs=False)
        return loss, checks

    return _train(model, run, config, loss_of)


def _gap(trl, ours) -> float:
    import numpy as np

    return float(np.abs(trl.detach().float().cpu().numpy() - ours).max())


# ---------------------------------------------------------------- ORPO


def orpo_reference(run: pc.OursRun, config: dict, device: str, dtype: str) -> dict[str, Any]:
    import torch
    from trl.experimental.orpo import ORPOTrainer

    model = _model(config, device, dtype, None)
    if config["method"] != "full":
        pp._copy_lora(model, run.initial, device)
    model = _cast(model, dtype)
    beta = float(config.get("beta", _trl_default("trl.experimental.orpo", "ORPOConfig", "beta")))
    trl_self = _metrics_self(model, device, is_encoder_decoder=False, padding_value=0, beta=beta)
    trl_self.concatenated_inputs = ORPOTrainer.concatenated_inputs
    trl_self.get_batch_logps = ORPOTrainer.get_batch_logps
    trl_self.odds_ratio_loss = lambda c, r: ORPOTrainer.odds_ratio_loss(trl_self, c, r)
    trl_self.concatenated_forward = lambda m, b: ORPOTrainer.concatenated_forward(trl_self, m, b)

    def loss_of(model, b):
        lay = pp._token_layout(b, device)
        ids, attn = lay["input_ids"], lay["attention_mask"]
        labels = torch.where(lay["completion_mask"] > 0, ids, torch.full_like(ids, -100))
        half = ids.shape[0] // 2
        batch = {}
        for side, rows in (("chosen", slice(0, half)), ("rejected", slice(half, None))):
            batch[f"{side}_input_ids"] = ids[rows]
            batch[f"{side}_attention_mask"] = attn[rows]
            batch[f"{side}_labels"] = labels[rows]
        loss, _ = ORPOTrainer.get_batch_loss_metrics(trl_self, model, batch, train_eval="train")
        return loss, {}

    return _train(model, run, config, loss_of)


# ---------------------------------------------------------------- cases


def _ours_params(run: pc.OursRun, method: str) -> dict[str, Any]:
    arrays = pc.trainable_arrays(run.final)
    if method == "full":
        return arrays
    return {k: v for k, v in arrays.items() if k.endswith(("lora_a", "lora_b"))}


def run_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    trainer_name, make, what = VARIANTS[name]
    stored = make(args.steps, args.dtype)
    config = pc.resolve_paths(copy.deepcopy(stored))
    accum = int(config["loop"].get("grad_accumulation_steps", 1))
    is_kto = trainer_name == KTO
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ours = pc.run_ours(pc.load_trainer(trainer_name), config, Path(tmp) / "out", accum=accum)
        fn = kto_reference if is_kto else orpo_reference
        ref = fn(ours, config, args.torch_device, args.dtype)
        gap = pc.param_gap(_ours_params(ours, config["method"]), ref["params"])
    cmp = pc.compare(ours.losses, ref["losses"])
    rtol = pc.CPU_RTOL if args.dtype == "float32" else pc.GPU_RTOL
    reference = (
        "trl KTOTrainer._compute_loss (fused LM head, TRL's own reference log-probs and KL "
        "estimate) + transformers LlamaForCausalLM + peft LoRA + torch.optim + "
        "clip_grad_norm_ + transformers scheduler"
        if is_kto
        else "trl.experimental.orpo ORPOTrainer.get_batch_loss_metrics + transformers "
        "LlamaForCausalLM + peft LoRA + torch.optim + clip_grad_norm_ + transformers scheduler"
    )
    if config["method"] == "full":
        reference = reference.replace(" + peft LoRA", "")
    result = {
        "name": name,
        "trainer": trainer_name,
        "checks": what,
        "reference": reference,
        "device": args.device,
        "dtype": args.dtype,
        "ours_losses": ours.losses,
        "ref_losses": ref["losses"],
        **cmp,
        "param_gap": gap,
        "reference_checks": ref["checks"],
        # The KL term must have been live (> 0, not clamped) for its check to mean anything.
        "ours_kl_max": max(m.get("kl", 0.0) for m in ours.metrics),
        "target_rtol": rtol,
        "within_target": cmp["max_rel_dloss"] <= rtol,
        "seconds": round(time.perf_counter() - tic, 1),
        "environment": pc.environment(),
        "notes": what,
    }
    if args.write_curves and args.device == "cpu" and args.dtype == "float32":
        pc.write_curve(
            name, trainer=trainer_name, config=stored, reference=reference,
            ref_losses=ref["losses"], ours_losses=ours.losses, gap=gap, accum=accum, notes=what,
        )  # fmt: skip
    return result


CASES = {name: (lambda args, _n=name: run_case(_n, args)) for name in VARIANTS}


def main(argv: list[str] | None = None) -> int:
    args = pc.parse_args("KTO and ORPO parity against TRL + transformers + peft", argv)
    import trl.experimental.orpo  # noqa: F401  (slow imports, once: not in a case's time)
    import trl.trainer.kto_trainer  # noqa: F401

    def detail(r: dict) -> str:
        checks = " ".join(f"{k} {v:.1e}" for k, v in r["reference_checks"].items())
        return f" {checks} kl max {r['ours_kl_max']:.2f} {r['seconds']}s"

    return pc.run_cases("parity-align", CASES, args, detail)


if __name__ == "__main__":
    raise SystemExit(main())
