"""The training methods: one table, from which every layer takes what it needs.

A ``Method`` names everything the platform knows about one way of training: the service that
owns it and its Start RPC (request, response and spec messages), the pipeline stage kind and
the Stage oneof field (both its ``name``), the trainer entry point and its config class, the
functions that turn a spec into a trainer config at the edge and check a spec without files,
the dataset formats it trains on, where a pipeline's model inputs land in its spec, what its
result is, its learning-rate defaults and its CLI subcommand.

Derived from it: the servicers' Start handlers (``services.runtime.rpc.starts``), the RLHF
validation tables, the orchestrator's stage table (``pipeline.KINDS``), backend routes
(``backend.STARTS``) and ``auto_configure``'s per-method numbers, the client's ``start`` map
and ``SERVICE_OF_KIND``, the YAML config builder's kinds and the CLI's ``mlxu train``
subcommands. Adding a method is its proto messages and RPC, its stage kind, its trainer
module and one entry here.

This module imports only the generated protobuf classes (no MLX, no gRPC runtime): trainers,
config classes and edge functions are "module:attr" strings, loaded when used.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from mlx_unified.v1 import distillation_pb2 as dpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from mlx_unified.v1 import rlhf_pb2 as rpb
from mlx_unified.v1 import training_pb2 as tpb

__all__ = ["METHODS", "Flag", "Method", "by_spec", "get", "load", "names", "of_service"]

SK = opb.StageKind


def load(dotted: str) -> Any:
    """The object a "package.module:attr" string names."""
    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Flag:
    """A ``mlxu train <method>`` flag beyond the common ones: ``--<name>`` sets the spec key
    ``name`` (dashes read as underscores), through the YAML config builder."""

    name: str
    help: str
    type: type = str
    repeat: bool = False


@dataclass(frozen=True)
class Method:
    name: str  # Job.kind, the Stage oneof field, the key everywhere else
    service: str  # "training" | "distillation" | "rlhf" (Settings.endpoints key)
    rpc: str  # the Start RPC on that service
    request: type[Message]
    response: type[Message]
    spec: type[Message]
    stage_kind: int  # orchestrator.proto StageKind
    trainer: str  # "module:run", run(config, ctx) -> CheckpointInfo, in the job's worker
    config: str  # "module:Class", the trainer's config dataclass (DictConfig)
    prepare: str  # "module:fn(spec, settings) -> config dict": resolve + validate at Start
    check: str  # "module:fn(spec, prefix)": every rule that needs no file
    model_field: str  # where a pipeline's "model" input lands in the spec
    inputs: tuple[str, ...] = ("model",)  # bindable pipeline inputs
    formats: tuple[str, ...] = ()  # dataset row formats it trains on (empty: no dataset)
    produces: str = "model"  # "model" (full or adapter), "reward_model", "export"
    lr: tuple[float, float] | None = None  # the trainer's default (full, adapters)
    auto_lr: tuple[float, float] | None = None  # auto_configure's recipe (full, adapters)
    seq_factor: int = 1  # auto_configure: sequences per row in one step's activations
    epochs_by_size: bool = False  # auto_configure: 1-3 epochs by dataset size, else 1
    cli: str = ""  # `mlxu train <cli>` ("" = none)
    cli_help: str = ""
    flags: tuple[Flag, ...] = field(default_factory=tuple)

    @property
    def produces_model(self) -> bool:
        """A policy-like checkpoint a later stage can train or export (not a reward model)."""
        return self.produces != "reward_model"

    @property
    def has_dataset(self) -> bool:
        return bool(self.formats)

    @property
    def has_reference(self) -> bool:
        return "reference" in self.inputs

    @property
    def rollouts(self) -> bool:
        """Trains on its own samples (PPO, GRPO): prompts in, a reward source, rollouts."""
        return "reward_model" in self.inputs

    def config_class(self) -> Any:
        return load(self.config)


PREFERENCE = ("preference",)
PROMPTS = ("prompt", "completion", "preference")  # rollouts take any row's prompt
_REFERENCE = Flag("reference", "reference policy (default: the starting policy)")
_ROLLOUT_FLAGS = (
    _REFERENCE,
    Flag("reward-model", "reward-model checkpoint"),
    Flag("reward-function", 'built-in reward, e.g. "length"'),
)
_RLHF = dict(
    service="rlhf",
    prepare="services.rlhf.server:rlhf_config",
    check="services.rlhf.server:check_spec",
)

METHODS: tuple[Method, ...] = (
    Method(
        "sft", "training", "StartSFT", tpb.StartSFTRequest, tpb.StartSFTResponse, tpb.SFTSpec,
        SK.STAGE_KIND_SFT,
        trainer="services.training.trainers.sft:run",
        config="services.schema.training:SFTConfig",
        prepare="services.training.spec:sft_config",
        check="services.training.spec:check_sft",
        model_field="model",
        formats=("text", "chat", "completion"),
        lr=(1e-5, 1e-4), auto_lr=(2e-5, 2e-4), epochs_by_size=True,
        cli="sft", cli_help="supervised fine-tuning (full, LoRA, DoRA, QLoRA)",
    ),
    Method(
        "distill", "distillation", "StartDistillation", dpb.StartDistillationRequest,
        dpb.StartDistillationResponse, dpb.DistillationSpec, SK.STAGE_KIND_DISTILL,
        trainer="services.distillation.trainers.kd:run",
        config="services.schema.distill:DistillSettings",
        prepare="services.distillation.server:distill_config",
        check="services.distillation.server:check_spec",
        model_field="student", inputs=("model", "teacher"),
        formats=("text", "chat", "completion"),
        lr=(1e-4, 1e-4), auto_lr=(2e-5, 2e-4), epochs_by_size=True,
        cli="distill", cli_help="knowledge distillation into --model",
        flags=(Flag("teacher", "teacher model (repeat for several)", repeat=True),),
    ),
    Method(
        "reward_model", rpc="StartRewardModel", request=rpb.StartRewardModelRequest,
        response=rpb.StartRewardModelResponse, spec=rpb.RewardModelSpec,
        stage_kind=SK.STAGE_KIND_REWARD_MODEL,
        trainer="services.rlhf.trainers.reward_model:run",
        config="services.schema.preference:RewardModelConfig",
        model_field="model", formats=PREFERENCE, produces="reward_model",
        lr=(1e-4, 1e-4), auto_lr=(1e-5, 1e-4), seq_factor=2,
        cli="reward-model", cli_help="train a reward model on preference data", **_RLHF,
    ),
    Method(
        "dpo", rpc="StartDPO", request=rpb.StartDPORequest, response=rpb.StartDPOResponse,
        spec=rpb.DPOSpec, stage_kind=SK.STAGE_KIND_DPO,
        trainer="services.rlhf.trainers.dpo:run",
        config="services.schema.preference:DPOConfig",
        model_field="policy", inputs=("model", "reference"), formats=PREFERENCE,
        lr=(1e-6, 1e-5), auto_lr=(5e-7, 5e-6), seq_factor=2,
        cli="dpo", cli_help="direct preference optimisation",
        flags=(_REFERENCE, Flag("beta", "DPO temperature (default 0.1)", float)), **_RLHF,
    ),
    Method(
        "ppo", rpc="StartPPO", request=rpb.StartPPORequest, response=rpb.StartPPOResponse,
        spec=rpb.PPOSpec, stage_kind=SK.STAGE_KIND_PPO,
        trainer="services.rlhf.trainers.ppo:run",
        config="services.schema.rollouts:PPOConfig",
        model_field="policy", inputs=("model", "reference", "reward_model"), formats=PROMPTS,
        lr=(1e-5, 1e-4), auto_lr=(1e-6, 1e-5), seq_factor=2,
        cli="ppo", cli_help="PPO with a reward model or function", flags=_ROLLOUT_FLAGS,
        **_RLHF,
    ),
    Method(
        "grpo", rpc="StartGRPO", request=rpb.StartGRPORequest, response=rpb.StartGRPOResponse,
        spec=rpb.GRPOSpec, stage_kind=SK.STAGE_KIND_GRPO,
        trainer="services.rlhf.trainers.grpo:run",
        config="services.schema.rollouts:GRPOConfig",
        model_field="policy", inputs=("model", "reference", "reward_model"), formats=PROMPTS,
        lr=(1e-5, 1e-4), auto_lr=(1e-6, 1e-5), seq_factor=4,
        cli="grpo", cli_help="GRPO",
        flags=(*_ROLLOUT_FLAGS, Flag("beta", "KL coefficient", float)), **_RLHF,
    ),
    Method(
        "kto", rpc="StartKTO", request=rpb.StartKTORequest, response=rpb.StartKTOResponse,
        spec=rpb.KTOSpec, stage_kind=SK.STAGE_KIND_KTO,
        trainer="services.rlhf.trainers.kto:run",
        config="services.schema.preference:KTOConfig",
        model_field="policy", inputs=("model", "reference"),
        formats=("unpaired_preference", "preference"),
        lr=(1e-6, 1e-5), auto_lr=(5e-7, 5e-6), seq_factor=2,
        cli="kto", cli_help="KTO on unpaired (or preference) rows",
        flags=(_REFERENCE, Flag("beta", "KTO temperature (default 0.1)", float)), **_RLHF,
    ),
    Method(
        "orpo", rpc="StartORPO", request=rpb.StartORPORequest, response=rpb.StartORPOResponse,
        spec=rpb.ORPOSpec, stage_kind=SK.STAGE_KIND_ORPO,
        trainer="services.rlhf.trainers.orpo:run",
        config="services.schema.preference:ORPOConfig",
        model_field="policy", formats=PREFERENCE,
        lr=(1e-6, 1e-5), auto_lr=(5e-7, 5e-6), seq_factor=2,
        cli="orpo", cli_help="ORPO: SFT plus an odds-ratio preference term, no reference",
        flags=(Flag("beta", "odds-ratio weight (default 0.1)", float),), **_RLHF,
    ),
    Method(
        "export", "training", "StartExport", tpb.StartExportRequest, tpb.StartExportResponse,
        tpb.ExportSpec, SK.STAGE_KIND_EXPORT,
        trainer="services.training.trainers.export:run",
        config="services.schema.training:ExportConfig",
        prepare="services.training.spec:export_config",
        check="services.training.spec:check_export",
        model_field="model", produces="export",
    ),
)  # fmt: skip

_BY_NAME = {m.name: m for m in METHODS}
_BY_SPEC = {m.spec.DESCRIPTOR.full_name: m for m in METHODS}
_BY_STAGE = {m.stage_kind: m for m in METHODS}
assert len(_BY_NAME) == len(_BY_SPEC) == len(_BY_STAGE) == len(METHODS), "duplicate method"


def get(name: str) -> Method:
    """The method called ``name`` (KeyError names the known ones)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown training method {name!r}; one of {', '.join(names())}") from None


def names(service: str | None = None) -> tuple[str, ...]:
    return tuple(m.name for m in of_service(service))


def of_service(service: str | None = None) -> Iterator[Method]:
    return (m for m in METHODS if service is None or m.service == service)


def by_spec(spec: Message) -> Method:
    """The method whose spec message ``spec`` is."""
    return _BY_SPEC[spec.DESCRIPTOR.full_name]


def by_stage_kind(kind: int) -> Method | None:
    return _BY_STAGE.get(kind)
