"""A pipeline checked whole before it is accepted: every stage through its own service's
Start RPC with ``validate_only``, so the service applies every rule it would apply when the
stage starts (the model and dataset it names, the dataset's row format for the method, every
row) and no stage is found wrong only after the stages before it have spent their time.

A bound input (an earlier stage's result) does not exist yet. It is checked with a stand-in:
a bound model becomes the pipeline's base model, which every stage's checkpoint derives
from; a bound reward model becomes a built-in reward function. Violations on the bound
fields themselves are dropped: the hand-off fills them.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from google.protobuf.message import Message

from mlx_unified.v1 import common_pb2 as cpb
from orchestrator import pipeline
from services.runtime import specs
from services.runtime.errors import InvalidArgument, Violation


class Validator(Protocol):
    async def validate(self, stage_kind: str, spec: Message) -> None: ...


def stand_in(sp: pipeline.StagePlan, base: cpb.ModelRef) -> tuple[Message, tuple[str, ...]]:
    """The stage spec with every bound input replaced by its stand-in, and the spec-field
    prefixes ("spec.model", "spec.reward") whose violations belong to the bindings."""
    spec: Any = sp.message()
    bound: list[str] = []
    for b in sp.bindings:
        if b.input == "reward_model":
            spec.reward.ClearField("reward_model")
            spec.reward.reward_function = "length"
            bound.append("spec.reward")
        else:
            pipeline.ref_at(spec, b.target, create=True).CopyFrom(base)
            bound.append(f"spec.{b.target}")
    return spec, tuple(bound)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


async def check_on_services(backend: Validator, plan: pipeline.Plan, base: cpb.ModelRef) -> None:
    """InvalidArgument with every stage's violations, named "spec.stages[i].<kind>.…"."""

    async def one(sp: pipeline.StagePlan) -> list[Violation]:
        spec, bound = stand_in(sp, base)
        try:
            await backend.validate(sp.info.name, spec)
        except InvalidArgument as e:
            kept = (
                [v for v in e.violations if not v.field.startswith(bound)]
                if bound
                else e.violations
            )
            return specs.reprefix(list(kept), f"spec.stages[{sp.index}].{sp.info.name}")
        return []

    found = [v for vs in await asyncio.gather(*(one(sp) for sp in plan.stages)) for v in vs]
    if found:
        raise InvalidArgument(found)
