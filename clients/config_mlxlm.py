"""mlx-lm's ``lora`` config keys (``iters``, ``lr_schedule``, ...) as spec fragments.

Split from config.py so the compatibility table with mlx-lm (what each of its keys means
here, which ones are ignored with a note, which are refused) reads as one list. config.py
consults ``ALIASES`` / ``IGNORED`` / ``UNSUPPORTED`` while it builds a spec, and re-exports them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.config_normalize import ConfigError, _nest, normalize
from mlx_unified.v1 import common_pb2


@dataclass
class _Ctx:
    kind: str
    primary: str  # the model field: model / student / policy
    data: Mapping[str, Any]
    notes: list[str]


Fragment = tuple[dict[str, Any], int]  # (JSON-shaped spec fragment, priority)
Alias = Callable[[Any, _Ctx], list[Fragment]]


def _to(*path: str) -> Alias:
    return lambda v, ctx: [(_nest(path, v), 0)]


def _adapter_dir(v: Any, ctx: _Ctx) -> list[Fragment]:
    p = str(v)
    if p.endswith(".safetensors"):  # mlx-lm names the file; we take its directory
        p = str(Path(p).parent)
    return [({ctx.primary: {"adapter_path": p}}, 0)]


def _lora_parameters(v: Any, ctx: _Ctx) -> list[Fragment]:
    desc = common_pb2.LoraConfig.DESCRIPTOR
    return [({"lora": normalize(desc, v, "lora_parameters")}, 0)]


def _optimizer_name(ctx: _Ctx) -> str:
    opt = ctx.data.get("optimizer", "adam")  # mlx-lm's default
    if isinstance(opt, Mapping):
        opt = opt.get("name", "adam")
    return str(opt).lower()


def _optimizer_config(v: Any, ctx: _Ctx) -> list[Fragment]:
    if not isinstance(v, Mapping):
        raise ConfigError("optimizer_config", "expected a mapping of optimizer name -> settings")
    name = _optimizer_name(ctx)
    others = [k for k in v if k != name]
    if others:
        ctx.notes.append(f"optimizer_config: ignoring sections {others} (optimizer is {name})")
    section = v.get(name) or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"optimizer_config.{name}", "expected a mapping")
    out: dict[str, Any] = {}
    for key, x in section.items():
        where = f"optimizer_config.{name}.{key}"
        if key == "betas":
            if not isinstance(x, list | tuple) or len(x) != 2:
                raise ConfigError(where, "expected [beta1, beta2]")
            out["beta1"], out["beta2"] = x
        elif key in ("eps", "weight_decay", "momentum", "bias_correction"):
            out[key] = x
        else:
            known = "betas, eps, weight_decay, momentum, bias_correction"
            raise ConfigError(where, f"unknown key (known: {known})")
    return [({"optimizer": out}, 0)]


_SCHEDULES = {"cosine_decay": "COSINE", "linear_schedule": "LINEAR", "constant": "CONSTANT"}


def _lr_schedule(v: Any, ctx: _Ctx) -> list[Fragment]:
    if not isinstance(v, Mapping):
        raise ConfigError("lr_schedule", "expected a mapping {name, arguments, warmup}")
    extra = set(v) - {"name", "arguments", "warmup", "warmup_init"}
    if extra:
        raise ConfigError(f"lr_schedule.{sorted(extra)[0]}", "unknown key")
    name = str(v.get("name", ""))
    if name not in _SCHEDULES:
        raise ConfigError("lr_schedule.name", f"unsupported {name!r}; one of {list(_SCHEDULES)}")
    args = list(v.get("arguments") or [])
    opt: dict[str, Any] = {"schedule": _SCHEDULES[name]}
    if v.get("warmup"):
        opt["warmup_steps"] = v["warmup"]
    if v.get("warmup_init"):
        ctx.notes.append("lr_schedule.warmup_init: ignored (warmup starts from 0)")
    # mlx-lm: cosine_decay(init, decay_steps, end), linear_schedule(init, end, steps).
    end_index = {"cosine_decay": 2, "linear_schedule": 1}.get(name)
    try:
        init = float(args[0]) if args else None
        if init and end_index is not None and len(args) > end_index:
            opt["min_lr_ratio"] = float(args[end_index]) / init
    except (TypeError, ValueError):
        raise ConfigError("lr_schedule.arguments", f"expected numbers, got {args!r}") from None
    frags: list[Fragment] = [({"optimizer": opt}, 0)]
    if init is not None:
        # As in mlx-lm, the schedule's initial value is the learning rate.
        frags.append(({"optimizer": {"learning_rate": init}}, 1))
    return frags


def _teacher(v: Any, ctx: _Ctx) -> list[Fragment]:
    items = v if isinstance(v, list) else [v]
    return [({"teachers": [{"model": x} if isinstance(x, str) else x for x in items]}, 0)]


def _model(v: Any, ctx: _Ctx) -> list[Fragment]:
    return [({ctx.primary: v}, 0)]


_LOOP_KEYS = (  # noqa: SIM905 - a word list reads better than 14 quoted strings
    "batch_size grad_accumulation_steps max_steps epochs max_seq_length seed steps_per_report "
    "steps_per_eval val_batches steps_per_checkpoint keep_last_checkpoints grad_checkpoint "
    "mask_prompt dtype"
).split()
_OPT_KEYS = ["learning_rate", "weight_decay", "warmup_steps", "grad_clip_norm", "min_lr_ratio"]

# alias -> (top-level spec field it needs, how it maps)
ALIASES: dict[str, tuple[str, Alias]] = {
    **{k: ("loop", _to("loop", k)) for k in _LOOP_KEYS},
    **{k: ("optimizer", _to("optimizer", k)) for k in _OPT_KEYS},
    "iters": ("loop", _to("loop", "max_steps")),
    "save_every": ("loop", _to("loop", "steps_per_checkpoint")),
    "warmup": ("optimizer", _to("optimizer", "warmup_steps")),
    "grad_clip": ("optimizer", _to("optimizer", "grad_clip_norm")),
    "max_grad_norm": ("optimizer", _to("optimizer", "grad_clip_norm")),
    "optimizer_config": ("optimizer", _optimizer_config),
    "lr_schedule": ("optimizer", _lr_schedule),
    "data": ("dataset", _to("dataset", "path")),
    "valid_data": ("dataset", _to("dataset", "valid_path")),
    "fine_tune_type": ("method", _to("method")),
    "num_layers": ("lora", _to("lora", "num_layers")),
    "lora_parameters": ("lora", _lora_parameters),
    "adapter_path": ("output_name", _to("output_name")),
    "resume_adapter_file": ("", _adapter_dir),
    "adapter": ("", _adapter_dir),
    "model": ("", _model),
    "teacher": ("teachers", _teacher),
    "reward_model": ("reward", _to("reward", "reward_model")),
    "reward_function": ("reward", _to("reward", "reward_function")),
    "bits": ("quantization", _to("quantization", "bits")),
    "group_size": ("quantization", _to("quantization", "group_size")),
    "q_bits": ("quantization", _to("quantization", "bits")),
    "q_group_size": ("quantization", _to("quantization", "group_size")),
}

# mlx-lm keys that mean nothing here: accepted with a note so mlx-lm configs still load.
IGNORED = {
    "train": "mlxu train always trains",
    "test": "run evaluation separately",
    "test_batches": "run evaluation separately",
    "report_to": "metrics stream through the job's events",
    "project_name": "metrics stream through the job's events",
    "wandb": "metrics stream through the job's events",
    "clear_cache_threshold": "the trainer manages its cache",
    "trust_remote_code": "models load without remote code",
    "config": "nested config files are not supported",
}
UNSUPPORTED = {
    "hf_dataset": "no hub datasets at run time; export it to JSONL and set `data`",
}
