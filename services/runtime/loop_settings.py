"""The config sections every trainer shares (model, dataset, resources, loop), re-exported
from their MLX-free schema in ``services.schema.common``, and ``total_steps``.
"""

from __future__ import annotations

import math
from typing import Any

from services.schema.base import sub
from services.schema.common import (
    DTYPES,
    DatasetSettings,
    LoopSettings,
    ModelSettings,
    ResourcesSettings,
    default_dtype,
)

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


def total_steps(loop: LoopSettings, batches: Any) -> int:
    """Optimizer steps of a run: ``max_steps``, else epochs over ``batches.steps_per_epoch``
    micro-batches grouped by ``grad_accumulation_steps``."""
    if loop.max_steps > 0:
        return loop.max_steps
    per_epoch = max(int(getattr(batches, "steps_per_epoch", 0)), 1)
    return loop.epochs * max(math.ceil(per_epoch / loop.grad_accumulation_steps), 1)
