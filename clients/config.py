"""YAML run configs -> spec messages (SFTSpec, DistillationSpec, DPOSpec, ...).

Two vocabularies, freely mixed in one file:

* native keys, shaped like the spec message (``loop: {max_steps: 100}``, ``method: lora``),
  with shortcuts: a model / dataset / optimizer given as a plain string, enums by short name;
* mlx-lm's ``lora`` config keys (``iters``, ``learning_rate``, ``lora_parameters``,
  ``lr_schedule``, ...) so an existing mlx-lm YAML runs unchanged.

Precedence: overrides (CLI flags) > YAML. Two YAML keys that set the same field to different
values are an error, except mlx-lm's own rule that ``lr_schedule`` beats ``learning_rate``.
Unknown keys are an error naming the key.

Three modules: config_normalize.py reads YAML and checks a dict against any message,
config_mlxlm.py maps mlx-lm's keys; this one builds specs, pipelines and local paths with
them, and re-exports their public names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from clients.config_mlxlm import (  # noqa: F401 - re-exported
    ALIASES,
    IGNORED,
    UNSUPPORTED,
    Alias,
    Fragment,
    _Ctx,
)
from clients.config_normalize import (  # noqa: F401 - re-exported
    ConfigError,
    _field,
    _flatten,
    _is_map,
    _nest,
    _suggest,
    enum_name,
    load_yaml,
    normalize,
    parse_scalar,
    parse_yaml,
)
from mlx_unified.v1 import orchestrator_pb2
from services import registry

# kind -> (spec message, the field mlx-lm's `model` key means), from services.registry
KINDS: dict[str, tuple[type[Message], str]] = {
    m.name: (m.spec, m.model_field) for m in registry.METHODS
}


@dataclass(frozen=True)
class Built:
    spec: Message
    notes: tuple[str, ...] = ()  # keys accepted but ignored, precedence decisions


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
