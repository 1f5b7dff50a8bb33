"""The training service's method configs: SFT (full, LoRA, DoRA, QLoRA) and export."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from services import registry
from services.runtime.errors import Violations
from services.schema.base import DictConfig, setting, sub
from services.schema.common import (
    FINETUNE_METHODS,
    DatasetSettings,
    LoopSettings,
    LoraSettings,
    ModelSettings,
    OptimizerSettings,
    QuantizationSettings,
    ResourcesSettings,
    default_lr,
    method_name,
)

__all__ = ["EXPORT_MODES", "SFT_FORMATS", "ExportConfig", "SFTConfig"]

SFT_FORMATS = ("text", "chat", "completion")
EXPORT_MODES = ("fuse", "quantize", "dequantize")


@dataclass(frozen=True)
class SFTConfig(DictConfig):
    """Mirrors SFTSpec."""

    model: ModelSettings = sub(ModelSettings)
    dataset: DatasetSettings = sub(DatasetSettings)
    method: str = setting("lora", zero=True, choices=FINETUNE_METHODS)
    lora: LoraSettings = sub(LoraSettings)
    quantization: QuantizationSettings = sub(QuantizationSettings)
    optimizer: OptimizerSettings = sub(OptimizerSettings)
    loop: LoopSettings = sub(LoopSettings)
    resources: ResourcesSettings = sub(ResourcesSettings)
    output_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def prepare(cls, data: dict) -> dict:
        # The default learning rate depends on the method: the registry's (full, adapters).
        return default_lr(data, *registry.get("sft").lr)

    def resolve(self) -> SFTConfig:
        return dataclasses.replace(self, method=method_name(self.method))

    def check(self, v: Violations, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        v.check(bool(self.model.model), f"{p}model.model", "is required")
        v.check(bool(self.dataset.path), f"{p}dataset.path", "is required")
        v.check(
            self.dataset.format in ("", *SFT_FORMATS),
            f"{p}dataset.format",
            f"SFT takes {', '.join(SFT_FORMATS)} data",
        )


@dataclass(frozen=True)
class ExportConfig(DictConfig):
    """Mirrors ExportSpec."""

    model: ModelSettings = sub(ModelSettings)
    mode: str = setting("fuse", zero=True, choices=EXPORT_MODES)
    quantization: QuantizationSettings = sub(QuantizationSettings)
    output_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def resolve(self) -> ExportConfig:
        return dataclasses.replace(self, mode=self.mode.lower().removeprefix("export_mode_"))

    def check(self, v: Violations, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        v.check(bool(self.model.model), f"{p}model.model", "is required")
        if self.mode == "fuse":
            v.check(bool(self.model.adapter_path), f"{p}model.adapter_path", "fuse needs one")
