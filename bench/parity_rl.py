"""GRPO and PPO parity: our trainers' *updates* against TRL's, on the same rollouts.

    uv run python bench/parity_rl.py                          # every case, CPU fp32
    uv run python bench/parity_rl.py --only grpo_kl --write-curves
    python3 bench/parity_rl.py --device gpu --dtype bfloat16 --out $OUT   # GPU machine

Generation cannot match across frameworks (other samplers, other RNGs), so our trainer samples
its rollouts as a job does and records, through its ``ctx.extra["rl_record"]`` hook
(services/rlhf/trainers/rollout.py), what every step consumed: the prompt and completion ids,
the rule-based rewards (``contains:o``), and the rows of each optimizer update in order. The
reference starts from the same weights (LoRA A and the value head copied from ours) and
recomputes from those raw rollouts everything the TRL trainer computes itself, then takes the
same optimizer steps (``torch.optim`` + a transformers scheduler, ``clip_grad_norm_``):

- GRPO: TRL 1.16's own ``GRPOTrainer._get_per_token_logps_and_entropies`` (its fused LM head,
  temperature-scaled) and ``GRPOTrainer._compute_loss`` called on a ``GRPOConfig`` (TRL's
  defaults: loss_type "dapo", use_bias_correction_kl, epsilon 0.2) with
  ``per_device_train_batch_size`` = our minibatch, ``steps_per_generation`` = minibatches per
  rollout batch, gradient accumulation 1; old and reference log-probs as its
  ``_generate_and_score_completions`` makes them; advantages as it computes them (transcribed,
  with TRL's ``nanstd``).
- PPO: TRL 1.16 has no PPOTrainer. The reference is the classic one (trl v0.11.4
  trl/trainer/ppo_trainer.py: ``batched_forward_pass``, ``compute_rewards``,
  ``compute_advantages``, ``loss``, ``train_minibatch``; trl/core.py ``masked_whiten``;
  trl/trainer/utils.py ``AdaptiveKLController``), transcribed below: it is the TRL design our
  PPO follows (a value head on the policy's trunk, an adaptive KL controller, the score on the
  last response token). Its scheduler steps once per PPO iteration. (The PPOTrainer of trl
  0.12-1.x, trl/experimental/ppo, is another design: a separate value model, a fixed
  ``kl_coef`` 0.05, and the score and values one position past the last token.)

The GRPO cases stop completions at "an" so their lengths differ (an untrained model rarely
samples its EOS): with equal lengths the on-policy GRPO loss is 0 at every update and a
relative |dloss| says nothing. The PPO cases weigh the value loss in (vf_coef 1) for the same
reason. transformers' embedding never trains its pad row (padding_idx); the reference turns
that off, since a random policy samples the pad token as a real one now and then.

Compared: the loss our trainer reports per step (mean over its updates; the curve CI replays),
every single update's loss, the KL coefficient per step (PPO), and the final trainable weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
import time
import types
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import parity_common as pc

TRAINERS = {"grpo": "services.rlhf.trainers.grpo:run", "ppo": "services.rlhf.trainers.ppo:run"}
DATA = pc.DATA_DIR / "rl_prompts.jsonl"
LORA_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOSS_KEY = "loss"


def _common(steps: int, dtype: str) -> dict[str, Any]:
    return {
        "policy": {"model": pc.rel(pc.model_dir())},
        "dataset": {"path": pc.rel(DATA)},
        "reward": {"reward_function": "contains:o"},
        "method": "lora",
        "lora": {"rank": 8, "alpha": 16.0, "num_layers": -1},
        "optimizer": {
            "name": "adamw",
            "learning_rate": 5e-3,
            "weight_decay": 0.0,
            "schedule": "cosine",
            "warmup_steps": 2,
            "grad_clip_norm": 1.0,
        },
        "loop": {
            "max_steps": steps,
            "steps_per_report": 1,
            "steps_per_checkpoint": -1,
            "seed": 0,
            "dtype": dtype,
        },
    }


def _grpo(**changes: Any) -> Callable[[int, str], dict]:
    def make(steps: int, dtype: str) -> dict:
        cfg = _common(steps, dtype)
        # Stopping at "an" gives completions of unequal lengths (an untrained model's EOS is
        # rare), without which the on-policy GRPO loss is exactly 0 at every update.
        sampling = {"max_tokens": 12, "stop": ["an"]}
        cfg.update(rollout={"batch_size": 4, "sampling": sampling}, group_size=4)
        cfg["loop"]["batch_size"] = 8  # 16 completions a step: 2 updates per iteration
        return _merge(cfg, changes)

    return make


def _ppo(**changes: Any) -> Callable[[int, str], dict]:
    def make(steps: int, dtype: str) -> dict:
        cfg = _common(steps, dtype)
        cfg.update(
            rollout={"batch_size": 8, "sampling": {"max_tokens": 12}},
            ppo_epochs=2,
            minibatch_size=4,
            init_kl_coef=0.2,
            adaptive_kl=True,
            kl_target=0.2,  # a target the run crosses, with a short horizon: the
            kl_horizon=100.0,  # controller moves kl_coef by up to 1.6% a step
            # The clipped policy loss of whitened advantages sits near 0 (where a relative
            # |dloss| means nothing): weigh the value loss in so the step loss stays clear.
            vf_coef=1.0,
        )
        return _merge(cfg, changes)

    return make


def _merge(cfg: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


VARIANTS: dict[str, tuple[str, Callable[[int, str], dict], str]] = {
    # name: (trainer, config, what it checks)
    "grpo": (
        "grpo",
        _grpo(),
        "TRL GRPOConfig defaults: loss_type dapo, beta 0 (no reference), scale_rewards group, "
        "num_iterations 1, epsilon 0.2; LoRA, AdamW + cosine warmup, clip 1.0",
    ),
    "grpo_kl": (
        "grpo",
        _grpo(
            beta=0.04,
            num_iterations=2,
            rollout={"sampling": {"max_tokens": 12, "stop": ["an"], "temperature": 0.8}},
        ),  # fmt: skip
        "beta 0.04 with the reference model (importance-weighted k3), num_iterations 2 "
        "(ratios move off 1 and clip), temperature 0.8",
    ),
    "grpo_dr": (
        "grpo",
        _grpo(loss_type="dr_grpo", scale_rewards="none"),
        "Dr. GRPO: loss_type dr_grpo (sum / completions x max_completion_length), "
        "scale_rewards none",
    ),
    "grpo_seq": (
        "grpo",
        _grpo(loss_type="grpo", scale_rewards="batch", beta=0.1, num_iterations=2),
        "loss_type grpo (per-sequence mean), scale_rewards batch, beta 0.1, num_iterations 2",
    ),
    "ppo": (
        "ppo",
        _ppo(),
        "shared-trunk value head, KL-penalised rewards, GAE (gamma 1, lam 0.95), whitened "
        "advantages, clipped policy + value losses (vf_coef 1.0), 2 epochs x 2 minibatches, "
        "adaptive KL controller, LR schedule per iteration",
    ),
    "ppo_full": (
        "ppo",
        _ppo(
            method="full",
            gamma=0.9,
            lam=0.8,
            adaptive_kl=False,
            init_kl_coef=0.1,
            optimizer={
                "name": "adam",
                "learning_rate": 1e-3,
                "schedule": "linear",
                "warmup_steps": 0,
                "grad_clip_norm": 0.0,
            },
        ),  # fmt: skip
        "full fine-tuning, gamma 0.9 / lam 0.8, fixed KL 0.1, Adam, linear decay, no clipping",
    ),
}


# ---------------------------------------------------------------- running ours


def run_ours(trainer: Callable, config: dict, output_dir: Path) -> dict[str, Any]:
    """Our trainer's ``run`` as a job runs it, with the recording hook set."""
    import services  # noqa: F401
    from services.rlhf.trainers.rollout import RECORD
    from services.runtime.contract import JobContext, Report

    reports: list[Report] = []
    events: list[dict] = []
    ctx = JobContext(job_id="parity", output_dir=Path(output_dir), report=reports.append)
    ctx.extra[RECORD] = events.append
    info = trainer(config, ctx)
    metrics = [dict(r.metrics) for r in sorted(reports, key=lambda r: r.step)]
    return {
        "losses": [float(m[LOSS_KEY]) for m in metrics],
        "metrics": metrics,
        "initial": next(e["params"] for e in events if e["event"] == "start"),
        "steps": [e for e in events if e["event"] == "step"],
        "final": pc.trainable_arrays(Path(info.path)),
    }


def _rows(step: dict) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids as sampled: with their end-of-sequence token, or cut
    before a stop string) of each rollout row."""
    return [([int(x) for x in p], [int(x) for x in c])
            for p, c in zip(step["prompt_ids"], step["completion_ids"], strict=True)]  # fmt: skip


# ---------------------------------------------------------------- the reference models


def _peft_name(ours: str) -> str:
    head, leaf = ours.rsplit(".", 1)
    leaf = {"lora_a": "lora_A.default.weight", "lora_b": "lora_B.default.weight"}[leaf]
    return f"base_model.model.{head}.{leaf}"


def _policy(config: dict, initial: dict, device: str, dtype: str, fused_temperature=None):
    """transformers' llama from the same weights (+ peft LoRA with our initial A, B = 0);
    with ``fused_temperature``, TRL's fused LM head added as GRPOTrainer adds it."""
    import torch

    model = pc.hf_model(Path(config["policy"]["model"]), "float32", device)
    # transformers builds the embedding with padding_idx = pad_token_id, which never trains
    # that row; an untrained policy samples the pad token (<|endoftext|>) as a real token
    # now and then, and full fine-tuning (ours, mlx-lm) trains its row like any other.
    model.get_input_embeddings().padding_idx = None
    if fused_temperature is not None:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, temperature=fused_temperature, outputs=("log_probs", "entropy"))
    if config["method"] != "full":
        from peft import LoraConfig, get_peft_model

        lora = config["lora"]
        pcfg = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                          target_modules=list(LORA_KEYS), bias="none")  # fmt: skip
        model = get_peft_model(model, pcfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in initial.items():
            if k.startswith("value_head."):
                continue
            name, arr = (_peft_name(k), v.T) if config["method"] != "full" else (k, v)
            assert tuple(params[name].shape) == arr.shape, (k, params[name].shape, arr.shape)
            params[name].copy_(pc.to_torch(arr, device))
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.train()
    return model


def _frozen(config: dict, device: str, dtype: str, fused_temperature=None):
    model = pc.hf_model(Path(config["policy"]["model"]), dtype, device)
    if fused_temperature is not None:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, temperature=fused_temperature)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _final(model, method: str, head=None) -> dict[str, Any]:
    """Trainable weights under our names and layout."""
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        arr = p.detach().float().cpu().numpy()
        if method == "full":
            out[n] = arr
            continue
        head_name = n.removeprefix("base_model.model.")
        for theirs, ours in ((".lora_A.default.weight", ".lora_a"),
                             (".lora_B.default.weight", ".lora_b")):  # fmt: skip
            if head_name.endswith(theirs):
                out[head_name.removesuffix(theirs) + ours] = arr.T
    if head is not None:
        out["value_head.weight"] = head.weight.detach().float().cpu().numpy()
        out["value_head.bias"] = head.bias.detach().float().cpu().numpy()
    return out


class _NoSchedule:
    def step(self) -> None:  # the PPO reference steps its scheduler once per iteration
        pass


# ---------------------------------------------------------------- GRPO: TRL's own code


class _Accelerator:
    """What GRPOTrainer's loss reads from accelerate, for one process."""

    num_processes = 1
    is_main_process = True

    def autocast(self):
        return contextlib.nullcontext()

    def gather(self, x):
        return x

    def reduce(self, x, reduction: str = "sum"):
        return x


def _trl_grpo(config: dict, model, n_mb: int, minibatch: int, device: str):
    """An object carrying the attributes GRPOTrainer.__init__ sets that ``_compute_loss`` and
    ``_get_per_token_logps_and_entropies`` read, with TRL's GRPOConfig for every knob we do
    not set (so its defaults are TRL's own)."""
    from trl import GRPOConfig
    from trl.trainer.grpo_trainer import GRPOTrainer

    sampling = config["rollout"]["sampling"]
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-grpo-"),
        report_to=[],
        use_cpu=device == "cpu",
        per_device_train_batch_size=minibatch,
        gradient_accumulation_steps=1,
        steps_per_generation=n_mb,
        num_generations=config["group_size"],
        num_iterations=config.get("num_iterations", 1),
        max_completion_length=sampling["max_tokens"],
        temperature=sampling.get("temperature", 1.0),
        beta=config.get("beta", 0.0),
        epsilon=config.get("clip_range", 0.2),
        **({"loss_type": config["loss_type"]} if "loss_type" in config else {}),
        **({"scale_rewards": config["scale_rewards"]} if "scale_rewards" in config else {}),
    )
    t = types.SimpleNamespace(
        args=args, accelerator=_Accelerator(), model=model, beta=args.beta,
        loss_type=args.loss_type, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        importance_sampling_level=args.importance_sampling_level,
        off_policy_mask_threshold=args.off_policy_mask_threshold,
        top_entropy_quantile=args.top_entropy_quantile, use_vllm=args.use_vllm,
        vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        max_completion_length=args.max_completion_length, temperature=args.temperature,
        scale_rewards=args.scale_rewards, current_gradient_accumulation_steps=1,
        aux_loss_enabled=False, _entropy_bonus_enabled=args.entropy_coef != 0.0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )  # fmt: skip
    t._get_per_token_logps_and_entropies = types.MethodType(
        GRPOTrainer._get_per_token_logps_and_entropies, t
    )
    t.compute_loss = types.MethodType(GRPOTrainer._compute_loss, t)
    return t


def _trl_inputs(rows, pad: int, device: str) -> dict[str, Any]:
    """Prompts left-padded, completions right-padded, as GRPOTrainer batches them."""
    import torch

    P = max(len(p) for p, _ in rows)
    C = max(len(c) for _, c in rows)
    pid = torch.full((len(rows), P), pad, dtype=torch.long)
    pm = torch.zeros((len(rows), P), dtype=torch.long)
    cid = torch.full((len(rows), C), pad, dtype=torch.long)
    cm = torch.zeros((len(rows), C), dtype=torch.long)
    for r, (p, c) in enumerate(rows):
        pid[r, P - len(p) :], pm[r, P - len(p) :] = torch.tensor(p), 1
        cid[r, : len(c)], cm[r, : len(c)] = torch.tensor(c), 1
    return {k: v.to(device) for k, v in
            {"prompt_ids": pid, "prompt_mask": pm, "completion_ids": cid,
             "completion_mask": cm}.items()}  # fmt: skip


def _trl_advantages(scores, G: int, scale: str):
    """GRPOTrainer._generate_and_score_completions, multi_objective_aggregation
    "sum_then_normalize" with one reward function (trl 1.16 grpo_trainer.py)."""
    import torch
    from trl.trainer.utils import nanstd

    rewards = torch.tensor(scores, dtype=torch.float32)
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    else:  # "batch"
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


def grpo_reference(ours: dict, config: dict, device: str, dtype: str) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    sampling = config["rollout"]["sampling"]
    temp = sampling.get("temperature", 1.0)
    beta = config.get("beta", 0.0)
    model = _policy(config, ours["initial"], device, dtype, fused_temperature=temp)
    ref = _frozen(config, device, dtype, fused_temperature=temp) if beta else None
    pad = 0  # the tiny model's pad token, which our pack() pads with too
    first = ours["steps"][0]
    n_rows = len(first["prompt_ids"])
    minibatch = config["loop"]["batch_size"]
    n_mb = math.ceil(n_rows / minibatch)
    trl = _trl_grpo(config, model, n_mb, minibatch, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = config["optimizer"]
    total = sum(len(s["updates"]) for s in ours["steps"])
    optimizer, sched = pc.torch_optimizer(params, opt, total)
    clip = float(opt.get("grad_clip_norm") or 0.0)
    step_losses, update_losses, diag = [], [], defaultdict(float)
    for s in ours["steps"]:
        rows = _rows(s)
        inputs = _trl_inputs(rows, pad, device)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        C = inputs["completion_ids"].shape[1]
        with torch.no_grad():  # as _generate_and_score_completions makes them
            inputs["old_per_token_logps"] = trl._get_per_token_logps_and_entropies(
                model, ids, attn, C)[0]  # fmt: skip
            if ref is not None:
                inputs["ref_per_token_logps"] = trl._get_per_token_logps_and_entropies(
                    ref, ids, attn, C)[0]  # fmt: skip
        inputs["advantages"] = _trl_advantages(s["scores"], config["group_size"],
                                               trl.scale_rewards).to(device)  # fmt: skip
        inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
        m = inputs["completion_mask"].cpu().numpy() > 0
        diag["old_logps"] = max(diag["old_logps"], _gap(
            s["old_logps"][:, :C], inputs["old_per_token_logps"], m))  # fmt: skip
        diag["advantages"] = max(diag["advantages"], float(
            abs(s["advantages"] - inputs["advantages"].float().cpu().numpy()).max()))  # fmt: skip
        losses = []
        for idx, _ in s["updates"]:
            sel = torch.as_tensor(idx, dtype=torch.long, device=device)
            mb = {k: (v if k == "num_items_in_batch" else v[sel]) for k, v in inputs.items()}
            loss = trl.compute_loss(model, mb)
            losses.append(float(loss.detach()))
            pc.torch_step(loss, params, optimizer, sched, clip)
        update_losses.append(losses)
        step_losses.append(sum(losses) / len(losses))
    return {"losses": step_losses, "update_losses": update_losses,
            "params": _final(model, config["method"]), "diagnostics": dict(diag)}  # fmt: skip


def _gap(ours, theirs, mask) -> float:
    t = theirs.float().cpu().numpy()
    return float(abs(ours - t)[mask].max())


# ---------------------------------------------------------------- PPO: classic TRL, transcribed


class AdaptiveKLController:
    """trl v0.11.4 trl/trainer/utils.py AdaptiveKLController (Ziegler et al. 2019, 2.2)."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current, n_steps):
        import numpy as np

        proportional_error = np.clip(current / self.target - 1, -0.2, 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult


class FixedKLController:
    """trl v0.11.4 trl/trainer/utils.py FixedKLController."""

    def __init__(self, kl_coef):
        self.value = kl_coef

    def update(self, current, n_steps):
        pass


def masked_mean(values, mask):
    """trl v0.11.4 trl/core.py masked_mean (axis None)."""
    return (values * mask).sum() / mask.sum()


def masked_var(values, mask, unbiased=True):
    """trl v0.11.4 trl/core.py masked_var."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        mask_sum = mask.sum()
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance


def masked_whiten(values, mask, shift_mean=True):
    """trl v0.11.4 trl/core.py masked_whiten."""
    import torch

    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def logprobs_from_logits(logits, labels):
    """trl v0.11.4 trl/core.py logprobs_from_logits (gather=True)."""
    import torch.nn.functional as F

    logp = F.log_softmax(logits, dim=2)
    return logp.gather(2, labels.unsqueeze(2)).squeeze(-1)


class ClassicPPO:
    """The update of trl v0.11.4's PPOTrainer.step (trl/trainer/ppo_trainer.py), transcribed:
    a causal LM with a value head (AutoModelForCausalLMWithValueHead: ``Linear(hidden, 1)`` on
    the last hidden state; summary dropout off, as our head has none), kl_penalty "kl",
    no score scaling / clipping, whiten_rewards False."""

    def __init__(self, config: dict, model, head, ref, params, optimizer):
        self.cfg, self.model, self.head, self.ref = config, model, head, ref
        self.params, self.optimizer = params, optimizer
        init = config.get("init_kl_coef", 0.2)
        if config.get("adaptive_kl"):
            self.kl_ctl = AdaptiveKLController(init, config.get("kl_target", 6.0),
                                               config.get("kl_horizon", 10000.0))  # fmt: skip
        else:
            self.kl_ctl = FixedKLController(init)

    def _forward(self, model, ids, attn, with_values: bool):
        """``batched_forward_pass`` for right-padded rows: logprobs/values/masks on the
        shifted axis (position i predicts token i + 1)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = base.model(input_ids=ids, attention_mask=attn).last_hidden_state
        logits = base.lm_head(hidden).float()
        logprobs = logprobs_from_logits(logits[:, :-1, :], ids[:, 1:])
        values = self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)[:, :-1] \
            if with_values else None  # fmt: skip
        return logprobs, values

    def compute_rewards(self, scores, logprobs, ref_logprobs, masks):
        rewards, non_score_rewards, kls = [], [], []
        for score, logprob, ref_logprob, mask in zip(scores, logprobs, ref_logprobs, masks,
                                                     strict=True):  # fmt: skip
            kl = logprob - ref_logprob  # _kl_penalty, kl_penalty == "kl"
            kls.append(kl)
            non_score_reward = -self.kl_ctl.value * kl
            non_score_rewards.append(non_score_reward)
            reward = non_score_reward.clone()
            last_non_masked_index = mask.nonzero()[-1]
            reward[last_non_masked_index] += score
            rewards.append(reward)
        import torch

        return torch.stack(rewards), torch.stack(non_score_rewards), torch.stack(kls)

    def compute_advantages(self, values, rewards, mask):
        import torch

        gamma, lam = self.cfg.get("gamma", 1.0), self.cfg.get("lam", 0.95)
        lastgaelam = 0
        advantages_reversed = []
        gen_len = rewards.shape[-1]
        values = values * mask
        rewards = rewards * mask
        for t in reversed(range(gen_len)):
            nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
            delta = rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam = delta + gamma * lam * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1]).transpose(0, 1)
        returns = advantages + values
        advantages = masked_whiten(advantages, mask)
        return values, advantages.detach(), returns

    def loss(self, old_logprobs, values, vpreds, logprobs, mask, advantages, returns):
        import torch

        c, cv = self.cfg.get("clip_range", 0.2), self.cfg.get("clip_range_value", 0.2)
        vpredclipped = torch.max(torch.min(vpreds, values + cv), values - cv)  # clip_by_value
        vf_losses1 = (vpreds - returns) ** 2
        vf_losses2 = (vpredclipped - returns) ** 2
        vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
        ratio = torch.exp(logprobs - old_logprobs)
        pg_losses = -advantages * ratio
        pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - c, 1.0 + c)
        pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
        vf_coef = self.cfg.get("vf_coef", 0.1)
        if masked_mean(ratio, mask).item() > 10.0:  # ratio_threshold: skip the batch
            pg_loss, vf_loss = pg_loss * 0.0, vf_loss * 0.0
        return pg_loss, vf_coef * vf_loss

    def step(self, rows, scores, updates, device) -> tuple[list[float], dict]:
        import torch

        L = max(len(p) + len(c) for p, c in rows)
        ids = torch.zeros((len(rows), L), dtype=torch.long)
        attn = torch.zeros((len(rows), L), dtype=torch.long)
        masks = torch.zeros((len(rows), L - 1))
        for j, (p, c) in enumerate(rows):
            ids[j, : len(p) + len(c)] = torch.tensor(p + c)
            attn[j, : len(p) + len(c)] = 1
            start = len(p) - 1  # batched_forward_pass: masks[j, :start] = 0, [end:] = 0
            masks[j, start : start + len(c)] = 1
        ids, attn, masks = ids.to(device), attn.to(device), masks.to(device)
        scores = torch.tensor(scores, dtype=torch.float32, device=device)
        with torch.no_grad():
            all_logprobs, values = self._forward(self.model, ids, attn, True)
            ref_logprobs, _ = self._forward(self.ref, ids, attn, False)
            kl_coef = self.kl_ctl.value
            rewards, _, kls = self.compute_rewards(scores, all_logprobs, ref_logprobs, masks)
            values, advantages, returns = self.compute_advantages(values.float(), rewards, masks)
        losses = []
        clip = float(self.cfg["optimizer"].get("grad_clip_norm") or 0.0)
        for idx, _ in updates:
            sel = torch.as_tensor(idx, dtype=torch.long, device=device)
            logprobs, vpreds = self._forward(self.model, ids[sel], attn[sel], True)
            loss_p, loss_v = self.loss(
                all_logprobs[sel], values[sel], vpreds.float(), logprobs, masks[sel],
                advantages[sel], returns[sel],
            )  # fmt: skip
            loss = loss_p + loss_v
            losses.append(float(loss.detach()))
            pc.torch_step(loss, self.params, self.optimizer, _NoSchedule(), clip)
        mean_kl = float(((kls * masks).sum(axis=-1)).mean())  # record_step_stats objective/kl
        self.kl_ctl.update(mean_kl, len(rows))  # batch_size * num_processes
        shifted = {"masks": masks, "logprobs": all_logprobs, "advantages": advantages,
                   "returns": returns, "values": values}  # fmt: skip
        return losses, {"kl_coef": kl_coef, **shifted}


def _response_axis(x, rows):
    """Rows of a [B, L-1] classic tensor on our completion axis [B, T]."""
    import numpy as np

    a = x.float().cpu().numpy()
    T = max(len(c) for _, c in rows)
    out = np.zeros((len(rows), T), np.float32)
    for j, (p, c) in enumerate(rows):
        out[j, : len(c)] = a[j, len(p) - 1 : len(p) - 1 + len(c)]
    return out


def ppo_reference(ours: dict, config: dict, device: str, dtype: str) -> dict[str, Any]:
    import numpy as np
    import torch

    torch.manual_seed(0)
    model = _policy(config, ours["initial"], device, dtype)
    hidden = model.config.hidden_size
    head = torch.nn.Linear(hidden, 1).to(device)  # fp32 as ours
    with torch.no_grad():
        head.weight.copy_(pc.to_torch(ours["initial"]["value_head.weight"], device))
        head.bias.copy_(pc.to_torch(ours["initial"]["value_head.bias"], device))
    ref = _frozen(config, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = config["optimizer"]
    # TRL's PPOTrainer steps its scheduler once per iteration: num_training_steps = steps.
    optimizer, sched = pc.torch_optimizer(params, opt, len(ours["steps"]))
    ppo = ClassicPPO(config, model, head, ref, params, optimizer)
    step_losses, update_losses, kl_coefs, diag = [], [], [], defaultdict(float)
    per_step: list[dict] = []
    for s in ours["steps"]:
        rows = _rows(s)
        losses, got = ppo.step(rows, s["scores"], s["updates"], device)
        sched.step()
        update_losses.append(losses)
        step_losses.append(sum(losses) / len(losses))
        kl_coefs.append(got["kl_coef"])
        mask = s["mask"] > 0
        here = {}
        for ours_key, theirs in (("old_logps", "logprobs"), ("old_values", "values"),
                                 ("advantages", "advantages"), ("returns", "returns")):  # fmt: skip
            t = _response_axis(got[theirs], rows)
            o = s[ours_key][:, : t.shape[1]]
            m = mask[:, : t.shape[1]]
            here[ours_key] = float(np.abs(o - t)[m].max())
            here[ours_key + "_row"] = int(np.argmax(np.where(m, np.abs(o - t), 0).max(axis=1)))
            diag[ours_key] = max(diag[ours_key], here[ours_key])
        per_step.append(here)
    return {"losses": step_losses, "update_losses": update_losses, "kl_coefs": kl_coefs,
            "params": _final(model, config["method"], head), "diagnostics": dict(diag),
            "diagnostics_per_step": per_step}  # fmt: skip


# ---------------------------------------------------------------- cases


def _max_rel(ours: list[float], ref: list[float]) -> float:
    return max((abs(a - b) / max(abs(b), 1e-8) for a, b in zip(ours, ref, strict=True)),
               default=math.nan)  # fmt: skip


def run_case(name: str, args) -> dict[str, Any]:
    import services  # noqa: F401

    kind, make, what = VARIANTS[name]
    stored = make(args.steps, args.dtype)
    config = pc.resolve_paths(copy.deepcopy(stored))
    trainer = TRAINERS[kind]
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_ours(pc.load_trainer(trainer), config, Path(tmp) / "out")
    t_ours = time.perf_counter() - tic
    tic = time.perf_counter()
    ref_fn = grpo_reference if kind == "grpo" else ppo_reference
    ref = ref_fn(ours, config, args.torch_device, args.dtype)
    t_ref = time.perf_counter() - tic
    gap = pc.param_gap(ours["final"], ref["params"])
    cmp = pc.compare(ours["losses"], ref["losses"])
    ours_updates = [[float(loss) for _, loss in s["updates"]] for s in ours["steps"]]
    per_update = max(_max_rel(a, b) for a, b in zip(ours_updates, ref["update_losses"],
                                                     strict=True))  # fmt: skip
    rtol = pc.CPU_RTOL if args.dtype == "float32" else pc.GPU_RTOL
    extra: dict[str, Any] = {"max_rel_dloss_per_update": per_update,
                             "updates": sum(len(u) for u in ours_updates),
                             "diagnostics_max_abs": ref["diagnostics"]}  # fmt: skip
    ok = cmp["max_rel_dloss"] <= rtol and per_update <= rtol
    if kind == "ppo":
        ours_kl = [m["kl_coef"] for m in ours["metrics"]]
        extra["kl_coef"] = {"ours": ours_kl, "ref": [float(x) for x in ref["kl_coefs"]],
                            "max_rel": _max_rel(ours_kl, ref["kl_coefs"])}  # fmt: skip
        ok = ok and extra["kl_coef"]["max_rel"] <= rtol
    reference = (
        f"trl {pc.environment().get('trl')} GRPOTrainer._compute_loss / "
        "_get_per_token_logps_and_entropies (fused LM head) on transformers + peft, "
        "torch.optim + clip_grad_norm_ + transformers scheduler"
        if kind == "grpo"
        else "trl v0.11.4 PPOTrainer.step transcribed (compute_rewards, compute_advantages, "
        "loss, AdaptiveKLController) on transformers + peft + a Linear value head, "
        "torch.optim + clip_grad_norm_ + transformers scheduler stepped per iteration"
    )
    result = {
        "name": name,
        "trainer": trainer,
        "checks": what,
        "reference": reference,
        "device": args.device,
        "dtype": args.dtype,
        "ours_losses": ours["losses"],
        "ref_losses": ref["losses"],
        **cmp,
        "param_gap": gap,
        "target_rtol": rtol,
        "within_target": bool(ok),
        "seconds": {"ours": round(t_ours, 1), "reference": round(t_ref, 1)},
        **extra,
        "notes": what,
        "environment": pc.environment(),
    }
    if args.write_curves and args.device == "cpu" and args.dtype == "float32":
        pc.write_curve(
            name, trainer=trainer, config=stored, reference=reference, ref_losses=ref["losses"],
            ours_losses=ours["losses"], gap=gap, loss_key=LOSS_KEY, notes=what,
        )  # fmt: skip
    return result


CASES = {name: (lambda args, _n=name: run_case(_n, args)) for name in VARIANTS}


def main(argv: list[str] | None = None) -> int:
    args = pc.parse_args("GRPO / PPO parity against TRL's updates", argv)
    # Import everything once, before any case is timed.
    import peft  # noqa: F401
    import trl.trainer.grpo_trainer  # noqa: F401

    for dotted in TRAINERS.values():
        pc.load_trainer(dotted)

    def detail(r: dict) -> str:
        took = f"({r['seconds']['ours']}s + {r['seconds']['reference']}s)"
        return f"  per-update rel {r['max_rel_dloss_per_update']:.1e}  {took}"

    return pc.run_cases("parity-rl", CASES, args, detail)


if __name__ == "__main__":
    raise SystemExit(main())
