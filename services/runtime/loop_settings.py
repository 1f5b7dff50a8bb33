"""The config sections every trainer shares: model, dataset, resources and the loop itself.

Each trainer's frozen config dataclass nests these (``model: ModelSettings = sub(...)``), so
a field means the same thing, with the same default and the same check, in every method.
They live apart from the loop because config building and validation read them on every
request, while only a running job needs the loop. Each mirrors a proto message; a zero
means the default (``zero_default``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from services.runtime.errors import Violations
from services.runtime.optim import DictConfig, zero_default

__all__ = [
    "DTYPES",
    "DatasetSettings",
    "LoopSettings",
    "ModelSettings",
    "ResourcesSettings",
    "default_dtype",
    "sub",
    "total_steps",
]

DTYPES = ("float32", "bfloat16", "float16")


def default_dtype() -> str:
    """float32 on the CPU (bf16 is far slower there), bfloat16 on a GPU."""
    from services.runtime.models import compute_dtype

    return compute_dtype()


def sub(cls: type) -> Any:
    """A nested settings field whose default is the resolved default instance."""
    return field(default_factory=lambda: cls().resolve())


@dataclass(frozen=True)
class ModelSettings(DictConfig):
    """Mirrors ModelRef; ``model`` is already resolved (a local dir or a hub id)."""

    model: str = ""
    adapter_path: str = ""

    def validate(self, v: Violations, prefix: str) -> None:
        v.check(bool(self.model), f"{prefix}.model" if prefix else "model", "is required")


@dataclass(frozen=True)
class DatasetSettings(DictConfig):
    """Mirrors DatasetRef (passed on to services.runtime.datasets.prepare)."""

    path: str = ""
    format: str = ""  # "" = detect from row 1
    valid_path: str = ""
    valid_fraction: float | None = None  # None = 0.1 when there is no validation file

    def resolve(self) -> DatasetSettings:
        frac = 0.1 if self.valid_fraction is None else self.valid_fraction
        return dataclasses.replace(self, format=self.format.lower(), valid_fraction=frac)

    def validate(self, v: Violations, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        v.check(bool(self.path), f"{p}path", "is required")
        v.check(0 <= (self.valid_fraction or 0) < 0.5, f"{p}valid_fraction", "in [0, 0.5)")


@dataclass(frozen=True)
class ResourcesSettings(DictConfig):
    """Mirrors Resources (used by the job runner to launch data-parallel workers)."""

    num_processes: int = zero_default(1)
    hosts: tuple[str, ...] = ()
    hostfile: str = ""
    backend: str = zero_default("ring")


@dataclass(frozen=True)
class LoopSettings(DictConfig):
    """Mirrors LoopConfig; a zero means the default."""

    batch_size: int = zero_default(4)  # global sequences per optimizer step
    grad_accumulation_steps: int = zero_default(1)
    max_steps: int = 0  # 0 = epochs * steps per epoch
    epochs: int = zero_default(1)
    max_seq_length: int = zero_default(512)
    seed: int = 0
    steps_per_report: int = zero_default(10)
    steps_per_eval: int = zero_default(100)  # -1 disables validation
    val_batches: int = zero_default(25)  # -1 = the whole validation set
    steps_per_checkpoint: int = zero_default(100)  # -1 = only at the end
    keep_last_checkpoints: int = zero_default(3)  # -1 = keep all
    grad_checkpoint: bool = False
    mask_prompt: bool | None = None  # None = by data format (chat / completion: True)
    dtype: str = zero_default("")  # "" = default_dtype()

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accumulation_steps

    def resolve(self) -> LoopSettings:
        return dataclasses.replace(self, dtype=self.dtype.lower() or default_dtype())

    def validate(self, v: Violations, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        v.check(self.batch_size >= 1, f"{p}batch_size", "must be >= 1")
        v.check(self.grad_accumulation_steps >= 1, f"{p}grad_accumulation_steps", ">= 1")
        v.check(
            self.batch_size % max(self.grad_accumulation_steps, 1) == 0,
            f"{p}batch_size",
            "must be a multiple of grad_accumulation_steps (it is the global batch)",
        )
        v.check(self.max_steps >= 0, f"{p}max_steps", "must be >= 0")
        v.check(self.epochs >= 1, f"{p}epochs", "must be >= 1")
        v.check(8 <= self.max_seq_length <= 1 << 20, f"{p}max_seq_length", "8..1048576")
        v.check(self.steps_per_report >= 1, f"{p}steps_per_report", "must be >= 1")
        for key in ("steps_per_eval", "val_batches", "steps_per_checkpoint"):
            val = getattr(self, key)
            v.check(val >= 1 or val == -1, f"{p}{key}", "must be >= 1, or -1")
        v.check(
            self.keep_last_checkpoints >= 1 or self.keep_last_checkpoints == -1,
            f"{p}keep_last_checkpoints",
            "must be >= 1, or -1 (keep all)",
        )
        v.check(self.dtype in DTYPES, f"{p}dtype", f"must be one of {DTYPES}")


def total_steps(loop: LoopSettings, batches: Any) -> int:
    """Optimizer steps of a run: ``max_steps``, else epochs over ``batches.steps_per_epoch``
    micro-batches grouped by ``grad_accumulation_steps``."""
    if loop.max_steps > 0:
        return loop.max_steps
    per_epoch = max(int(getattr(batches, "steps_per_epoch", 0)), 1)
    return loop.epochs * max(math.ceil(per_epoch / loop.grad_accumulation_steps), 1)
