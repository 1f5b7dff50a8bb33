"""Proto specs -> plain config dicts for trainers, plus the range checks every service shares.

The trainers' own config classes (services.runtime.loop / optim / adapters) are the source
of truth for field rules; the checks here only add bounds on absurd values (a batch of a
million, a learning rate of 50) so they are refused at the edge with the proto field name.

Proto3 "zero means default": only fields that are set (non-zero, or present for `optional`)
appear in the dict, so a trainer's config dataclass fills its own defaults in one place.
Enum values become short lowercase names (OPTIMIZER_NAME_ADAMW -> "adamw").
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.runtime.errors import Violations


def _enum_short(field: FieldDescriptor, number: int) -> str:
    enum = field.enum_type
    name = enum.values_by_number[number].name if number in enum.values_by_number else str(number)
    # buf style: every value starts with the prefix of the zero value `<PREFIX>_UNSPECIFIED`.
    prefix = enum.values_by_number[0].name.removesuffix("UNSPECIFIED")
    return name.removeprefix(prefix).lower()


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return to_dict(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return _enum_short(field, value)
    return value


def to_dict(msg: Message) -> dict[str, Any]:
    """Set fields only, recursively; maps and repeated fields become dicts and lists."""
    out: dict[str, Any] = {}
    for field, value in msg.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            vf = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _value(vf, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value(field, v) for v in value]
        else:
            out[field.name] = _value(field, value)
    return out


def enum_unset(value: int) -> bool:
    return value == 0


# --- shared range checks; `prefix` is the field path of the sub-message --------------------


def check_loop(v: Violations, loop: Message, prefix: str) -> None:
    v.check(0 <= loop.batch_size <= 4096, f"{prefix}.batch_size", "must be between 1 and 4096")
    v.check(
        0 <= loop.grad_accumulation_steps <= 1024,
        f"{prefix}.grad_accumulation_steps",
        "must be between 1 and 1024",
    )
    v.check(0 <= loop.max_steps <= 10_000_000, f"{prefix}.max_steps", "must be 0..10,000,000")
    v.check(0 <= loop.epochs <= 1000, f"{prefix}.epochs", "must be 0..1000")
    v.check(
        loop.max_seq_length == 0 or 8 <= loop.max_seq_length <= 131072,
        f"{prefix}.max_seq_length",
        "must be between 8 and 131072",
    )
    v.check(loop.steps_per_report >= 0, f"{prefix}.steps_per_report", "must be >= 0")
    v.check(loop.steps_per_eval >= -1, f"{prefix}.steps_per_eval", "must be >= -1")
    v.check(loop.val_batches >= -1, f"{prefix}.val_batches", "must be >= -1")
    v.check(
        loop.steps_per_checkpoint >= -1,
        f"{prefix}.steps_per_checkpoint",
        "must be >= 1, or -1 (only at the end)",
    )
    v.check(
        -1 <= loop.keep_last_checkpoints <= 100,
        f"{prefix}.keep_last_checkpoints",
        "must be 1..100, or -1 (keep all)",
    )
    v.check(
        loop.dtype in ("", "float32", "bfloat16", "float16"),
        f"{prefix}.dtype",
        f"{loop.dtype!r} is not one of float32, bfloat16, float16",
    )
    if loop.batch_size and loop.grad_accumulation_steps:
        v.check(
            loop.batch_size % loop.grad_accumulation_steps == 0,
            f"{prefix}.batch_size",
            "must be divisible by grad_accumulation_steps",
        )


def check_optimizer(v: Violations, o: Message, prefix: str) -> None:
    v.check(
        0 <= o.learning_rate <= 1.0, f"{prefix}.learning_rate", "must be > 0 and <= 1 (0 = default)"
    )
    if o.HasField("weight_decay"):
        v.check(0 <= o.weight_decay < 1, f"{prefix}.weight_decay", "must be in [0, 1)")
    v.check(0 <= o.beta1 < 1, f"{prefix}.beta1", "must be in [0, 1)")
    v.check(0 <= o.beta2 < 1, f"{prefix}.beta2", "must be in [0, 1)")
    v.check(0 <= o.eps < 1, f"{prefix}.eps", "must be in [0, 1)")
    v.check(0 <= o.momentum < 1, f"{prefix}.momentum", "must be in [0, 1)")
    v.check(o.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
    v.check(0 <= o.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", "must be in [0, 1]")
    v.check(o.grad_clip_norm >= 0, f"{prefix}.grad_clip_norm", "must be >= 0")


def check_lora(v: Violations, lora: Message, prefix: str) -> None:
    v.check(0 <= lora.rank <= 1024, f"{prefix}.rank", "must be between 1 and 1024")
    v.check(0 <= lora.scale <= 1e4, f"{prefix}.scale", "must be > 0")
    v.check(0 <= lora.dropout < 1, f"{prefix}.dropout", "must be in [0, 1)")
    v.check(lora.num_layers >= -1, f"{prefix}.num_layers", "must be -1 (all) or >= 0")


def check_quantization(v: Violations, q: Message, prefix: str) -> None:
    v.check(q.bits in (0, 2, 3, 4, 5, 6, 8), f"{prefix}.bits", "must be 4 or 8 (2-6 also work)")
    v.check(q.group_size in (0, 32, 64, 128), f"{prefix}.group_size", "must be 32, 64 or 128")


def check_resources(v: Violations, r: Message, prefix: str) -> None:
    v.check(0 <= r.num_processes <= 256, f"{prefix}.num_processes", "must be 1..256")
    if r.hosts and r.hostfile:
        v.add(f"{prefix}.hosts", "give hosts or hostfile, not both")


def check_common(v: Violations, spec: Message, prefix: str = "spec") -> None:
    """The loop / optimizer / LoRA / resources checks every trainer spec shares."""
    check_loop(v, spec.loop, f"{prefix}.loop")
    check_optimizer(v, spec.optimizer, f"{prefix}.optimizer")
    check_lora(v, spec.lora, f"{prefix}.lora")
    check_resources(v, spec.resources, f"{prefix}.resources")
