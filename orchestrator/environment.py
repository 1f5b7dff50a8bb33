"""The facts auto_configure needs, read cheaply at pipeline creation: model size and depth,
dataset size, and the memory one job may use. Nothing here loads weights or tokenizes.

- model: a registered name (built or not), a local mlx-lm directory or a Hugging Face id in
  the local hub cache. Parameters are counted from the safetensors headers (shapes only;
  packed quantized weights at their unpacked size), else estimated from config.json
  (llama-shaped: embeddings, attention, gated MLP, norms).
- dataset: exact row count; tokens estimated as characters / 4 (BPE on English text).
- memory: $MLXU_MEMORY_GB when set, else the GPU's recommended working set when MLX runs
  on a GPU, else physical RAM.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from mlx_unified.v1 import common_pb2
from orchestrator.autoconfig import DatasetInfo, Environment, ModelInfo
from services.runtime.datasets import load_dir, load_rows
from services.runtime.errors import InvalidArgument
from services.runtime.paths import confine, looks_like_path
from services.runtime.settings import Settings

CHARS_PER_TOKEN = 4.0
# config.json facts of the registered models, for sizing them before they are built.
REGISTERED: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {
        "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    "tiny-llama": {
        "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "tie_word_embeddings": True,
    },
}  # fmt: skip
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def num_layers(config: dict[str, Any]) -> int:
    for key in _LAYER_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    text = config.get("text_config")
    return num_layers(text) if isinstance(text, dict) else 0


def estimate_params(config: dict[str, Any]) -> int:
    """Parameters of a llama-shaped decoder from its config.json (no weights needed)."""
    if isinstance(config.get("text_config"), dict):
        config = {**config["text_config"], **{k: v for k, v in config.items() if k in _LAYER_KEYS}}
    h = int(config.get("hidden_size") or config.get("n_embd") or 0)
    layers = num_layers(config)
    vocab = int(config.get("vocab_size") or 0)
    if not (h and layers and vocab):
        raise ValueError("config.json lacks hidden_size, num_hidden_layers or vocab_size")
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 1)
    kv = int(config.get("num_key_value_heads") or heads)
    hd = int(config.get("head_dim") or h // heads)
    inter = int(config.get("intermediate_size") or config.get("n_inner") or 4 * h)
    attn = 2 * heads * hd * h + 2 * kv * hd * h  # q, o + k, v
    per_layer = attn + 3 * h * inter + 2 * h
    head = 0 if config.get("tie_word_embeddings", True) else vocab * h
    return vocab * h + head + layers * per_layer + h


def _safetensors_shapes(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) from a safetensors header (the first 8 + n bytes only)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}


def count_params(model_dir: Path, config: dict[str, Any]) -> int:
    """Parameters stored in a model directory's safetensors files; quantized weights count
    at their unpacked size and their scales/biases not at all."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors in {model_dir}")
    quant = config.get("quantization") or config.get("quantization_config") or {}
    bits = int(quant.get("bits", 0)) if isinstance(quant, dict) else 0
    tensors: dict[str, tuple[str, list[int]]] = {}
    for f in files:
        tensors.update(_safetensors_shapes(f))
    total = 0
    for name, (_, shape) in tensors.items():
        stem, _, leaf = name.rpartition(".")
        weight = tensors.get(f"{stem}.weight")
        packed = bool(bits) and weight is not None and weight[0] == "U32"
        packed = packed and f"{stem}.scales" in tensors
        if packed and leaf in ("scales", "biases"):
            continue  # quantization metadata, not parameters
        size = math.prod(shape)
        total += size * 32 // bits if packed and leaf == "weight" else size
    return total


class ModelFacts:
    """``model_info`` for auto_configure, confined to the service's allowed roots."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __call__(self, ref: str) -> ModelInfo:
        ref = (ref or "").strip()
        if not ref:
            raise ValueError("no model given")
        name = ref.lower()
        if name in REGISTERED:
            built = self.settings.models_dir / name
            if (built / "config.json").is_file():
                return self._from_dir(built)
            cfg = REGISTERED[name]
            return ModelInfo(estimate_params(cfg), num_layers(cfg))
        if looks_like_path(ref):
            path = confine(ref, self.settings.allowed_roots, "model")
            if not (path / "config.json").is_file():
                raise ValueError(f"{ref!r} is not an mlx-lm model directory (no config.json)")
            return self._from_dir(path)
        cached = _hub_cached_config(ref)
        if cached is None:
            raise ValueError(f"{ref!r} is not in the local hub cache: set the hyperparameters")
        return ModelInfo(estimate_params(cached), num_layers(cached))

    def _from_dir(self, path: Path) -> ModelInfo:
        config = json.loads((path / "config.json").read_text())
        try:
            params = count_params(path, config)
        except (ValueError, OSError, KeyError, struct.error, json.JSONDecodeError):
            params = estimate_params(config)
        return ModelInfo(params, num_layers(config))


def _hub_cached_config(repo: str) -> dict[str, Any] | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo, "config.json")
    return json.loads(Path(found).read_text()) if isinstance(found, str) else None


class DatasetFacts:
    """``dataset_info`` for auto_configure: rows exactly, tokens estimated."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __call__(self, ref: common_pb2.DatasetRef) -> DatasetInfo:
        path = confine(ref.path, self.settings.allowed_roots, "dataset.path")
        if not path.exists():
            raise InvalidArgument.one("dataset.path", f"{ref.path!r} does not exist")
        parts = (
            load_dir(path, "dataset.path")
            if path.is_dir()
            else {"train": load_rows(path, "dataset.path")}
        )
        rows = parts["train"]
        chars = sum(_text_chars(r) for r in rows)
        return DatasetInfo(
            rows=len(rows),
            tokens=round(chars / CHARS_PER_TOKEN),
            valid_rows=len(parts.get("valid", [])),
        )


def _text_chars(node: Any) -> int:
    if isinstance(node, str):
        return len(node)
    if isinstance(node, dict):
        return sum(_text_chars(v) for v in node.values())
    if isinstance(node, list):
        return sum(_text_chars(v) for v in node)
    return 0


def memory_bytes() -> int:
    """Memory one job may use: $MLXU_MEMORY_GB, else the GPU working set, else RAM."""
    if raw := os.environ.get("MLXU_MEMORY_GB", "").strip():
        return int(float(raw) * (1 << 30))
    try:
        import mlx.core as mx

        if mx.default_device().type == mx.DeviceType.gpu:
            info = mx.device_info()
            got = info.get("max_recommended_working_set_size") or info.get("memory_size")
            if got:
                return int(got)
    except Exception:  # noqa: BLE001 - no usable MLX here: fall back to RAM
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def from_settings(settings: Settings) -> Environment:
    return Environment(
        model_info=ModelFacts(settings),
        dataset_info=DatasetFacts(settings),
        memory_bytes=memory_bytes(),
    )
