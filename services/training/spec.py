"""Validate training-service requests and turn them into resolved trainer configs.

Everything a client can get wrong is found here, before a job exists: bad numbers, unknown
models, paths outside the allowed roots, missing / empty / malformed datasets (with the line
or row), a dataset of the wrong format for the method.
"""

from __future__ import annotations

from typing import Any

from mlx_unified.v1 import common_pb2, training_pb2
from services.runtime import specs
from services.runtime.errors import Violations
from services.runtime.refs import resolve_dataset, resolve_model_ref
from services.runtime.settings import Settings
from services.schema.training import SFT_FORMATS, ExportConfig, SFTConfig


def _check_sft_shape(spec: training_pb2.SFTSpec, prefix: str) -> None:
    """What the config class cannot see: proto presence (a quantization section for a method
    that does not quantize) and required references, named by their proto field."""
    v = Violations()
    v.check(
        spec.HasField("model") and bool(spec.model.model), f"{prefix}.model.model", "is required"
    )
    v.check(bool(spec.dataset.path), f"{prefix}.dataset.path", "is required")
    if spec.method != common_pb2.FINETUNE_METHOD_QLORA and spec.HasField("quantization"):
        v.add(f"{prefix}.quantization", "only applies to method QLORA")
    v.raise_if_any()


def check_sft(spec: training_pb2.SFTSpec, prefix: str = "spec") -> None:
    """Every SFT rule that needs no file (the orchestrator runs it on its stages too)."""
    _check_sft_shape(spec, prefix)
    SFTConfig.from_dict(specs.to_dict(spec), prefix=prefix)


def sft_config(spec: training_pb2.SFTSpec, settings: Settings) -> dict[str, Any]:
    """Validate an SFTSpec (once: the schema, then the files it names) and return the
    trainer's resolved config (every default filled)."""
    _check_sft_shape(spec, "spec")
    config = specs.to_dict(spec)
    v = Violations()  # every problem at once: the references' and the fields'
    model = v.attempt(resolve_model_ref, spec.model, settings, "spec.model")
    dataset = v.attempt(resolve_dataset, spec.dataset, settings, "spec.dataset", SFT_FORMATS)
    config.update({k: x for k, x in (("model", model), ("dataset", dataset)) if x is not None})
    built = v.attempt(SFTConfig.from_dict, config, prefix="spec")
    v.raise_if_any()
    return built.to_dict()


def _export_dict(spec: training_pb2.ExportSpec) -> dict[str, Any]:
    config = specs.to_dict(spec)
    mode = spec.mode or training_pb2.EXPORT_MODE_FUSE
    config["mode"] = specs.to_dict(training_pb2.ExportSpec(mode=mode))["mode"]
    return config


def check_export(spec: training_pb2.ExportSpec, prefix: str = "spec") -> None:
    ExportConfig.from_dict(_export_dict(spec), prefix=prefix)


def export_config(spec: training_pb2.ExportSpec, settings: Settings) -> dict[str, Any]:
    config = _export_dict(spec)
    v = Violations()
    model = v.attempt(resolve_model_ref, spec.model, settings, "spec.model")
    if model is not None:
        config["model"] = model
    built = v.attempt(ExportConfig.from_dict, config, prefix="spec")
    v.raise_if_any()
    return built.to_dict()
