"""Trainer state: what exact resume needs beside the model weights.

A checkpoint directory holds the model (written by the trainer's artifact) and, under
``checkpoints.TRAINER_STATE``, this module's files:

    optimizer.safetensors   the optimizer's state tree, flattened (moments, step count)
    state.json              step, tokens, train time, last metrics, the data position
                            (``batches.state()``) and extra trainer state
                            (``extra.state()``, e.g. an adaptive KL controller)

RNG: randomness inside a step derives from (seed, step) (dropout keys in the batch step,
PPO / GRPO minibatch shuffles and per-update seeds), so a run resumed at step k draws what
an uninterrupted one draws from step k on and needs no file for it; state that is carried
from step to step instead (the rollout sampling key, an adaptive KL controller) is the
strategy's extra state.

The one loop (``services.runtime.steps.run_steps``) saves and restores through
``write_trainer_state`` / ``restore`` with its strategy's ``data`` (the position) and
``extra`` (a ``Stateful``), so every method resumes the same way and reads the others'
checkpoints the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from services.runtime import checkpoints
from services.runtime.errors import FailedPrecondition

__all__ = ["OPTIMIZER_FILE", "STATE_FILE", "Progress", "Stateful", "restore", "write_trainer_state"]

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


class Stateful(Protocol):
    """Extra trainer state saved with every checkpoint (e.g. an adaptive KL controller)."""

    def state(self) -> dict: ...
    def restore(self, state: dict) -> None: ...


@dataclass
class Progress:
    """Where a run stands: optimizer steps done, tokens seen, training seconds, last metrics."""

    step: int = 0
    tokens: int = 0
    train_time: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


def write_trainer_state(
    dst: Path,
    optimizer: optim.Optimizer,
    progress: Progress,
    batches: Any,
    extra: Stateful | None,
) -> None:
    """Write the trainer state into ``dst`` (inside a checkpoint's temp dir).

    ``batches`` is saved when it has ``state()`` (a data stream's position)."""
    dst.mkdir(parents=True, exist_ok=True)
    arrays = dict(tree_flatten(optimizer.state))
    mx.save_safetensors(str(dst / OPTIMIZER_FILE), arrays)
    state = {
        "step": progress.step,
        "tokens": progress.tokens,
        "train_time": progress.train_time,
        "metrics": progress.metrics,
        "batches": batches.state() if hasattr(batches, "state") else None,
        "extra": extra.state() if extra is not None else None,
    }
    (dst / STATE_FILE).write_text(json.dumps(state, indent=2))


def _assign(tree: Any, path: str, value: mx.array) -> bool:
    """Set the leaf at a ``tree_flatten`` path (``"a.0.b"``) in place; False if absent."""
    node = tree
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list | tuple) else node.get(k)
        if node is None:
            return False
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    elif isinstance(node, dict) and last in node:
        node[last] = value
    else:
        return False
    return True


def restore(
    path: Path,
    model: nn.Module,
    optimizer: optim.Optimizer,
    batches: Any,
    extra: Stateful | None,
) -> Progress:
    """Load a checkpoint's trainable weights, optimizer state, data position and extra
    state into the given (already initialised) objects; returns where the run stood.

    Raises FailedPrecondition when the checkpoint does not fit the model or optimizer (a
    job whose config changed between attempts), rather than resuming something else."""
    checkpoints.verify(path)
    weights: dict[str, mx.array] = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    bad = [k for k, v in trainable.items() if k not in weights or weights[k].shape != v.shape]
    if bad:
        raise FailedPrecondition(
            f"checkpoint {path} does not match the model ({len(bad)} trainable parameters "
            f"missing or reshaped, e.g. {bad[0]}); was the job's config changed?"
        )
    model.load_weights([(k, weights[k].astype(trainable[k].dtype)) for k in trainable], False)

    ts = path / checkpoints.TRAINER_STATE
    saved = mx.load(str(ts / OPTIMIZER_FILE))
    current = dict(tree_flatten(optimizer.state))
    if set(saved) != set(current):
        raise FailedPrecondition(f"optimizer state in {path} does not match this optimizer")
    for k, v in saved.items():
        _assign(optimizer.state, k, v)
    state = json.loads((ts / STATE_FILE).read_text())
    if state.get("batches") is not None and hasattr(batches, "restore"):
        batches.restore(state["batches"])
    if extra is not None and state.get("extra") is not None:
        extra.restore(state["extra"])
    mx.eval(model.parameters(), optimizer.state)
    return Progress(
        step=int(state["step"]),
        tokens=int(state.get("tokens", 0)),
        train_time=float(state.get("train_time", 0.0)),
        metrics=dict(state.get("metrics") or {}),
    )
