"""Proto specs -> plain config dicts for trainers, plus the range checks every service shares.

Field rules (defaults and bounds) are declared once, on the config schema in
``services.schema``; this module adds the rules that hold for every message of every RPC
(closed enums, finite numbers, bounded sizes) and the static check the orchestrator shares.

Proto3 "zero means default": only fields that are set (non-zero, or present for `optional`)
appear in the dict, so a trainer's config dataclass fills its own defaults in one place.
Enum values become short lowercase names (OPTIMIZER_NAME_ADAMW -> "adamw").
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.runtime.errors import InvalidArgument, Violation
from services.runtime.settings import Limits


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


# --- the edge: every request of every RPC, checked against its own schema -----------------
#
# One declared rule set for all messages, applied by the gRPC edge (rpc/status.py) before
# any servicer runs: closed enums, finite numbers (NaN/Inf nowhere, Struct values included),
# bounded strings, lists, maps and nesting. Field paths are the request's own
# ("spec.loop.batch_size", "stage.sft.labels[k]", "overrides.fields[x]").

MAX_STRING_BYTES = 4096  # any string field not named below (paths: see services.runtime.paths)
MAX_ID_BYTES = 256  # *_id, request_id, page_token
MAX_REPEATED = 1024
MAX_MAP_ENTRIES = 64
MAX_MAP_KEY_BYTES = 256
MAX_DEPTH = 32  # nested messages (a Struct's nesting counts)
MAX_NODES = 20_000  # fields and values in one request
MAX_REPORTED = 32  # violations reported from one request

_P = "mlx_unified.v1."
# Free text whose size only the request-size limit (and Generate's token limit) bounds.
TEXT_FIELDS = frozenset(
    {
        _P + "GenerateRequest.prompt",
        _P + "ChatMessage.content",
        _P + "PromptCompletion.prompt",
        _P + "PromptCompletion.completion",
    }
)
# Token-id lists: bounded by their own limit (and the request size), counted as one value,
# so a rollout batch of prompts is not cut by MAX_NODES.
TOKEN_ID_FIELDS = frozenset({_P + "TokenSequence.token_ids"})
# Repeated fields with their own bound: a number, or the name of a Limits attribute.
REPEATED_LIMITS: dict[str, int | str] = {
    _P + "ChatConversation.messages": "generate_max_messages",
    _P + "ScoreCompletionsRequest.items": "score_max_items",
    _P + "ScoreRequest.items": "score_max_items",
    _P + "SampleTokensRequest.prompts": "score_max_items",
    _P + "TopLogprobsRequest.sequences": "score_max_items",
    _P + "TokenSequence.token_ids": "generate_max_prompt_tokens",
    _P + "SamplingParams.stop": 16,
    _P + "PipelineSpec.stages": 32,
    _P + "DistillationSpec.teachers": 16,
    _P + "LoraConfig.keys": 64,
    _P + "Resources.hosts": 256,
}


class _Walk:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.found: list[Violation] = []
        self.nodes = 0

    def add(self, field_name: str, description: str) -> None:
        if len(self.found) <= MAX_REPORTED:
            self.found.append(Violation(field_name, description))

    def message(self, msg: Message, prefix: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            self.add(prefix or "request", f"nested more than {MAX_DEPTH} levels deep")
            return
        for fd, value in msg.ListFields():
            name = f"{prefix}.{fd.name}" if prefix else fd.name
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                self.map(fd, value, name, depth)
            elif fd.is_repeated:
                limit = REPEATED_LIMITS.get(fd.full_name, MAX_REPEATED)
                if isinstance(limit, str):
                    limit = int(getattr(self.limits, limit))
                if len(value) > limit:
                    self.add(name, f"has {len(value)} entries; at most {limit}")
                    continue
                if fd.full_name in TOKEN_ID_FIELDS:  # bounded above; ints need no check
                    self.nodes += 1
                    continue
                for i, item in enumerate(value):
                    self.value(fd, item, f"{name}[{i}]", depth)
            else:
                self.value(fd, value, name, depth)
            if self.nodes > MAX_NODES:
                self.add(prefix or "request", f"holds more than {MAX_NODES} values")
                return

    def map(self, fd: FieldDescriptor, value: Any, name: str, depth: int) -> None:
        if len(value) > MAX_MAP_ENTRIES:
            self.add(name, f"has {len(value)} entries; at most {MAX_MAP_ENTRIES}")
            return
        vf = fd.message_type.fields_by_name["value"]
        for key in value:
            k = str(key)
            where = f"{name}[{k if len(k) <= 40 else k[:37] + '...'}]"
            if isinstance(key, str) and len(key.encode()) > MAX_MAP_KEY_BYTES:
                self.add(where, f"key is longer than {MAX_MAP_KEY_BYTES} bytes")
                continue
            self.value(vf, value[key], where, depth)

    def value(self, fd: FieldDescriptor, value: Any, name: str, depth: int) -> None:
        self.nodes += 1
        t = fd.type
        if t == FieldDescriptor.TYPE_MESSAGE:
            self.message(value, name, depth + 1)
        elif t == FieldDescriptor.TYPE_ENUM:
            if value not in fd.enum_type.values_by_number:
                known = ", ".join(v.name for v in fd.enum_type.values if v.number)
                self.add(name, f"unknown {fd.enum_type.name} value {value} (known: {known})")
        elif t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            if not math.isfinite(value):
                self.add(name, f"must be a finite number, got {value}")
        elif t == FieldDescriptor.TYPE_STRING:
            if fd.full_name in TEXT_FIELDS:
                return
            ident = fd.name.endswith("_id") or fd.name == "page_token"
            limit = MAX_ID_BYTES if ident else MAX_STRING_BYTES
            size = len(value.encode("utf-8", "surrogatepass"))
            if size > limit:
                self.add(name, f"is {size} bytes long; at most {limit}")


def check_request(msg: Message, limits: Limits | None = None) -> None:
    """Raise InvalidArgument (every violation, up to MAX_REPORTED) when ``msg`` breaks the
    schema rules above; cheap enough to run on every request."""
    walk = _Walk(limits or Limits())
    walk.message(msg, "", 0)
    if walk.found:
        raise InvalidArgument(walk.found[:MAX_REPORTED])


# --- the trainers' own spec checks, shared with the orchestrator ----------------------------
#
# Each method's ``check`` (services.registry): every rule a trainer service applies to a spec
# that needs no file (numbers, enums, combinations), raising InvalidArgument with fields under
# ``prefix``. The trainer services run them at Start; the orchestrator runs the same functions
# on every stage of a pipeline before storing it, so it never accepts a spec a trainer refuses.
def check_static(kind: str, spec: Message, prefix: str) -> None:
    """Run ``kind``'s static check (services.registry ``Method.check``) on ``spec``."""
    from services import registry

    registry.load(registry.get(kind).check)(spec, prefix)


def reprefix(violations: list[Violation], prefix: str, old: str = "spec") -> list[Violation]:
    """Violations named under ``old`` (a trainer's "spec.x") renamed under ``prefix``."""
    out = []
    for v in violations:
        name = v.field
        if name == old or name.startswith(old + "."):
            name = prefix + name[len(old) :]
        out.append(Violation(name, v.description))
    return out
