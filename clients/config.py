"""YAML run configs -> spec messages (SFTSpec, DistillationSpec, DPOSpec, ...).

Two vocabularies, freely mixed in one file:

* native keys, shaped like the spec message (``loop: {max_steps: 100}``, ``method: lora``),
  with shortcuts: a model / dataset / optimizer given as a plain string, enums by short name;
* mlx-lm's ``lora`` config keys (``iters``, ``learning_rate``, ``lora_parameters``,
  ``lr_schedule``, ...) so an existing mlx-lm YAML runs unchanged.

Precedence: overrides (CLI flags) > YAML. Two YAML keys that set the same field to different
values are an error, except mlx-lm's own rule that ``lr_schedule`` beats ``learning_rate``.
Unknown keys are an error naming the key.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from mlx_unified.v1 import common_pb2, orchestrator_pb2
from services import registry

# kind -> (spec message, the field mlx-lm's `model` key means), from services.registry
KINDS: dict[str, tuple[type[Message], str]] = {
    m.name: (m.spec, m.model_field) for m in registry.METHODS
}


class ConfigError(ValueError):
    """A config problem, naming the key as the user wrote it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class Built:
    spec: Message
    notes: tuple[str, ...] = ()  # keys accepted but ignored, precedence decisions


# PyYAML reads "1e-5" as a string (YAML 1.1); mlx-lm patches the global SafeLoader, we subclass.
class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "config") -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(source, f"invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(source, "the top level must be a mapping of keys to values")
    return data


def parse_scalar(text: str) -> Any:
    """A flag value as YAML reads it ("10" -> 10, "1e-4" -> 0.0001, "[a, b]" -> list); text
    YAML cannot read stays a string."""
    try:
        return yaml.load(text, Loader=_Loader) if text.strip() else text  # noqa: S506
    except yaml.YAMLError:
        return text


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(str(path), f"cannot read config file ({e.strerror or e})") from None
    return parse_yaml(text, str(path))


# ---- generic normalisation against a message descriptor --------------------------------

_ENUM_ALIASES = {
    "mlx_unified.v1.LrSchedule": {"COSINE_DECAY": "COSINE", "LINEAR_SCHEDULE": "LINEAR"},
    "mlx_unified.v1.DatasetFormat": {"MESSAGES": "CHAT", "COMPLETIONS": "COMPLETION"},
    "mlx_unified.v1.Divergence": {"KL": "FORWARD_KL", "FKL": "FORWARD_KL", "RKL": "REVERSE_KL"},
    "mlx_unified.v1.StageKind": {"DISTILLATION": "DISTILL", "REWARD": "REWARD_MODEL"},
}


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.7)
    if close:
        return f"did you mean '{close[0]}'?"
    return f"known: {', '.join(sorted(set(choices)))}"


def enum_name(enum: EnumDescriptor, value: Any, where: str) -> str:
    """A short or full enum name (any case, '-' or '_') or number -> the full value name."""
    unspecified = next((v.name for v in enum.values if v.number == 0), "")
    prefix = unspecified[: -len("UNSPECIFIED")] if unspecified.endswith("UNSPECIFIED") else ""
    if isinstance(value, int) and not isinstance(value, bool):
        if value in enum.values_by_number:
            return enum.values_by_number[value].name
    elif isinstance(value, str):
        s = value.strip().upper().replace("-", "_").replace(" ", "_")
        s = _ENUM_ALIASES.get(enum.full_name, {}).get(s, s)
        for cand in (s, prefix + s):
            if cand in enum.values_by_name:
                return cand
    short = [v.name[len(prefix) :].lower() for v in enum.values if v.number != 0]
    raise ConfigError(where, f"invalid value {value!r}; one of: {', '.join(short)}")


# A plain string is accepted for these messages, meaning the one field named here.
_STRING_SHORTCUT = {
    "mlx_unified.v1.ModelRef": "model",
    "mlx_unified.v1.DatasetRef": "path",
    "mlx_unified.v1.OptimizerConfig": "name",
    "mlx_unified.v1.RewardSource": "reward_function",
}


def _field(desc: Descriptor, key: str) -> FieldDescriptor | None:
    f = desc.fields_by_name.get(key)
    if f is None:
        f = next((x for x in desc.fields if x.json_name == key), None)
    return f


def normalize(desc: Descriptor, value: Any, where: str = "") -> dict[str, Any]:
    """Check keys and coerce values of a JSON-shaped dict for ``desc`` (ParseDict-ready)."""
    if not isinstance(value, Mapping):
        raise ConfigError(where, f"expected a mapping, got {type(value).__name__}")
    out: dict[str, Any] = {}
    for key, v in value.items():
        key = str(key)
        sub = f"{where}.{key}" if where else key
        f = _field(desc, key)
        if f is None:
            raise ConfigError(sub, f"unknown key ({_suggest(key, list(desc.fields_by_name))})")
        if v is not None:  # YAML null = leave unset (mlx-lm configs write `key: null`)
            out[f.name] = _value(f, v, sub)
    return out


def _is_map(f: FieldDescriptor) -> bool:
    return f.type == f.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def _value(f: FieldDescriptor, v: Any, where: str) -> Any:
    if _is_map(f):
        if not isinstance(v, Mapping):
            raise ConfigError(where, "expected a mapping")
        vf = f.message_type.fields_by_name["value"]
        return {str(k): _single(vf, x, f"{where}.{k}") for k, x in v.items()}
    if f.is_repeated:
        items = v if isinstance(v, list | tuple) else [v]
        return [_single(f, x, f"{where}[{i}]") for i, x in enumerate(items)]
    return _single(f, v, where)


def _single(f: FieldDescriptor, v: Any, where: str) -> Any:
    if f.type == f.TYPE_MESSAGE:
        mt = f.message_type
        if mt.full_name.startswith("google.protobuf."):
            return v  # Struct / Timestamp: json_format's own rules
        if isinstance(v, str) and mt.full_name in _STRING_SHORTCUT:
            v = {_STRING_SHORTCUT[mt.full_name]: v}
        if mt.full_name == "mlx_unified.v1.Teacher" and isinstance(v, str):
            v = {"model": v}
        return normalize(mt, v, where)
    if f.type == f.TYPE_ENUM:
        return enum_name(f.enum_type, v, where)
    return _scalar(f, v, where)


def _scalar(f: FieldDescriptor, v: Any, where: str) -> Any:
    cpp = f.cpp_type
    if cpp == f.CPPTYPE_BOOL:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
            return v.lower() in ("true", "yes", "1")
        raise ConfigError(where, f"expected true or false, got {v!r}")
    if cpp == f.CPPTYPE_STRING:
        if isinstance(v, str | int | float) and not isinstance(v, bool):
            return str(v)
        raise ConfigError(where, f"expected a string, got {v!r}")
    if cpp in (f.CPPTYPE_DOUBLE, f.CPPTYPE_FLOAT):
        try:
            if isinstance(v, bool):
                raise ValueError
            return float(v)
        except (TypeError, ValueError):
            raise ConfigError(where, f"expected a number, got {v!r}") from None
    # Integers: accept 100, 100.0 and "100", not 1.5 or true.
    try:
        if isinstance(v, bool):
            raise ValueError
        n = float(v) if isinstance(v, str) and not v.strip().lstrip("-").isdigit() else v
        if isinstance(n, float) and not n.is_integer():
            raise ValueError
        return int(n)
    except (TypeError, ValueError):
        raise ConfigError(where, f"expected an integer, got {v!r}") from None


def _flatten(desc: Descriptor, d: Mapping[str, Any], prefix: tuple[str, ...] = ()):
    """Leaf assignments of a normalised dict; lists, maps and well-known types are leaves."""
    for key, v in d.items():
        f = desc.fields_by_name[key]
        nested = (
            f.type == f.TYPE_MESSAGE
            and not f.is_repeated
            and not f.message_type.full_name.startswith("google.protobuf.")
            and isinstance(v, Mapping)
        )
        if nested and v:
            yield from _flatten(f.message_type, v, (*prefix, key))
        elif not nested:
            yield (*prefix, key), v


def _nest(path: tuple[str, ...] | list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


# ---- mlx-lm aliases ---------------------------------------------------------------------


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


# ---- building a spec --------------------------------------------------------------------


def _fragments(key: str, v: Any, desc: Descriptor, ctx: _Ctx) -> list[Fragment]:
    """The spec fragments one top-level (or override) key contributes."""
    if "." in key:  # dotted native path, e.g. "loop.max_steps" (from --set)
        return [(_nest(key.split("."), v), 0)]
    native = _field(desc, key) is not None
    if native and not (key == "model" and ctx.primary != "model"):
        return [({key: v}, 0)]
    if key in ALIASES:
        needs, fn = ALIASES[key]
        if not needs or needs in desc.fields_by_name:
            return fn(v, ctx)
    if key in UNSUPPORTED:
        raise ConfigError(key, UNSUPPORTED[key])
    if key in IGNORED:
        ctx.notes.append(f"{key}: ignored ({IGNORED[key]})")
        return []
    usable = [k for k, (needs, _) in ALIASES.items() if not needs or needs in desc.fields_by_name]
    choices = [*desc.fields_by_name, *usable]
    raise ConfigError(key, f"unknown key for a {ctx.kind} spec ({_suggest(key, choices)})")


def build_spec(
    kind: str, data: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None
) -> Built:
    """Map YAML data plus overrides (None values skipped) to the ``kind`` spec message."""
    kind = kind.replace("-", "_")
    if kind not in KINDS:
        raise ConfigError("kind", f"unknown spec kind {kind!r}; one of {', '.join(KINDS)}")
    cls, primary = KINDS[kind]
    desc = cls.DESCRIPTOR
    data = dict(data or {})
    ctx = _Ctx(kind, primary, data, [])
    # path -> (value, source key, priority)
    leaves: dict[tuple[str, ...], tuple[Any, str, int]] = {}

    def apply(key: str, value: Any, override: bool) -> None:
        if value is None:  # unset: a YAML null or a flag that was not given
            return
        for frag, prio in _fragments(key, value, desc, ctx):
            try:
                norm = normalize(desc, frag)
            except ConfigError as e:
                if e.key == key or e.key.startswith((f"{key}.", f"{key}[")):
                    raise
                # An alias: report the key as the user wrote it, and the field it maps to.
                raise ConfigError(key, f"{e.problem} (as {e.key})") from None
            for path, v in _flatten(desc, norm):
                prio_now = 100 if override else prio
                old = leaves.get(path)
                dotted = ".".join(path)
                if old is None or prio_now > old[2]:
                    if old is not None and not override and old[0] != v:
                        ctx.notes.append(f"{key} takes precedence over {old[1]} for {dotted}")
                    leaves[path] = (v, key, prio_now)
                elif prio_now < old[2]:
                    if old[0] != v:
                        ctx.notes.append(f"{old[1]} takes precedence over {key} for {dotted}")
                elif old[0] != v and not override:
                    raise ConfigError(key, f"conflicts with '{old[1]}' (both set {dotted})")
                else:
                    leaves[path] = (v, key, prio_now)

    for key, value in data.items():
        apply(str(key), value, override=False)
    for key, value in (overrides or {}).items():
        apply(str(key).replace("-", "_"), value, override=True)

    nested: dict[str, Any] = {}
    for path, (v, _, _) in leaves.items():
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = v
    spec = cls()
    try:
        json_format.ParseDict(nested, spec)
    except json_format.ParseError as e:
        raise ConfigError("config", str(e)) from None
    return Built(spec, tuple(ctx.notes))


def load_spec(
    kind: str, path: str | Path | None, overrides: Mapping[str, Any] | None = None
) -> Built:
    return build_spec(kind, load_yaml(path) if path else {}, overrides)


# ---- local paths ------------------------------------------------------------------------

_PATH_FIELDS = {
    "mlx_unified.v1.ModelRef": ("model", "adapter_path"),
    "mlx_unified.v1.DatasetRef": ("path", "valid_path"),
}


def local_path(value: str, base: Path | None = None) -> str:
    """``value`` made absolute when it names an existing relative path (or starts with ~);
    anything else (a registered name, a hub id, a remote path) is returned unchanged."""
    if not value:
        return value
    p = Path(value).expanduser()
    if not p.is_absolute():
        candidate = (base or Path.cwd()) / p
        if not candidate.exists():
            return value
        p = candidate.resolve()
    return str(p)


def absolutize_paths(msg: Message, base: Path | None = None) -> Message:
    """Apply ``local_path`` to every model / adapter / dataset path in ``msg``, in place: a
    service resolves relative paths against its own working directory, not the caller's."""
    names = _PATH_FIELDS.get(msg.DESCRIPTOR.full_name, ())
    for field, value in msg.ListFields():
        if field.name in names:
            setattr(msg, field.name, local_path(value, base))
        elif field.type == field.TYPE_MESSAGE:
            if _is_map(field):
                vf = field.message_type.fields_by_name["value"]
                items = list(value.values()) if vf.type == vf.TYPE_MESSAGE else []
            else:
                items = list(value) if field.is_repeated else [value]
            for item in items:
                absolutize_paths(item, base)
    return msg


# ---- pipelines --------------------------------------------------------------------------

_STAGE_FIELD = {  # StageKind name -> the Stage oneof field (= the method's name)
    orchestrator_pb2.StageKind.Name(m.stage_kind): m.name for m in registry.METHODS
}


def _stage(d: Any, where: str, notes: list[str]) -> orchestrator_pb2.Stage:
    if not isinstance(d, Mapping):
        raise ConfigError(where, "expected a mapping {name, kind, ...}")
    if "kind" not in d:
        raise ConfigError(f"{where}.kind", f"required; one of {', '.join(KINDS)}")
    kind_enum = enum_name(orchestrator_pb2.StageKind.DESCRIPTOR, d["kind"], f"{where}.kind")
    if kind_enum not in _STAGE_FIELD:
        raise ConfigError(f"{where}.kind", "must name a stage kind")
    field = _STAGE_FIELD[kind_enum]
    config: dict[str, Any] = {}
    for key, v in d.items():
        if key in ("name", "kind", "inputs"):
            continue
        if key in (field, "spec", "config"):  # the spec as a nested mapping
            if not isinstance(v, Mapping):
                raise ConfigError(f"{where}.{key}", "expected a mapping")
            config.update(v)
        else:  # spec keys written directly on the stage
            config[key] = v
    try:
        built = build_spec(field, config)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e.key}", e.problem) from None
    notes.extend(f"{where}.{n}" for n in built.notes)
    stage = orchestrator_pb2.Stage(name=str(d.get("name", "")), kind=kind_enum)
    getattr(stage, field).CopyFrom(built.spec)
    for i, b in enumerate(d.get("inputs") or []):
        json_format.ParseDict(
            normalize(orchestrator_pb2.Binding.DESCRIPTOR, b, f"{where}.inputs[{i}]"),
            stage.inputs.add(),
        )
    return stage


def build_pipeline(
    data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> tuple[orchestrator_pb2.PipelineSpec, tuple[str, ...]]:
    """A PipelineSpec from YAML: native keys plus `model`/`data` for base_model/dataset; each
    stage takes its kind's spec keys (native or mlx-lm) directly or under `config:`."""
    merged = {**data, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    renames = {"model": "base_model", "data": "dataset"}
    top: dict[str, Any] = {}
    for key, v in merged.items():
        name = renames.get(str(key), str(key))
        if name in top:
            raise ConfigError(str(key), f"conflicts with '{name}'")
        top[name] = v
    stages = top.pop("stages", None) or []
    if not isinstance(stages, list):
        raise ConfigError("stages", "expected a list of stages")
    notes: list[str] = []
    spec = orchestrator_pb2.PipelineSpec()
    try:
        json_format.ParseDict(normalize(orchestrator_pb2.PipelineSpec.DESCRIPTOR, top), spec)
    except json_format.ParseError as e:
        raise ConfigError("pipeline", str(e)) from None
    for i, st in enumerate(stages):
        spec.stages.append(_stage(st, f"stages[{i}]", notes))
    return spec, tuple(notes)
