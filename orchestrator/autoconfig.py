"""auto_configure: fill the hyperparameters a user left unset, from model size, data size
and memory. A field the user set is never changed; every choice is written, with its reason,
into the stage's ``auto_configure`` record of ``Pipeline.resolved``.

Inputs (``Environment``, given by the server): ``model_info(ref)`` -> parameter count (and
layer count), ``dataset_info(DatasetRef)`` -> rows and tokens, ``memory_bytes`` available to
one job. A bound model's size is that of its source stage's output (a distilled student built
with ``student_init`` keeping k of L teacher layers has ~k/L of the teacher's parameters).

Rules (P = trainable model params, F = params of frozen companions: the reference for
DPO/PPO/GRPO, the reward model for PPO/GRPO, the teachers for distillation):

- budget = 75% of memory; half of it for weights + optimizer state, the rest activations.
- method: FULL if P <= 3e9 and 16 B/param (fp32 weights, grads, AdamW m, v) + 4 B/param of F
  fit the state half; else LORA if 4 B/param (frozen fp32) of P + F fit; else QLORA (4-bit
  base, ~0.6 B/param for P and F). DoRA is never picked automatically.
- LoRA rank: 8 up to 1e9 params, 16 up to 1e10, 32 above; doubled (max 64) when the dataset
  has more than 5e7 tokens.
- learning rate (full / adapter; full halves at P >= 1e9): sft and distill 2e-5 / 2e-4,
  reward_model 1e-5 / 1e-4, dpo 5e-7 / 5e-6 (DPO's implicit reward is sensitive to large
  steps), ppo and grpo 1e-6 / 1e-5.
- max_seq_length: the power of two >= 2x the mean tokens per row, within [128, 2048]
  (512 when the token count is unknown).
- batch_size: activations ~ max(2 MiB, P/800 B) per token (fp32, logits included), times 2
  for pairwise stages (reward_model, dpo: chosen + rejected) and policy+reference rollouts
  (ppo), times 4 for grpo (its group); the largest power of two <= 16 whose sequences fit
  the remaining memory and <= the training rows. If not even one fits: batch 1 with
  gradient checkpointing. With batch < 4 and >= 64 rows, gradient accumulation reaches 4.
- epochs: sft/distill 3 below 1k rows, 2 below 10k, else 1; reward_model/dpo/ppo/grpo 1
  (preference and RL objectives overfit fast). max_steps = ceil(train rows x epochs /
  (batch x accumulation)); ppo/grpo: ceil(prompts x epochs / rollout batch (default 8)).
  Train rows = rows minus the validation fraction (default 0.1) when there is no validation
  file (neither valid_path nor a directory's valid.jsonl), else all of them.
- export stages have nothing to configure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from google.protobuf.message import Message

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from orchestrator.pipeline import Plan, StagePlan, ref_at, to_json
from services import registry
from services.runtime.errors import FailedPrecondition, InvalidArgument

GiB = 1 << 30
BUDGET_FRACTION = 0.75
STATE_SHARE = 0.5
FULL_MAX_PARAMS = 3e9
BYTES = {"full": 16.0, "lora": 4.0, "qlora": 0.6}
COMPANION_BYTES = {"full": 4.0, "lora": 4.0, "qlora": 0.6}
METHOD_ENUM = {
    "full": cpb.FINETUNE_METHOD_FULL,
    "lora": cpb.FINETUNE_METHOD_LORA,
    "qlora": cpb.FINETUNE_METHOD_QLORA,
}
# Per-method recipe values (services.registry): learning rates (full, adapters) for
# bias-corrected AdamW, and how many sequences one row puts through the model in a step.
LR = {m.name: m.auto_lr for m in registry.METHODS if m.auto_lr}
SEQ_FACTOR = {m.name: m.seq_factor for m in registry.METHODS}


@dataclass(frozen=True)
class ModelInfo:
    params: int
    num_layers: int = 0  # 0 = unknown


@dataclass(frozen=True)
class DatasetInfo:
    rows: int  # training rows (a directory's train.jsonl)
    tokens: int = 0  # 0 = unknown
    valid_rows: int = 0  # rows of its own validation file (valid.jsonl); 0 = none


@dataclass(frozen=True)
class Environment:
    model_info: Callable[[str], ModelInfo | int]
    dataset_info: Callable[[cpb.DatasetRef], DatasetInfo]
    memory_bytes: int

    def model(self, ref: str, field: str) -> ModelInfo:
        try:
            got = self.model_info(ref)
        except Exception as e:  # any failure is the user's to fix: another ref, or no auto
            raise InvalidArgument.one(
                field, f"cannot size model {ref!r} for auto_configure: {e}"
            ) from None
        return got if isinstance(got, ModelInfo) else ModelInfo(int(got))

    def data(self, ref: cpb.DatasetRef, field: str) -> DatasetInfo:
        try:
            return self.dataset_info(ref)
        except Exception as e:
            raise InvalidArgument.one(field, f"cannot read dataset {ref.path!r}: {e}") from None


def apply(spec: opb.PipelineSpec, plan: Plan, env: Environment | None) -> Plan:
    """Auto-configure every stage of ``plan``; returns a new plan with ``auto`` records."""
    if env is None:
        raise FailedPrecondition("auto_configure is not available: no model/dataset facts")
    sizes: dict[str, ModelInfo] = {}
    out: list[StagePlan] = []
    for sp in plan.stages:
        msg = sp.message()
        binds = {b.target: b.from_stage for b in sp.bindings}
        path = f"spec.stages[{sp.index}].{sp.info.name}"

        def size(
            target: str, msg: Message = msg, binds: dict = binds, path: str = path
        ) -> ModelInfo:
            if target in binds:
                return sizes[binds[target]]
            return env.model(ref_at(msg, target).model, f"{path}.{target}.model")

        name = sp.info.name
        frozen = 0
        if name == "distill":
            teachers = [size(f"teachers[{k}].model") for k in range(len(msg.teachers))]
            frozen = sum(t.params for t in teachers)
            init = msg.student_init
            keep = len(init.keep_teacher_layers) or init.num_layers
            if keep:
                t0 = teachers[0]
                frac = keep / t0.num_layers if t0.num_layers else 0.5
                model = ModelInfo(int(t0.params * min(1.0, frac)), keep)
            else:
                model = size("student")
        else:
            model = size(sp.info.model_target)
            method = registry.get(name)
            if method.has_reference:  # a frozen copy of the policy
                frozen = model.params
            if method.rollouts and msg.reward.reward_model.model:
                frozen += size("reward.reward_model").params
        sizes[sp.name] = model
        if name == "export":
            out.append(replace(sp, auto={"note": "export stages have nothing to configure"}))
            continue
        data = env.data(msg.dataset, f"{path}.dataset.path")
        auto = configure(name, msg, model.params, frozen, data, env.memory_bytes)
        out.append(replace(sp, spec=to_json(msg), auto=auto))
    return replace(plan, stages=tuple(out))


def configure(
    kind: str, msg: Any, params: int, frozen: int, data: DatasetInfo, memory: int
) -> dict[str, Any]:
    """Fill unset fields of one stage spec in place; returns what was set and why."""
    budget = BUDGET_FRACTION * memory
    state_budget = STATE_SHARE * budget
    chosen: dict[str, Any] = {}
    why: dict[str, str] = {}

    def need(m: str) -> float:
        return BYTES[m] * params + COMPANION_BYTES[m] * frozen

    if msg.method == cpb.FINETUNE_METHOD_UNSPECIFIED:
        if params <= FULL_MAX_PARAMS and need("full") <= state_budget:
            method = "full"
        elif need("lora") <= state_budget:
            method = "lora"
        else:
            method = "qlora"
        msg.method = METHOD_ENUM[method]
        chosen["method"] = cpb.FinetuneMethod.Name(msg.method)
        why["method"] = (
            f"needs ~{need(method) / GiB:.2f} GiB for weights+state of {params:,} params "
            f"(+{frozen:,} frozen); {state_budget / GiB:.2f} GiB available for it"
        )
    else:
        method = {cpb.FINETUNE_METHOD_FULL: "full", cpb.FINETUNE_METHOD_QLORA: "qlora"}.get(
            msg.method, "lora"
        )
    adapter = method != "full"
    if adapter and msg.lora.rank == 0:
        rank = 8 if params <= 1e9 else 16 if params <= 1e10 else 32
        if data.tokens > 5e7:
            rank = min(64, rank * 2)
        msg.lora.rank = rank
        chosen["lora.rank"] = rank
        why["lora.rank"] = "by model size (8/16/32 at 1e9/1e10), x2 above 5e7 dataset tokens"
    if msg.optimizer.learning_rate == 0:
        full_lr, adapter_lr = LR[kind]
        lr = adapter_lr if adapter else full_lr / (2 if params >= 1e9 else 1)
        msg.optimizer.learning_rate = lr
        chosen["optimizer.learning_rate"] = lr
        why["optimizer.learning_rate"] = f"{kind} with {'adapters' if adapter else 'full'}"
    loop = msg.loop
    if loop.max_seq_length == 0:
        mean = data.tokens / data.rows if data.rows and data.tokens else 0
        length = 512 if not mean else min(2048, max(128, 1 << math.ceil(math.log2(2 * mean))))
        loop.max_seq_length = length
        chosen["loop.max_seq_length"] = length
        why["loop.max_seq_length"] = f"2x the mean row length ({mean:.0f} tokens), power of 2"
    train_rows = data.rows
    if msg.dataset.valid_path:
        held = "valid_path held out"
    elif data.valid_rows:
        held = f"valid.jsonl's {data.valid_rows} rows held out"
    else:
        vf = msg.dataset.valid_fraction if msg.dataset.HasField("valid_fraction") else 0.1
        # Sizing only: an out-of-range fraction (even -1e308) is refused with its field by
        # the stage checks that follow, not by an OverflowError here.
        vf = min(max(vf, 0.0), 0.5)
        train_rows = max(1, round(data.rows * (1 - vf))) if data.rows else 0
        held = f"{vf:.0%} of {data.rows} held out" if vf else "none held out"
    if loop.batch_size == 0:
        act = max(2 * (1 << 20), params / 800) * SEQ_FACTOR.get(kind, 1)
        room = max(0.0, budget - need(method))
        fits = int(room // (loop.max_seq_length * act))
        cap = min(16, fits, train_rows or 16)
        batch = 1 << int(math.log2(cap)) if cap >= 1 else 1
        loop.batch_size = batch
        chosen["loop.batch_size"] = batch
        why["loop.batch_size"] = f"{fits} sequences of {loop.max_seq_length} fit in memory"
        if fits < 1 and not loop.grad_checkpoint:
            loop.grad_checkpoint = True
            chosen["loop.grad_checkpoint"] = True
            why["loop.grad_checkpoint"] = "one sequence's activations do not fit otherwise"
        if batch < 4 and train_rows >= 64 and loop.grad_accumulation_steps == 0:
            loop.grad_accumulation_steps = 4 // batch
            chosen["loop.grad_accumulation_steps"] = loop.grad_accumulation_steps
            why["loop.grad_accumulation_steps"] = "reach 4 sequences per optimizer step"
    if loop.max_steps == 0 and train_rows:
        if loop.epochs == 0:
            by_size = registry.get(kind).epochs_by_size
            epochs = (3 if data.rows < 1000 else 2 if data.rows < 10000 else 1) if by_size else 1
            loop.epochs = epochs
            chosen["loop.epochs"] = epochs
            why["loop.epochs"] = f"{data.rows} rows ({kind})"
        if registry.get(kind).rollouts:
            per_step = msg.rollout.batch_size or 8
            steps = math.ceil(data.rows * loop.epochs / per_step)
            over = f"{data.rows} prompts"
        else:
            per_step = loop.batch_size * max(1, loop.grad_accumulation_steps)
            steps = math.ceil(train_rows * loop.epochs / per_step)
            over = f"{train_rows} training rows ({held})"
        loop.max_steps = max(1, steps)
        chosen["loop.max_steps"] = loop.max_steps
        why["loop.max_steps"] = f"{loop.epochs} epoch(s) of {over}, {per_step} a step"
    return {
        "model_params": params,
        "frozen_params": frozen,
        "dataset_rows": data.rows,
        "dataset_tokens": data.tokens,
        "memory_bytes": memory,
        "chosen": chosen,
        "why": why,
    }
