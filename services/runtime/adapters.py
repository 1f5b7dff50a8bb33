"""Fine-tuning methods: which parameters train, and how adapters are written.

``apply(model, method, lora, quant)`` freezes what must not train and returns the mlx-lm
``adapter_config.json`` dict (None for full fine-tuning):

- full:  every parameter trains.
- lora / dora: the base is frozen; mlx-lm's LoRA / DoRA layers replace the linear layers of
  the last ``num_layers`` blocks (``keys`` selects modules, empty = mlx-lm's default).
- qlora: the frozen base is quantized first (``bits`` / ``group_size``), then LoRA.

Adapter checkpoints are mlx-lm's format (``adapters.safetensors`` + ``adapter_config.json``
with ``fine_tune_type``, ``num_layers``, ``lora_parameters``) plus ``base_model`` (and
``quantization`` for QLoRA), so ``mlx_lm.load(base, adapter_path=dir)`` opens them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from services.runtime import models
from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.schema.common import FINETUNE_METHODS, LoraSettings, QuantizationSettings

METHODS = FINETUNE_METHODS
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def is_quantized(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for _, m in model.named_modules()
    )


def apply(
    model: nn.Module,
    method: str,
    lora: LoraSettings,
    quant: QuantizationSettings | None = None,
    *,
    base_model: str = "",
    init_adapter: str | Path | None = None,
) -> dict[str, Any] | None:
    """Make ``model`` trainable for ``method``; returns the adapter_config dict (None: full).

    ``init_adapter``: an existing adapter dir to continue training (its own layout, rank and
    keys win over ``lora``; its fine_tune_type must match ``method``)."""
    if method not in METHODS:
        raise InvalidArgument.one("spec.method", f"must be one of {METHODS}")
    if method == "full":
        if is_quantized(model):
            raise InvalidArgument.one(
                "spec.method",
                "full fine-tuning needs an unquantized model; use lora/qlora, or dequantize "
                "the model with an export job first",
            )
        model.unfreeze()
        return None

    quantization = None
    if method == "qlora":
        q = quant or QuantizationSettings()
        if not is_quantized(model):
            models.quantize(model, q.bits, q.group_size, field="spec.quantization")
        quantization = {"bits": q.bits, "group_size": q.group_size}
    model.freeze()
    n_blocks = len(model.layers)
    num_layers = n_blocks if lora.num_layers == -1 else min(lora.num_layers, n_blocks)
    params: dict[str, Any] = {"rank": lora.rank, "scale": lora.scale, "dropout": lora.dropout}
    if lora.keys:
        params["keys"] = list(lora.keys)
    fine_tune_type = "dora" if method == "dora" else "lora"
    if init_adapter:
        prior = read_adapter_config(Path(init_adapter))
        if prior.get("fine_tune_type", "lora") != fine_tune_type:
            raise InvalidArgument.one(
                "spec.model.adapter_path",
                f"is a {prior.get('fine_tune_type')!r} adapter; method {method!r} cannot "
                "continue it",
            )
        num_layers, params = int(prior["num_layers"]), dict(prior["lora_parameters"])
    linear_to_lora_layers(model, num_layers, params, use_dora=method == "dora")
    trainable = dict(tree_flatten(model.trainable_parameters()))
    if not trainable:
        raise InvalidArgument.one(
            "spec.lora.keys", f"{list(lora.keys)} matched no layer of the model's blocks"
        )
    if init_adapter:
        saved = mx.load(str(Path(init_adapter) / ADAPTER_WEIGHTS))
        bad = [k for k, v in trainable.items() if k not in saved or saved[k].shape != v.shape]
        if bad:
            raise FailedPrecondition(f"adapter {init_adapter} does not fit the model ({bad[0]})")
        model.load_weights([(k, saved[k].astype(trainable[k].dtype)) for k in trainable], False)
    config: dict[str, Any] = {
        "fine_tune_type": fine_tune_type,
        "num_layers": num_layers,
        "lora_parameters": params,
        "base_model": base_model,
        "method": method,
    }
    if quantization:
        config["quantization"] = quantization
    return config


def fuse(model: nn.Module, dequantize: bool = False) -> int:
    """Merge LoRA / DoRA layers into their base layers in place (as mlx_lm.fuse); returns
    how many layers were fused."""
    fused = [
        (n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapter(path: Path, model: nn.Module, adapter_config: dict[str, Any]) -> None:
    """Write an mlx-lm adapter dir (weights + adapter_config.json) into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / ADAPTER_WEIGHTS), adapter_weights(model))
    (path / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))


def read_adapter_config(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text())
