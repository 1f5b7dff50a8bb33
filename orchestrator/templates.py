"""Pipeline templates, and overrides merged into them.

- chatbot: SFT -> DPO. The issue asks for "SFT -> RLHF"; DPO is the default RLHF step
  because it needs only a preference dataset: no reward-model stage, no generation in the
  training loop, one frozen reference, and it is stable at small batch sizes on a laptop.
  PPO remains available: the research template, or overrides replacing ``stages``.
- efficient_llm: distillation -> SFT. The base model teaches a half-depth student built
  from it (``student_init.num_layers`` = half the base's layers), which SFT then tunes.
- aligned_model: SFT -> DPO -> distillation (the aligned model teaches a half-depth copy).
- research: sft, reward_model, dpo, ppo, distill, export (every stage kind): the reward
  model starts from the SFT model; DPO from SFT; PPO from DPO with the reward model; the
  PPO policy teaches a half-depth student; export quantises it to 4 bits.

A template needs a base model and a dataset (one for every stage; give stages their own
via ``datasets``). Templates turn ``auto_configure`` on: they set no hyperparameters.

Overrides are a JSON object shaped like a PipelineSpec (proto field names), merged
recursively: objects merge, lists and scalars replace. ``stages`` may also be an object
keyed by stage name, merged into that stage:
``{"stages": {"sft": {"sft": {"loop": {"max_steps": 50}}}}}``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from orchestrator.autoconfig import ModelInfo
from orchestrator.pipeline import KINDS, to_json
from services.runtime.errors import InvalidArgument, Violations

K = opb.StageKind


def _stage(name: str, kind: int, **spec: Any) -> dict[str, Any]:
    return {"name": name, "kind": K.Name(kind), KINDS[kind].name: spec}


_HALF = {"student_init": {}}  # num_layers filled from the base model's depth
_DESCRIPTIONS = {
    "chatbot": "SFT, then DPO on preference data (RLHF without a reward model or rollouts).",
    "efficient_llm": "Distil the base into a half-depth student, then SFT the student.",
    "aligned_model": "SFT, then DPO, then distil the aligned model into a half-depth student.",
    "research": "Every stage: SFT, reward model, DPO, PPO, distillation, 4-bit export.",
}
_STAGES: dict[str, list[dict[str, Any]]] = {
    "chatbot": [_stage("sft", K.STAGE_KIND_SFT), _stage("dpo", K.STAGE_KIND_DPO)],
    "efficient_llm": [
        _stage("distill", K.STAGE_KIND_DISTILL, **_HALF),
        _stage("sft", K.STAGE_KIND_SFT),
    ],
    "aligned_model": [
        _stage("sft", K.STAGE_KIND_SFT),
        _stage("dpo", K.STAGE_KIND_DPO),
        _stage("distill", K.STAGE_KIND_DISTILL, **_HALF),
    ],
    "research": [
        _stage("sft", K.STAGE_KIND_SFT),
        _stage("reward_model", K.STAGE_KIND_REWARD_MODEL),
        _stage("dpo", K.STAGE_KIND_DPO),
        _stage("ppo", K.STAGE_KIND_PPO),
        _stage("distill", K.STAGE_KIND_DISTILL, **_HALF),
        _stage(
            "export",
            K.STAGE_KIND_EXPORT,
            mode="EXPORT_MODE_QUANTIZE",
            quantization={"bits": 4, "group_size": 64},
        ),
    ],
}


def names() -> list[str]:
    return list(_STAGES)


def template_json(name: str) -> dict[str, Any]:
    return {"name": name, "auto_configure": True, "stages": copy.deepcopy(_STAGES[name])}


def list_templates() -> list[opb.Template]:
    return [
        opb.Template(
            name=n,
            description=_DESCRIPTIONS[n],
            spec=json_format.ParseDict(template_json(n), opb.PipelineSpec()),
        )
        for n in _STAGES
    ]


def from_template(
    template: str,
    *,
    base_model: cpb.ModelRef | None = None,
    dataset: cpb.DatasetRef | None = None,
    overrides: struct_pb2.Struct | dict[str, Any] | None = None,
    name: str = "",
    auto_configure: bool | None = None,
    model_info: Callable[[str], ModelInfo | int] | None = None,
) -> opb.PipelineSpec:
    """The template's PipelineSpec with the request's fields and overrides applied.

    ``model_info`` gives the base model's depth for half-depth students. The result still
    has to pass ``pipeline.resolve``.
    """
    if template not in _STAGES:
        raise InvalidArgument.one("template", f"unknown template (one of {', '.join(_STAGES)})")
    d = template_json(template)
    if base_model is not None and base_model.model:
        d["base_model"] = to_json(base_model)
    if dataset is not None and dataset.path:
        d["dataset"] = to_json(dataset)
    if name:
        d["name"] = name
    if auto_configure is not None:
        d["auto_configure"] = auto_configure
    if isinstance(overrides, struct_pb2.Struct):
        overrides = json_format.MessageToDict(overrides)
    if overrides:
        v = Violations()
        _check(overrides, opb.PipelineSpec.DESCRIPTOR, "overrides", v, d)
        v.raise_if_any()
        d = merge(d, overrides)
    try:
        spec = json_format.ParseDict(d, opb.PipelineSpec())
    except json_format.ParseError as e:
        raise InvalidArgument.one("overrides", str(e).split("\n")[0]) from None
    _fill_half_depth(spec, model_info)
    return spec


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, val in over.items():
        if k == "stages" and isinstance(val, dict):
            stages = [dict(s) for s in out.get("stages", [])]
            for s in stages:
                if s.get("name") in val:
                    s.update(merge(s, val[s["name"]]))
            out["stages"] = stages
        elif isinstance(val, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], val)
        else:
            out[k] = copy.deepcopy(val)
    return out


def _fill_half_depth(
    spec: opb.PipelineSpec, model_info: Callable[[str], ModelInfo | int] | None
) -> None:
    for i, st in enumerate(spec.stages):
        if st.WhichOneof("spec") != "distill":
            continue
        init = st.distill.student_init
        # Only the template's marker (an empty student_init) asks for half depth.
        if not st.distill.HasField("student_init") or init.num_layers or init.keep_teacher_layers:
            continue
        field = f"spec.stages[{i}].distill.student_init.num_layers"
        layers = 0
        if model_info is not None and spec.base_model.model:
            try:
                got = model_info(spec.base_model.model)
                layers = got.num_layers if isinstance(got, ModelInfo) else 0
            except Exception as e:
                raise InvalidArgument.one(
                    "base_model.model", f"cannot read the depth of the base model: {e}"
                ) from None
        if layers < 2:
            raise InvalidArgument.one(
                field, "cannot tell the base model's depth: set it in overrides"
            )
        init.num_layers = layers // 2


def _check(
    over: Any, desc: Descriptor, path: str, v: Violations, current: dict[str, Any] | None
) -> None:
    """Name the first wrong path of an override (ParseDict's errors name no user path)."""
    if not isinstance(over, dict):
        v.add(path, f"must be an object ({desc.name})")
        return
    for key, val in over.items():
        f = desc.fields_by_name.get(key) or desc.fields_by_camelcase_name.get(key)
        p = f"{path}.{key}"
        if f is None:
            v.add(p, f"unknown field of {desc.name}")
        elif key == "stages" and desc is opb.PipelineSpec.DESCRIPTOR and isinstance(val, dict):
            have = {s.get("name") for s in (current or {}).get("stages", [])}
            for sname, sval in val.items():
                if sname not in have:
                    v.add(f"{p}.{sname}", "no stage of that name in the template")
                else:
                    _check(sval, f.message_type, f"{p}.{sname}", v, None)
        elif f.message_type is not None and f.message_type.GetOptions().map_entry:
            vf = f.message_type.fields_by_name["value"]
            if not isinstance(val, dict):
                v.add(p, "must be an object")
            else:
                for mk, mv in val.items():
                    _check_value(mv, vf, f"{p}.{mk}", v)
        elif f.is_repeated:
            if not isinstance(val, list):
                v.add(p, "must be a list")
            else:
                for i, item in enumerate(val):
                    _check_value(item, f, f"{p}[{i}]", v)
        else:
            _check_value(val, f, p, v)


def _check_value(val: Any, f: FieldDescriptor, path: str, v: Violations) -> None:
    if f.message_type is not None:
        _check(val, f.message_type, path, v, None)
    elif f.enum_type is not None:
        ok = (isinstance(val, str) and val in f.enum_type.values_by_name) or (
            isinstance(val, int | float) and int(val) in f.enum_type.values_by_number
        )
        if not ok:
            v.add(path, f"must be one of {', '.join(f.enum_type.values_by_name)}")
    elif f.type == FieldDescriptor.TYPE_BOOL:
        v.check(isinstance(val, bool), path, "must be true or false")
    elif f.type == FieldDescriptor.TYPE_STRING:
        v.check(isinstance(val, str), path, "must be a string")
    elif f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        v.check(
            isinstance(val, int | float) and not isinstance(val, bool), path, "must be a number"
        )
    else:  # integers: Struct numbers arrive as floats
        ok = not isinstance(val, bool) and (
            (isinstance(val, int | float) and float(val).is_integer())
            or (isinstance(val, str) and val.lstrip("-").isdigit())
        )
        v.check(ok, path, "must be an integer")
