"""Preference-training parity: our reward model and DPO trainers (services.rlhf.trainers)
against TRL 1.16's own loss code, transformers + peft models and torch.optim, on the same
weights, batches and hyperparameters.

    uv run python bench/parity_pref.py                        # every case, CPU fp32
    uv run python bench/parity_pref.py --only dpo_ipo --write-curves
    python3 bench/parity_pref.py --device gpu --dtype bfloat16 --out $OUT   # GPU machine

The reference calls TRL's methods unbound, with a ``SimpleNamespace`` standing in for the
trainer (the attributes those methods read, an identity ``accelerator``):

- reward model: ``RewardTrainer.compute_loss`` on ``LlamaForSequenceClassification``
  (``num_labels=1``) loaded from the same directory, its ``score`` weight set to our initial
  head weight, peft ``LoraConfig(task_type="SEQ_CLS")`` (so ``score`` trains in full, as
  ``modules_to_save``). TRL's score is read at the rightmost non-pad token; ours at
  ``lengths - 1``: the case asserts that both pick the same position on these batches.
- DPO: ``DPOTrainer._compute_loss`` on ``LlamaForCausalLM`` with TRL's ``add_fused_lm_head``
  and peft LoRA, fed the recorded tokens as TRL's collator lays them out (``input_ids`` =
  our inputs + the last target, ``completion_mask`` from our loss mask) and the reference
  log-probs our batch carries (``ref_chosen_logps`` / ``ref_rejected_logps``, i.e. TRL with
  ``precompute_ref_log_probs``). Those are checked at every step against TRL's own
  ``compute_ref_log_probs`` (the adapter disabled, as TRL does for a new peft adapter).

Both: LoRA on every linear layer of every block (r 8, lora_alpha 16), our initial A copied
in (B = 0 on both sides), ``torch.optim.AdamW`` + a transformers scheduler
(``pc.torch_optimizer``), ``clip_grad_norm_`` where the config clips. Hyperparameters our
config leaves unset (dpo_sigmoid's beta, label_smoothing, loss) take TRL's own
DPOConfig / RewardConfig defaults on the reference side, so a drifted default shows.

Not compared here (same tensors on both sides by construction): tokenization. TRL treats
string rows as plain text (prompt + answer + EOS, no chat template); our datasets render them
as user/assistant turns when the tokenizer has a chat template (this one has). Message-list
rows are tokenized alike (prompt with the generation prompt, then prompt + answer).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import parity_common as pc

RM = "services.rlhf.trainers.reward_model:run"
DPO = "services.rlhf.trainers.dpo:run"
DATA = pc.DATA_DIR / "preference.jsonl"
DATA_MARGIN = pc.DATA_DIR / "preference_margin.jsonl"
LORA_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONSTANT = {"schedule": "constant", "warmup_steps": 0}


def base_config(trainer: str, steps: int, dtype: str) -> dict[str, Any]:
    model_key = "model" if trainer == RM else "policy"
    return {
        model_key: {"model": pc.rel(pc.model_dir())},
        "dataset": {"path": pc.rel(DATA), "valid_fraction": 0.0},
        "method": "lora",
        "lora": {"rank": 8, "alpha": 16.0, "num_layers": -1},
        "optimizer": {
            "name": "adamw",
            "learning_rate": 1e-3 if trainer == RM else 5e-3,
            "weight_decay": 0.01,
            "grad_clip_norm": 1.0,
            **CONSTANT,
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


def _variant(trainer: str, **changes: Any) -> Callable[[int, str], dict]:
    def make(steps: int, dtype: str) -> dict:
        cfg = base_config(trainer, steps, dtype)
        for key, value in changes.items():
            if isinstance(value, dict):
                cfg[key] = {**cfg.get(key, {}), **value}
            else:
                cfg[key] = value
        return cfg

    return make


VARIANTS: dict[str, tuple[str, Callable[[int, str], dict], str]] = {
    # name: (trainer, config, what it checks)
    "rm_bt": (RM, _variant(RM), "Bradley-Terry -logsigmoid(r_c - r_r), mean; constant lr, clip 1"),
    "rm_margin": (
        RM,
        _variant(RM, dataset={"path": pc.rel(DATA_MARGIN)}, use_margin=True),
        "per-pair margin subtracted, as TRL with a 'margin' column",
    ),
    "rm_center": (
        RM,
        _variant(
            RM,
            center_rewards_coef=0.01,
            optimizer={"schedule": "cosine", "warmup_steps": 3, "grad_clip_norm": 0.0},
        ),  # fmt: skip
        "center_rewards_coefficient 0.01; warmup 3 + cosine, no clipping",
    ),
    "dpo_sigmoid": (
        DPO,
        _variant(DPO),
        "DPO with our defaults (sigmoid, beta, label_smoothing unset) vs TRL DPOConfig's",
    ),
    "dpo_ipo": (
        DPO,
        _variant(DPO, loss="ipo", beta=0.1),
        "IPO (tau = beta 0.1) on completion-token-averaged log-ratios",
    ),
    "dpo_hinge": (
        DPO,
        _variant(DPO, loss="hinge", beta=0.1, optimizer={"learning_rate": 2e-3}),
        "hinge relu(1 - beta h) (lower lr: the loss stays above 0 for 20 steps)",
    ),
    "dpo_robust": (
        DPO,
        _variant(
            DPO,
            loss="robust",
            beta=0.1,
            label_smoothing=0.1,
            optimizer={"schedule": "cosine", "warmup_steps": 3},
        ),  # fmt: skip
        "robust DPO, label_smoothing 0.1; warmup 3 + cosine",
    ),
}


# ---------------------------------------------------------------- shared reference pieces


class _Accelerator:
    """What TRL's loss methods ask of ``self.accelerator`` on one process."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = torch.device(device)

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def unwrap_model(self, model):
        return model

    def autocast(self):
        return contextlib.nullcontext()


def _trl_default(config_class: str, name: str) -> Any:
    """A field's default in TRL's RewardConfig / DPOConfig dataclass."""
    import dataclasses

    import trl

    field = {f.name: f for f in dataclasses.fields(getattr(trl, config_class))}[name]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _peft_name(ours: str, prefix: str) -> str:
    # model.layers.0.self_attn.q_proj.lora_a -> <prefix>model.layers...q_proj.lora_A.default.weight
    head, leaf = ours.rsplit(".", 1)
    leaf = {"lora_a": "lora_A.default.weight", "lora_b": "lora_B.default.weight"}[leaf]
    return f"{prefix}{head}.{leaf}"


def _lora(config: dict, task_type: str | None):
    from peft import LoraConfig

    lora = config["lora"]
    return LoraConfig(
        r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0, bias="none",
        target_modules=list(LORA_KEYS), task_type=task_type,
    )  # fmt: skip


def _copy_lora(model, initial: dict[str, Any], device: str) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in initial.items():
            if not k.endswith(("lora_a", "lora_b")):
                continue
            target = params[_peft_name(k, "base_model.model.")]
            assert tuple(target.shape) == v.T.shape, (k, target.shape, v.T.shape)
            target.copy_(pc.to_torch(v.T, device))


def _lora_back(name: str) -> str | None:
    head = name.removeprefix("base_model.model.")
    for peft_leaf, ours in ((".lora_A.default.weight", ".lora_a"),
                            (".lora_B.default.weight", ".lora_b")):  # fmt: skip
        if peft_leaf in head:
            return head.replace(peft_leaf, ours)
    return None


def _torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def _token_layout(b: dict[str, Any], device: str) -> dict[str, Any]:
    """Our batch as TRL's collators lay it out: ``input_ids`` [2b, L + 1] (our inputs plus
    the last target: the full padded rows), ``attention_mask`` from the lengths, and DPO's
    ``completion_mask`` (position t + 1 is a completion token where our target t counts)."""
    import numpy as np

    ids = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
    n, width = ids.shape
    attn = (np.arange(width)[None, :] < b["lengths"][:, None]).astype(np.int64)
    comp = np.zeros((n, width), np.int64)
    comp[:, 1:] = b["loss_mask"] > 0
    return {
        "input_ids": pc.to_torch(ids, device).long(),
        "attention_mask": pc.to_torch(attn, device),
        "completion_mask": pc.to_torch(comp, device),
    }


def _train(model, run: pc.OursRun, config: dict, device: str, loss_of) -> dict[str, Any]:
    """The reference loop: one TRL loss per recorded batch, then a torch.optim step."""
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    opt = config["optimizer"]
    optimizer, sched = pc.torch_optimizer(params, opt, len(run.batches))
    losses, extra = [], defaultdict(float)
    for micro in run.batches:
        assert len(micro) == 1, "these cases use one micro-batch per step"
        loss, checks = loss_of(model, micro[0])
        for k, v in checks.items():
            extra[k] = max(extra[k], v)
        losses.append(float(loss.detach()))
        pc.torch_step(loss, params, optimizer, sched, float(opt.get("grad_clip_norm") or 0))
    return {"losses": losses, "trainable": trainable, "checks": dict(extra)}


# ---------------------------------------------------------------- the reward model


def rm_reference(run: pc.OursRun, config: dict, device: str, dtype: str) -> dict[str, Any]:
    import numpy as np
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import RewardTrainer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        config["model"]["model"], num_labels=1, dtype=torch.float32, attn_implementation="eager"
    ).to(device)
    pad = model.config.pad_token_id
    assert pad is not None, "sequence classification needs pad_token_id to find the last token"
    with torch.no_grad():
        model.score.weight.copy_(pc.to_torch(run.initial["value_head.weight"], device))
    assert model.score.bias is None  # TRL's head has no bias; ours keeps its bias frozen at 0
    model = get_peft_model(model, _lora(config, "SEQ_CLS"))
    _copy_lora(model, run.initial, device)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)

    trl_self = SimpleNamespace(
        model=model,
        args=SimpleNamespace(
            center_rewards_coefficient=config.get(
                "center_rewards_coef", _trl_default("RewardConfig", "center_rewards_coefficient")
            )
            or None
        ),
        accelerator=_Accelerator(device),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    use_margin = bool(config.get("use_margin"))

    def loss_of(model, b):
        lay = _token_layout(b, device)
        # TRL reads the rightmost non-pad token; ours lengths - 1: the same position here?
        ids = lay["input_ids"].cpu().numpy()
        rightmost = np.where(ids != pad, np.arange(ids.shape[1])[None, :], 0).max(axis=1)
        offset = float(np.abs(rightmost - (b["lengths"] - 1)).max())
        inputs = {"input_ids": lay["input_ids"], "attention_mask": lay["attention_mask"]}
        if use_margin:
            inputs["margin"] = pc.to_torch(b["margin"], device).float()
        loss = RewardTrainer.compute_loss(trl_self, model, inputs)
        return loss, {"last_token_offset": offset}

    out = _train(model, run, config, device, loss_of)
    final = {}
    for n, p in out["trainable"]:
        arr = p.detach().float().cpu().numpy()
        ours = _lora_back(n)
        if ours is not None:
            final[ours] = arr.T
        elif n.endswith("score.modules_to_save.default.weight"):
            final["value_head.weight"] = arr
    return {"losses": out["losses"], "params": final, "checks": out["checks"]}


def _rm_ours_params(run: pc.OursRun) -> tuple[dict[str, Any], float]:
    """Our trained LoRA and head weight, and the largest |bias| of our head (TRL's score
    has no bias: ours must stay 0)."""
    import mlx.core as mx
    import numpy as np

    arrays = pc.trainable_arrays(run.final)  # adapters.safetensors
    out = {k: v for k, v in arrays.items() if k.endswith(("lora_a", "lora_b"))}
    head = mx.load(str(Path(run.final) / "value_head.safetensors"))
    out["value_head.weight"] = np.array(head["value_head.weight"].astype(mx.float32))
    bias = float(np.abs(np.array(head["value_head.bias"].astype(mx.float32))).max())
    return out, bias


# ---------------------------------------------------------------- DPO


def dpo_reference(run: pc.OursRun, config: dict, device: str, dtype: str) -> dict[str, Any]:
    import torch
    from peft import get_peft_model
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = pc.hf_model(Path(config["policy"]["model"]), "float32", device)
    # As DPOTrainer.__init__: the fused head on the base model, before peft wraps it.
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    model = get_peft_model(model, _lora(config, "CAUSAL_LM"))
    _copy_lora(model, run.initial, device)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)

    loss_type = config.get("loss", _trl_default("DPOConfig", "loss_type")[0])
    trl_self = SimpleNamespace(
        model=model,
        ref_model=None,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05),
        accelerator=_Accelerator(device),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        loss_types=[loss_type],
        loss_weights=[1.0],
        # Unset in our config: TRL's own defaults (so a default of ours that drifted shows).
        beta=float(config.get("beta", _trl_default("DPOConfig", "beta"))),
        label_smoothing=float(
            config.get("label_smoothing", _trl_default("DPOConfig", "label_smoothing"))
        ),
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )

    def loss_of(model, b):
        lay = _token_layout(b, device)
        half = b["inputs"].shape[0] // 2
        ref = pc.to_torch(b["ref_logps"], device).float()
        inputs = {**lay, "ref_chosen_logps": ref[:half], "ref_rejected_logps": ref[half:]}
        # TRL's own reference log-probs (adapter disabled) vs the ones our batch carries.
        trl_c, trl_r = DPOTrainer.compute_ref_log_probs(trl_self, model, dict(lay))
        gap = float((torch.cat([trl_c, trl_r]).float() - ref).abs().max())
        loss = DPOTrainer._compute_loss(trl_self, model, inputs, return_outputs=False)
        return loss, {"ref_logps_max_abs_diff": gap}

    out = _train(model, run, config, device, loss_of)
    final = {}
    for n, p in out["trainable"]:
        ours = _lora_back(n)
        if ours is not None:
            final[ours] = p.detach().float().cpu().numpy().T
    return {"losses": out["losses"], "params": final, "checks": out["checks"]}


def _dpo_ours_params(run: pc.OursRun) -> dict[str, Any]:
    arrays = pc.trainable_arrays(run.final)
    return {k: v for k, v in arrays.items() if k.endswith(("lora_a", "lora_b"))}


# ---------------------------------------------------------------- cases


def run_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import services  # noqa: F401

    trainer_name, make, what = VARIANTS[name]
    stored = make(args.steps, args.dtype)
    config = pc.resolve_paths(copy.deepcopy(stored))
    trainer = pc.load_trainer(trainer_name)
    is_rm = trainer_name == RM
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ours = pc.run_ours(trainer, config, Path(tmp) / "out")
        if is_rm:
            ref = rm_reference(ours, config, args.torch_device, args.dtype)
            params, bias = _rm_ours_params(ours)
            gap = pc.param_gap(params, ref["params"])
            ref["checks"]["head_bias_max_abs"] = bias
        else:
            ref = dpo_reference(ours, config, args.torch_device, args.dtype)
            gap = pc.param_gap(_dpo_ours_params(ours), ref["params"])
    cmp = pc.compare(ours.losses, ref["losses"])
    rtol = pc.CPU_RTOL if args.dtype == "float32" else pc.GPU_RTOL
    reference = (
        "trl RewardTrainer.compute_loss + transformers LlamaForSequenceClassification + peft "
        "LoRA (SEQ_CLS) + torch.optim + clip_grad_norm_ + transformers scheduler"
        if is_rm
        else "trl DPOTrainer._compute_loss (fused LM head, precomputed reference log-probs) + "
        "transformers LlamaForCausalLM + peft LoRA + torch.optim + clip_grad_norm_ + "
        "transformers scheduler"
    )
    checks = ref["checks"]
    ok = cmp["max_rel_dloss"] <= rtol
    if is_rm:  # the same read-out position, and no bias TRL's head lacks
        ok = ok and checks["last_token_offset"] == 0 and checks["head_bias_max_abs"] == 0
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
        "reference_checks": checks,
        "target_rtol": rtol,
        "within_target": ok,
        "seconds": round(time.perf_counter() - tic, 1),
        "environment": pc.environment(),
        "notes": what,
    }
    if args.write_curves and args.device == "cpu" and args.dtype == "float32":
        pc.write_curve(
            name, trainer=trainer_name, config=stored, reference=reference,
            ref_losses=ref["losses"], ours_losses=ours.losses, gap=gap, notes=what,
        )  # fmt: skip
    return result


CASES = {name: (lambda args, _n=name: run_case(_n, args)) for name in VARIANTS}


def main(argv: list[str] | None = None) -> int:
    args = pc.parse_args("Reward-model and DPO parity against TRL + transformers + peft", argv)
    import trl.trainer.dpo_trainer  # noqa: F401  (~20 s, once: not counted in a case's time)
    import trl.trainer.reward_trainer  # noqa: F401

    def detail(r: dict) -> str:
        checks = " ".join(f"{k} {v:.1e}" for k, v in r["reference_checks"].items())
        return f" {checks} {r['seconds']}s"

    return pc.run_cases("parity-pref", CASES, args, detail)


if __name__ == "__main__":
    raise SystemExit(main())
