"""Keep mlx-lm's optional logger imports off every worker's start.

``mlx_lm.tuner.callbacks`` runs ``import wandb`` and ``import swanlab`` whenever they are
installed, for mlx-lm's own loggers, which the platform never uses; any import of
``mlx_lm.tuner`` (LoRA layers, adapter loading) pays for them. wandb alone is ~1 s of a
worker's start on two CPU cores (it is in the dev group for the W&B sink's tests). A finder
answers those two imports with ``ImportError`` when, and only when, that module asks, so
``services.runtime.jobs.tracking``'s W&B sink (and anyone else) still imports wandb for real.
"""

from __future__ import annotations

import importlib.abc
import sys

_SKIPPED = frozenset({"wandb", "swanlab"})
_ASKER = "mlx_lm.tuner.callbacks"


class _SkipForMlxLmCallbacks(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 (finder protocol)
        if name not in _SKIPPED:
            return None
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_globals.get("__name__") == _ASKER:
                raise ModuleNotFoundError(f"{name} is not imported for {_ASKER}", name=name)
            frame = frame.f_back
        return None


def install() -> None:
    """Idempotent; call before anything imports mlx_lm.tuner."""
    if not any(isinstance(f, _SkipForMlxLmCallbacks) for f in sys.meta_path):
        sys.meta_path.insert(0, _SkipForMlxLmCallbacks())
