"""Gradient checkpointing for an mlx-lm model (``loop.grad_checkpoint``).

A transform of the model rather than a part of the step, so it sits apart from the loop;
trainers with their own loop can apply it the same way.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

__all__ = ["enable_grad_checkpoint"]

# Cached per block class: every model of that class shares one subclass, and a second call
# finds its blocks already swapped.
_CHECKPOINTED: dict[type, type] = {}


def enable_grad_checkpoint(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass (less memory, ~30% more compute).

    Swaps each block *instance* to a subclass with a checkpointed ``__call__`` (mlx-lm patches
    the block class itself, which would leak into every other model in the process)."""
    for layer in model.layers:
        cls = type(layer)
        if cls in _CHECKPOINTED.values():
            continue
        if cls not in _CHECKPOINTED:
            fn = cls.__call__

            def call(self, *args, _fn=fn, **kwargs):
                def inner(params, *a, **kw):
                    self.update(params)
                    return _fn(self, *a, **kw)

                return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

            _CHECKPOINTED[cls] = type(cls.__name__, (cls,), {"__call__": call})
        layer.__class__ = _CHECKPOINTED[cls]
