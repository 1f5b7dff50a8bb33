"""The original API's pipeline shape -> our PipelineSpec.

``{"name", "stages": ["sft", "distillation", "rlhf"], "base_model", "dataset_path",
"auto_configure"}`` becomes one stage per entry, named as given:

- "sft" is an SFT stage; "distillation" (or "distill") a distillation stage in which the
  previous model (the base model when first) teaches a half-depth student built from it,
  as the templates do (``student_init``, its depth filled in by the orchestrator);
- "rlhf" is the preference method that the stage's dataset can train: preference rows
  (prompt/chosen/rejected) -> DPO, unpaired preference rows (prompt/completion/label) ->
  KTO. Any other format is a 400 naming the stage: PPO / GRPO need a reward source, which
  the original shape cannot give, so they are never picked silently; name the method
  ("ppo", "grpo", with ``config``) instead;
- any method name of ours ("dpo", "kto", "orpo", "ppo", "grpo", "reward_model",
  "export") is that method.

Every stage's dataset is read here (confined to the allowed roots) to find its format, and a
stage whose method cannot train that format is refused before anything is stored, with every
such problem in one answer. Extensions of ours, all optional: ``datasets`` (stage name ->
dataset path), ``config`` (stage name -> that stage's spec as proto JSON), ``request_id``,
``labels``.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2
from pydantic import BaseModel, ConfigDict, Field

from mlx_unified.v1 import orchestrator_pb2 as opb
from services import registry
from services.gateway.convert import parse
from services.gateway.errors import BackendError, Violation
from services.runtime import errors
from services.runtime.data_rows import detect_format, load_dir, load_rows
from services.runtime.paths import confine

ALIASES = {"distillation": "distill"}
RLHF_BY_FORMAT = {"preference": "dpo", "unpaired_preference": "kto"}
# The template whose stage list the gateway replaces when a stage needs a half-depth
# student: CreatePipelineFromTemplate fills in its depth from the base model (the gateway
# never opens a model). The template's own stages are all replaced; only that step is used.
HALF_DEPTH_CARRIER = "aligned_model"
# Above this a dataset is sniffed by its first line only (JSON lines), never read whole.
SNIFF_WHOLE_BYTES = 32 << 20


class PipelineCreate(BaseModel):
    """The original system's pipeline (first five fields), plus optional extensions."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, examples=["my_aligned_model"])
    stages: list[str] = Field(min_length=1, examples=[["sft", "distillation", "rlhf"]])
    base_model: str = Field(min_length=1, examples=["mlx-community/Qwen2.5-1.5B"])
    dataset_path: str = Field("", examples=["/path/to/data.json"])
    auto_configure: bool = True
    datasets: dict[str, str] = Field(default_factory=dict, description="stage -> dataset path")
    config: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="stage -> its spec (proto JSON of the method's spec)"
    )
    request_id: str = ""
    labels: dict[str, str] = Field(default_factory=dict)


def sniff(raw: str, field: str, roots: tuple[Path, ...]) -> str:
    """The row format of a dataset file or mlx-lm directory (blocking: run in a thread)."""
    path = confine(raw, roots, field)
    if not os.path.lexists(path):
        raise errors.InvalidArgument.one(field, f"{raw!r} does not exist")
    if path.is_dir():
        return detect_format(load_dir(path, field, roots)["train"][:1], field)
    if path.stat().st_size > SNIFF_WHOLE_BYTES:
        with path.open("rb") as fh:
            first = fh.readline(1 << 20).decode("utf-8-sig", "replace").strip()
        if first.startswith("{"):
            try:
                return detect_format([json.loads(first)], field)
            except json.JSONDecodeError:
                pass
        raise errors.InvalidArgument.one(field, "too large to detect its format: use JSON lines")
    return detect_format(load_rows(path, field, roots)[:1], field)


def _method(entry: str) -> str | None:
    name = ALIASES.get(entry, entry)
    return name if name in registry.names() else None


async def build(
    req: PipelineCreate, roots: tuple[Path, ...]
) -> opb.CreatePipelineRequest | opb.CreatePipelineFromTemplateRequest:
    """The CreatePipeline (or, for half-depth students, CreatePipelineFromTemplate) request
    for ``req``; raises a 400 with every violation found."""
    vs: list[Violation] = []
    formats: dict[str, str | None] = {}

    async def fmt_of(path: str, field: str) -> str | None:
        if path not in formats:
            try:
                formats[path] = await asyncio.to_thread(sniff, path, field, roots)
            except errors.InvalidArgument as e:
                vs.extend(Violation(v.field, v.description) for v in e.violations)
                formats[path] = None
        return formats[path]

    for key in req.datasets:
        if key not in req.stages:
            vs.append(Violation(f"datasets.{key}", "names no stage of this pipeline"))
    for key in req.config:
        if key not in req.stages:
            vs.append(Violation(f"config.{key}", "names no stage of this pipeline"))
    stages: list[dict[str, Any]] = []
    carrier = False
    for i, entry in enumerate(req.stages):
        field = f"datasets.{entry}" if entry in req.datasets else "dataset_path"
        data = req.datasets.get(entry) or req.dataset_path
        fmt = await fmt_of(data, field) if data else None
        name = _method(entry)
        if entry == "rlhf":
            name = RLHF_BY_FORMAT.get(fmt or "")
            if name is None and fmt is not None:
                vs.append(
                    Violation(
                        f"stages[{i}]",
                        f"'rlhf' trains on preference rows (prompt, chosen, rejected: DPO) or "
                        f"unpaired preference rows (prompt, completion, label: KTO), and "
                        f"{data!r} has {fmt!r} rows: give this stage its own dataset "
                        f'("datasets": {{"rlhf": "prefs.jsonl"}}) or name a method '
                        f"(dpo, kto, orpo, ppo, grpo) in its place",
                    )
                )
                continue
        if name is None:
            if entry != "rlhf":
                known = ", ".join(["sft", "distillation", "rlhf", *registry.names()])
                vs.append(Violation(f"stages[{i}]", f"unknown stage {entry!r}; one of {known}"))
            continue
        method = registry.get(name)
        if fmt is not None and method.formats and fmt not in method.formats:
            vs.append(
                Violation(
                    field,
                    f"stage {entry!r} ({name}) trains on {', '.join(method.formats)} rows; "
                    f"{data!r} has {fmt!r} rows",
                )
            )
        spec = dict(req.config.get(entry, {}))
        if name == "distill" and not ({"student", "student_init", "teachers"} & set(spec)):
            spec["student_init"] = {}  # the half-depth marker (see HALF_DEPTH_CARRIER)
            carrier = True
        stages.append({"name": entry, "kind": opb.StageKind.Name(method.stage_kind), name: spec})
    if vs:
        msg = "; ".join(f"{v.field}: {v.description}" for v in vs)
        raise BackendError(grpc.StatusCode.INVALID_ARGUMENT, msg, vs)
    spec_json: dict[str, Any] = {
        "name": req.name,
        "base_model": {"model": req.base_model},
        "stages": stages,
        "auto_configure": req.auto_configure,
        "labels": {**req.labels, "created_by": "gateway"},
    }
    if req.dataset_path:
        spec_json["dataset"] = {"path": req.dataset_path}
    if req.datasets:
        spec_json["datasets"] = {k: {"path": v} for k, v in req.datasets.items()}
    spec = parse(spec_json, opb.PipelineSpec, "config")  # wrong config types: a 400 here
    if not carrier:
        return opb.CreatePipelineRequest(request_id=req.request_id, spec=spec)
    overrides = struct_pb2.Struct()
    overrides.update(spec_json)
    return opb.CreatePipelineFromTemplateRequest(
        request_id=req.request_id,
        template=HALF_DEPTH_CARRIER,
        name=req.name,
        auto_configure=req.auto_configure,
        overrides=overrides,
    )
