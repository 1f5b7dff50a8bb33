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

SFT_FORMATS = ("text", "chat", "completion")


def sft_config(spec: training_pb2.SFTSpec, settings: Settings) -> dict[str, Any]:
    """Validate an SFTSpec and return the trainer's resolved config (every default filled)."""
    from services.training.trainers.sft import SFTConfig

    v = Violations()
    v.check(spec.HasField("model") and bool(spec.model.model), "spec.model.model", "is required")
    v.check(bool(spec.dataset.path), "spec.dataset.path", "is required")
    specs.check_common(v, spec)
    if spec.method == common_pb2.FINETUNE_METHOD_QLORA:
        specs.check_quantization(v, spec.quantization, "spec.quantization")
    elif spec.HasField("quantization"):
        v.add("spec.quantization", "only applies to method QLORA")
    v.raise_if_any()
    config = specs.to_dict(spec)
    config["model"] = resolve_model_ref(spec.model, settings, "spec.model")
    config["dataset"] = resolve_dataset(spec.dataset, settings, "spec.dataset", SFT_FORMATS)
    return SFTConfig.from_dict(config, prefix="spec").to_dict()


def export_config(spec: training_pb2.ExportSpec, settings: Settings) -> dict[str, Any]:
    from services.training.trainers.export import ExportConfig

    v = Violations()
    v.check(bool(spec.model.model), "spec.model.model", "is required")
    specs.check_quantization(v, spec.quantization, "spec.quantization")
    mode = spec.mode or training_pb2.EXPORT_MODE_FUSE
    if mode == training_pb2.EXPORT_MODE_FUSE:
        v.check(bool(spec.model.adapter_path), "spec.model.adapter_path", "fuse needs an adapter")
    v.raise_if_any()
    config = specs.to_dict(spec)
    config["mode"] = specs.to_dict(training_pb2.ExportSpec(mode=mode))["mode"]
    config["model"] = resolve_model_ref(spec.model, settings, "spec.model")
    return ExportConfig.from_dict(config, prefix="spec").to_dict()
