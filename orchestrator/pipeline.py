"""Pipeline model: validation, normalisation and binding resolution.

A pipeline is an ordered list of stages. Each stage's model inputs either come from
its own spec (an explicit ``ModelRef``), from the base model, or from an earlier
stage's result checkpoint (a *binding*). Rules, checked when the pipeline is created:

- stage names are unique, 1-128 chars of ``[A-Za-z0-9._-]`` (they appear in idempotency
  keys and output names); an empty name defaults to the kind ("sft"); an unspecified
  kind is taken from the spec set in the ``spec`` oneof.
- ``inputs[j].input`` must be an input of the stage's kind (``KINDS``, from
  services.registry) and
  ``inputs[j].from_stage`` an *earlier* stage (so no cycles). ``reward_model`` binds only
  to a reward_model stage; every other input only to a model-producing stage (a reward
  model is not a policy), except that an export stage may export a reward model.
  Binding an input whose spec field is also set is a conflict.
- default ``model`` = the previous model-producing stage, or the base model for the first.
  DPO/PPO/GRPO ``reference`` defaults to whatever the policy is (the SFT checkpoint after
  an SFT stage: never silently the base model). PPO/GRPO without a reward source bind to
  the latest earlier reward_model stage, else the pipeline is rejected. A distillation
  stage with no teacher is taught by the previous model (or the base); its student is
  ``student_init`` (built from the first teacher), an explicit/bound model, or rejected
  when it would be the teacher itself.
- every training stage needs a dataset: its own, ``datasets[stage name]``, or ``dataset``.

A bound input is typed: a ``Bound(input, from_stage, target)`` beside a spec whose target
ModelRef is empty; the hand-off (stage_inputs.handoff) sets it to the source stage's
checkpoint. ``Pipeline.resolved`` shows it as ``${stages.<name>.result}`` for people
(``StagePlan.shown_spec``); that marker is never parsed back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import distillation_pb2 as dpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from services import registry
from services.runtime.errors import FailedPrecondition, Violations

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TEACHER = re.compile(r"^teachers\[(\d+)\]$")
_STEP = re.compile(r"^(\w+)(?:\[(\d+)\])?$")


@dataclass(frozen=True)
class KindInfo:
    kind: int
    name: str  # Stage oneof field, Job.kind and the name used everywhere else
    service: str
    message: type[Message]
    model_target: str  # where the "model" input lands in the spec
    inputs: tuple[str, ...]  # accepted inputs ("teachers[i]" too for distill)
    produces_model: bool = True
    has_dataset: bool = True


K = opb.StageKind
KINDS: dict[int, KindInfo] = {
    m.stage_kind: KindInfo(
        m.stage_kind,
        m.name,
        m.service,
        m.spec,
        m.model_field,
        m.inputs,
        produces_model=m.produces_model,
        has_dataset=m.has_dataset,
    )
    for m in registry.METHODS
}
BY_NAME: dict[str, KindInfo] = {i.name: i for i in KINDS.values()}


def placeholder(stage: str) -> str:
    return "${stages." + stage + ".result}"


def to_json(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def ref_at(spec: Message, target: str, create: bool = False) -> cpb.ModelRef:
    """The ModelRef at a dotted path such as "reward.reward_model" or "teachers[1].model"."""
    node: Any = spec
    for part in target.split("."):
        m = _STEP.match(part)
        assert m, target
        node = getattr(node, m.group(1))
        if m.group(2) is not None:
            idx = int(m.group(2))
            while create and len(node) <= idx:
                node.add()
            node = node[idx]
    return node


def ref_for(ckpt: cpb.Checkpoint) -> cpb.ModelRef:
    """How a stage consumes an earlier stage's checkpoint: an adapter as
    ``{model: its base, adapter_path: ckpt}`` (the base from the checkpoint, else from its
    adapter_config.json), a full model as ``{model: ckpt}``."""
    adapter_config = os.path.join(ckpt.path, "adapter_config.json")
    is_adapter = ckpt.kind == cpb.CHECKPOINT_KIND_ADAPTER or (
        ckpt.kind == cpb.CHECKPOINT_KIND_UNSPECIFIED and os.path.isfile(adapter_config)
    )
    if not is_adapter:
        return cpb.ModelRef(model=ckpt.path)
    base = ckpt.base_model
    if not base:
        try:
            with open(adapter_config) as f:
                base = str(json.load(f).get("base_model") or "")
        except (OSError, ValueError, AttributeError):
            base = ""
    # No base known: the consuming service rejects the path with a clear message.
    return (
        cpb.ModelRef(model=base, adapter_path=ckpt.path) if base else cpb.ModelRef(model=ckpt.path)
    )


@dataclass(frozen=True)
class Bound:
    input: str  # canonical: "model", "reference", "reward_model", "teachers[i]"
    from_stage: str
    target: str  # path of the ModelRef in the stage spec
    implicit: bool = False


@dataclass(frozen=True)
class StagePlan:
    """One stage after resolution: what the scheduler starts (modulo the hand-off)."""

    index: int
    name: str
    kind: int
    spec: dict[str, Any]  # JSON of the kind's spec message; bound inputs empty (bindings)
    bindings: tuple[Bound, ...] = ()
    auto: dict[str, Any] | None = None

    @property
    def info(self) -> KindInfo:
        return KINDS[self.kind]

    def message(self) -> Message:
        return json_format.ParseDict(self.spec, self.info.message())

    def shown_spec(self) -> dict[str, Any]:
        """The spec with each bound input shown as ``${stages.<name>.result}`` (v1's
        ``Pipeline.resolved``): a marker for people, never parsed back."""
        msg = self.message()
        for b in self.bindings:
            ref_at(msg, b.target, create=True).CopyFrom(
                cpb.ModelRef(model=placeholder(b.from_stage))
            )
        return to_json(msg)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "kind": self.info.name,
            "service": self.info.service,
            "spec": self.shown_spec(),
            "bindings": [
                {"input": b.input, "from_stage": b.from_stage, "target": b.target}
                | ({"implicit": True} if b.implicit else {})
                for b in self.bindings
            ],
        }
        if self.auto is not None:
            d["auto_configure"] = self.auto
        return d

    @classmethod
    def from_json(cls, index: int, d: dict[str, Any]) -> StagePlan:
        binds = tuple(
            Bound(b["input"], b["from_stage"], b["target"], bool(b.get("implicit", False)))
            for b in d.get("bindings", [])
        )
        kind = BY_NAME[d["kind"]].kind
        plan = cls(index, d["name"], kind, d["spec"], binds, d.get("auto_configure"))
        msg = plan.message()
        for b in binds:  # the shown markers out: bound inputs are the bindings' alone
            ref_at(msg, b.target, create=True).Clear()
        return dataclasses.replace(plan, spec=to_json(msg))


@dataclass(frozen=True)
class Plan:
    stages: tuple[StagePlan, ...]
    cache: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"cache": self.cache, "stages": [s.to_json() for s in self.stages]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        stages = tuple(StagePlan.from_json(i, s) for i, s in enumerate(d["stages"]))
        return cls(stages, bool(d.get("cache", True)))


def normalize(spec: opb.PipelineSpec) -> opb.PipelineSpec:
    """A copy with defaulted stage names and kinds inferred from the spec oneof."""
    out = opb.PipelineSpec()
    out.CopyFrom(spec)
    for st in out.stages:
        which = st.WhichOneof("spec")
        if st.kind == K.STAGE_KIND_UNSPECIFIED and which:
            st.kind = BY_NAME[which].kind
        if not st.name and st.kind in KINDS:
            st.name = KINDS[st.kind].name
    return out


def resolve(spec: opb.PipelineSpec, services: Collection[str], env: Any = None) -> Plan:
    """Validate ``spec`` (already normalised) and resolve bindings; then auto-configure.

    Raises InvalidArgument (every violation at once) or FailedPrecondition (a stage needs a
    service that is not configured). ``env`` is an ``autoconfig.Environment``, needed only
    when ``spec.auto_configure`` is set.
    """
    v = Violations()
    v.check(bool(spec.name), "spec.name", "is required")
    v.check(bool(spec.base_model.model), "spec.base_model.model", "is required")
    v.check(len(spec.stages) > 0, "spec.stages", "needs at least one stage")
    index: dict[str, int] = {}
    for i, st in enumerate(spec.stages):
        p = f"spec.stages[{i}]"
        if st.kind not in KINDS:
            accepted = ", ".join(KINDS[k].name for k in sorted(KINDS))
            v.add(f"{p}.kind", f"unknown stage kind {st.kind} (accepted: {accepted})")
        elif (which := st.WhichOneof("spec")) and which != KINDS[st.kind].name:
            v.add(f"{p}.{which}", f"a {KINDS[st.kind].name} stage cannot carry a {which} spec")
        if not _NAME.match(st.name):
            v.add(f"{p}.name", f"{st.name!r}: 1-128 chars of letters, digits, '.', '_' or '-'")
        elif st.name in index:
            v.add(f"{p}.name", f"duplicate stage name (also spec.stages[{index[st.name]}])")
        else:
            index[st.name] = i
    for key in spec.datasets:
        v.check(key in index, f"spec.datasets[{key}]", "no stage of that name")

    plans: list[StagePlan] = []
    for i, st in enumerate(spec.stages):
        if st.kind in KINDS:
            plans.append(_bind(spec, i, index, v))
    v.raise_if_any()

    missing = sorted({p.info.service for p in plans} - set(services))
    if missing:
        need = [f"'{p.name}' needs {p.info.service}" for p in plans if p.info.service in missing]
        have = ", ".join(sorted(services)) or "none"
        raise FailedPrecondition(
            f"services not configured: {', '.join(missing)} ({'; '.join(need)}; configured: {have})"
        )
    plan = Plan(tuple(plans), spec.cache if spec.HasField("cache") else True)
    if spec.auto_configure:
        from orchestrator import autoconfig  # late: autoconfig imports this module

        plan = autoconfig.apply(spec, plan, env)
    return plan


def _bind(spec: opb.PipelineSpec, i: int, index: dict[str, int], v: Violations) -> StagePlan:
    st = spec.stages[i]
    info = KINDS[st.kind]
    msg = info.message()
    if st.WhichOneof("spec"):
        msg.CopyFrom(getattr(st, info.name))
    p = f"spec.stages[{i}]"
    sp = f"{p}.{info.name}"
    earlier = spec.stages[:i]
    prev_model = next((s.name for s in reversed(earlier) if _produces(s)), "")
    prev_rm = next((s.name for s in reversed(earlier) if s.kind == K.STAGE_KIND_REWARD_MODEL), "")

    bound: dict[str, Bound] = {}
    for j, b in enumerate(st.inputs):
        bp = f"{p}.inputs[{j}]"
        name = "teachers[0]" if (info.name == "distill" and b.input == "teacher") else b.input
        target = _target(info, name)
        if target is None:
            ok = ", ".join(info.inputs + (("teachers[i]",) if info.name == "distill" else ()))
            v.add(f"{bp}.input", f"{b.input!r} is not an input of a {info.name} stage ({ok})")
            continue
        if name in bound:
            v.add(f"{bp}.input", f"{b.input!r} is bound twice")
            continue
        src = index.get(b.from_stage)
        if not b.from_stage:
            v.add(f"{bp}.from_stage", "is required")
            continue
        if src is None:
            v.add(f"{bp}.from_stage", f"no stage named {b.from_stage!r}")
            continue
        if src >= i:
            v.add(
                f"{bp}.from_stage",
                f"stage {b.from_stage!r} does not come before {st.name!r}: inputs bind to "
                "earlier stages only (no cycles)",
            )
            continue
        src_kind = spec.stages[src].kind
        if name == "reward_model" and src_kind != K.STAGE_KIND_REWARD_MODEL:
            v.add(f"{bp}.from_stage", f"stage {b.from_stage!r} is not a reward_model stage")
            continue
        if name != "reward_model" and info.name != "export" and not _produces(spec.stages[src]):
            v.add(
                f"{bp}.from_stage",
                f"stage {b.from_stage!r} trains a reward model, not a policy: it cannot "
                f"feed {b.input!r}",
            )
            continue
        if ref_at(msg, target, create=True).model:
            v.add(f"{bp}.input", f"conflicts with {sp}.{target}, which is set explicitly")
            continue
        bound[name] = Bound(name, b.from_stage, target)

    def default(name: str, source: str | cpb.ModelRef) -> None:
        if isinstance(source, str):
            bound[name] = Bound(name, source, _target(info, name) or "", implicit=True)
        else:
            ref_at(msg, _target(info, name) or "", create=True).CopyFrom(source)

    # Model-less teacher entries must be bound; a missing teacher comes from upstream.
    if info.name == "distill":
        distill: dpb.DistillationSpec = msg  # type: ignore[assignment]
        for k, t in enumerate(distill.teachers):
            if not t.model.model and f"teachers[{k}]" not in bound:
                v.add(f"{sp}.teachers[{k}].model.model", "is required (or bind teachers[i])")
        if not distill.teachers and "teachers[0]" not in bound:
            default("teachers[0]", prev_model or spec.base_model)
    needs_model = not (
        info.name == "distill"
        and (msg.student_init.num_layers or msg.student_init.keep_teacher_layers)  # type: ignore[attr-defined]
    )
    if needs_model and "model" not in bound and not ref_at(msg, info.model_target).model:
        if info.name == "distill" and _same_source(bound, msg, prev_model, spec.base_model):
            v.add(
                f"{sp}.student",
                "the default student would be the teacher itself: set student, bind 'model' "
                "or set student_init",
            )
        else:
            default("model", prev_model or spec.base_model)
    if "reference" in info.inputs and "reference" not in bound and not msg.reference.model:  # type: ignore[attr-defined]
        if "model" in bound:
            default("reference", bound["model"].from_stage)
        else:
            default("reference", ref_at(msg, info.model_target))
    if "reward_model" in info.inputs and "reward_model" not in bound:
        reward = msg.reward  # type: ignore[attr-defined]
        if not reward.reward_model.model and not reward.reward_function:
            if prev_rm:
                default("reward_model", prev_rm)
            else:
                v.add(
                    f"{sp}.reward",
                    f"{info.name.upper()} needs a reward source: add a reward_model stage "
                    "before it, bind 'reward_model', or set reward.reward_model / "
                    "reward.reward_function",
                )
    if info.has_dataset and not msg.dataset.path:  # type: ignore[attr-defined]
        if st.name in spec.datasets:
            msg.dataset.CopyFrom(spec.datasets[st.name])  # type: ignore[attr-defined]
        elif spec.dataset.path:
            msg.dataset.CopyFrom(spec.dataset)  # type: ignore[attr-defined]
        else:
            v.add(
                f"{sp}.dataset.path",
                f"no dataset: set it here, in spec.datasets[{st.name}] or in spec.dataset",
            )
    binds = tuple(sorted(bound.values(), key=lambda b: b.target))
    for b in binds:
        ref_at(msg, b.target, create=True).Clear()  # the entry exists; the hand-off fills it
    return StagePlan(i, st.name, st.kind, to_json(msg), binds)


def _produces(st: opb.Stage) -> bool:
    return st.kind in KINDS and KINDS[st.kind].produces_model


def _target(info: KindInfo, name: str) -> str | None:
    if name == "model":
        return info.model_target
    if name == "reference" and name in info.inputs:
        return "reference"
    if name == "reward_model" and name in info.inputs:
        return "reward.reward_model"
    if info.name == "distill" and (m := _TEACHER.match(name)):
        return f"teachers[{int(m.group(1))}].model"
    return None


def _same_source(
    bound: dict[str, Bound], msg: Message, prev_model: str, base: cpb.ModelRef
) -> bool:
    """Would the default student (prev stage or base) be the first teacher?"""
    if "teachers[0]" in bound:
        return bound["teachers[0]"].from_stage == prev_model and bool(prev_model)
    teachers = msg.teachers  # type: ignore[attr-defined]
    return not prev_model and bool(teachers) and teachers[0].model == base
