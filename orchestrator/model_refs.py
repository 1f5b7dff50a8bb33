"""Registry references inside requests: ``name``, ``name@3`` and ``name:production``.

Wherever the orchestrator accepts a ModelRef (PipelineSpec.base_model, every ModelRef in
a stage spec, StartTraining's stage), ``resolve`` rewrites a reference to a registered
model into that version's checkpoint, as a stage would consume it (pipeline.ref_for: an
adapter as ``{model: base, adapter_path: ckpt}``). It runs before validation and before
the spec is stored, so a pipeline pins the version it was created with, and its stored
spec names the checkpoint path (which is how model_registry sees that a run uses it).

A plain ``name`` that is not registered keeps its meaning (a built-in model, a path, a hub
id). ``name@N`` and ``name:alias`` cannot be any of those, so an unknown one is
INVALID_ARGUMENT on the field.
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.message import Message

from mlx_unified.v1 import common_pb2 as cpb
from orchestrator import pipeline
from orchestrator.model_registry import ModelRegistry
from services.runtime.errors import InvalidArgument, NotFound, Violation, shown

__all__ = ["parse", "resolve"]

_REF = re.compile(
    r"^([A-Za-z0-9][A-Za-z0-9._-]{0,127})(?:@([0-9]{1,9})|:([A-Za-z0-9._-]{1,128}))?$"
)


def parse(text: str) -> tuple[str, int, str, bool] | None:
    """(name, version, alias, explicit) of a reference's text, or None when it cannot be one.
    ``explicit`` is True for ``name@N`` / ``name:alias`` (which must resolve)."""
    m = _REF.match(text)
    if m is None:
        return None
    name, number, alias = m.group(1), m.group(2), m.group(3) or ""
    return name, int(number or 0), alias, bool(number or alias)


def _refs(msg: Message, field: str) -> list[tuple[cpb.ModelRef, str]]:
    """Every ModelRef inside ``msg`` with its field name ("spec.stages[0].sft.model")."""
    if isinstance(msg, cpb.ModelRef):
        return [(msg, field)]
    found: list[tuple[cpb.ModelRef, str]] = []
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        name = f"{field}.{fd.name}" if field else fd.name
        if fd.is_repeated:
            if fd.message_type.GetOptions().map_entry:
                continue  # maps hold datasets and labels, never a ModelRef
            for i, item in enumerate(value):
                found.extend(_refs(item, f"{name}[{i}]"))
        else:
            found.extend(_refs(value, name))
    return found


def _one(reg: ModelRegistry, ref: cpb.ModelRef, field: str) -> Violation | None:
    parsed = parse(ref.model)
    if parsed is None:
        return None
    name, version, alias, explicit = parsed
    if not reg.exists(name):
        if explicit:
            return Violation(f"{field}.model", f"{shown(ref.model)}: no registered model {name!r}")
        return None  # a built-in name, a relative path: today's meaning
    try:
        v = reg.get_version(name, version, alias)
    except NotFound as e:
        return Violation(f"{field}.model", f"{shown(ref.model)}: {e}")
    target = pipeline.ref_for(v.checkpoint)
    if ref.adapter_path and target.adapter_path:
        return Violation(
            f"{field}.adapter_path",
            f"{ref.model} is an adapter checkpoint already; leave adapter_path empty",
        )
    if ref.adapter_path:
        target.adapter_path = ref.adapter_path
    ref.CopyFrom(target)
    return None


def resolve(reg: ModelRegistry, msg: Any, field: str) -> Any:
    """A copy of ``msg`` with every registry reference replaced by its checkpoint; raises
    InvalidArgument with every unresolvable one, named under ``field``."""
    out = type(msg)()
    out.CopyFrom(msg)
    found = [v for ref, f in _refs(out, field) if ref.model and (v := _one(reg, ref, f))]
    if found:
        raise InvalidArgument(found)
    return out
