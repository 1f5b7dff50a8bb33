"""YAML reading and the generic check of a JSON-shaped dict against a proto descriptor.

Split from config.py: these rules (unknown keys with a suggestion, enums by short name, a
plain string for ModelRef / DatasetRef / ..., int / float / bool coercion) hold for every
message, while config.py maps a run's keys onto one spec. config.py re-exports every public
name here (``ConfigError``, ``parse_yaml``, ``parse_scalar``, ``load_yaml``, ``normalize``...).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor


class ConfigError(ValueError):
    """A config problem, naming the key as the user wrote it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


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
