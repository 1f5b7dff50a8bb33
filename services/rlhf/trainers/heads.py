"""A scalar head on a base language model: rewards (reward model) and values (PPO).

``attach_head(lm)`` adds ``lm.value_head = Linear(hidden, 1)`` to an mlx-lm model, so the
shared training loop sees one module whose trainable parameters are the LM's (all of them,
or its LoRA/DoRA adapters) plus ``value_head.weight`` / ``value_head.bias``. One pass
through the trunk gives both the logits and the per-token scalars, so PPO's policy and
value share the trunk (TRL's original ``AutoModelForCausalLMWithValueHead``, whose defaults
PPOSpec follows).

On disk the head is ``value_head.safetensors`` beside the LM's own files (which never contain
it, so ``mlx_lm.load`` still opens the directory as a plain LM). Its metadata is the marker
that makes a directory a reward checkpoint: ``mlxu_head`` = "reward" or "value".
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

HEAD_FILE = "value_head.safetensors"
HEAD_KINDS = ("reward", "value")
_ATTR = "value_head"


def is_head(param_name: str) -> bool:
    return param_name.startswith(_ATTR + ".")


def hidden_size(lm: nn.Module) -> int:
    size = getattr(getattr(lm, "args", None), "hidden_size", None)
    if size is None:
        raise ValueError(f"cannot find hidden_size on model type {type(lm).__name__}")
    return int(size)


def trunk(lm: nn.Module, inputs: mx.array) -> mx.array:
    """Final (normed) hidden states ``[B, L, H]`` of an mlx-lm causal LM."""
    inner = getattr(lm, "model", None)
    if inner is None:
        raise ValueError(f"model type {type(lm).__name__} has no .model trunk")
    return inner(inputs)


def lm_logits(lm: nn.Module, hidden: mx.array) -> mx.array:
    """The LM head on trunk outputs (``lm_head`` or tied embeddings), as ``lm(inputs)``."""
    if hasattr(lm, "lm_head"):
        return lm.lm_head(hidden)
    return lm.model.embed_tokens.as_linear(hidden)


def last_token(x: mx.array, lengths: mx.array) -> mx.array:
    """``x[b, lengths[b] - 1]`` for ``x [B, L]``: the last real (non-pad) position."""
    idx = mx.maximum(lengths.astype(mx.int32) - 1, 0)
    return mx.take_along_axis(x, idx[:, None], axis=1).squeeze(1)


def attach_head(lm: nn.Module, seed: int = 0) -> nn.Module:
    """Give ``lm`` a trainable fp32 ``Linear(hidden, 1)`` head; returns ``lm``.

    Small, seeded init: the head starts near 0 so that early rewards / values do not swamp
    the loss, and two runs with one seed start identically."""
    h = hidden_size(lm)
    head = nn.Linear(h, 1)
    head.weight = mx.random.normal((1, h), key=mx.random.key(seed)) / (h + 1) ** 0.5
    head.bias = mx.zeros((1,))
    setattr(lm, _ATTR, head)
    return lm


def has_attached_head(lm: nn.Module) -> bool:
    return _ATTR in lm


def _head(lm: nn.Module, hidden: mx.array) -> mx.array:
    head = lm[_ATTR]
    return head(hidden.astype(head.weight.dtype)).squeeze(-1)


def values(lm: nn.Module, inputs: mx.array) -> mx.array:
    """Per-token scalars ``[B, L]``."""
    return _head(lm, trunk(lm, inputs))


def rewards(lm: nn.Module, inputs: mx.array, lengths: mx.array) -> mx.array:
    """One scalar per row ``[B]``, read at its last non-pad token."""
    return last_token(values(lm, inputs), lengths)


def logits_and_values(lm: nn.Module, inputs: mx.array) -> tuple[mx.array, mx.array]:
    """``(logits [B, L, V], values [B, L])`` from one pass through the trunk."""
    h = trunk(lm, inputs)
    return lm_logits(lm, h), _head(lm, h)


def save_head(lm: nn.Module, directory: Path, kind: str) -> Path:
    """Write ``value_head.safetensors`` (keys as the LM names them) with its marker."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"head kind {kind!r} not in {HEAD_KINDS}")
    head = lm[_ATTR]
    meta = {
        "mlxu_head": kind,
        "hidden_size": str(head.weight.shape[1]),
        "read_at": "last_token" if kind == "reward" else "every_token",
    }
    weights = {f"{_ATTR}.{k}": v for k, v in tree_flatten(head.parameters())}
    path = Path(directory) / HEAD_FILE
    mx.save_safetensors(str(path), weights, metadata=meta)
    return path


def head_metadata(directory: Path) -> dict[str, str] | None:
    """The head's marker metadata, or None when ``directory`` holds no valid head."""
    path = Path(directory) / HEAD_FILE
    if not path.is_file():
        return None
    try:
        _, meta = mx.load(str(path), return_metadata=True)
    except Exception:  # noqa: BLE001 - unreadable = no head
        return None
    return meta if meta.get("mlxu_head") in HEAD_KINDS else None


def load_head(lm: nn.Module, directory: Path) -> str:
    """Attach the head saved in ``directory`` to ``lm``; returns its kind."""
    path = Path(directory) / HEAD_FILE
    weights, meta = mx.load(str(path), return_metadata=True)
    kind = meta.get("mlxu_head")
    if kind not in HEAD_KINDS:
        raise ValueError(f"{path} is not a value/reward head (no mlxu_head marker)")
    want = hidden_size(lm)
    if int(meta.get("hidden_size", want)) != want:
        raise ValueError(f"{path}: head hidden size {meta['hidden_size']} != model's {want}")
    attach_head(lm)
    lm[_ATTR].load_weights([(k.removeprefix(_ATTR + "."), v) for k, v in weights.items()])
    return kind
