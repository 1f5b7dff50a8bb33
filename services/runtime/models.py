"""Models: resolve a reference to an mlx-lm directory, load, quantize, count parameters.

A model reference is a registered name (built or converted once under ``home/models``), a
path confined to the allowed roots, or a Hugging Face id that mlx-lm downloads where a
network exists. The registered models and their atomic, stamped builds live in
model_build.py; the names other modules use from there stay importable from here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from services.runtime.errors import InvalidArgument, shown
from services.runtime.model_build import (
    _REGISTRY,
    CHATML_TEMPLATE,
    DEFAULT_MODEL,
    _ensure_registered,
    build_tiny_model,
)
from services.runtime.paths import (
    check_text,
    confine,
    confine_tree,
    looks_like_path,
    process_roots,
)

__all__ = [
    "CHATML_TEMPLATE",
    "DEFAULT_MODEL",
    "build_tiny_model",
    "compute_dtype",
    "confine_local",
    "load_model",
    "model_config",
    "model_family_config",
    "param_count",
    "quantize",
    "resolve_model",
]

# ---------------------------------------------------------------- resolution
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _hub_id_ok(ref: str) -> bool:
    """The hub's own rules for a repo id (characters, length, no '--' or '..')."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not _HUB_ID.fullmatch(ref):
        return False
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


def _hub_cached(ref: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(ref, "config.json"), str)
    except Exception:  # noqa: BLE001 - a cache we cannot read holds nothing usable
        return False


def resolve_model(
    ref: str, home: Path, roots: tuple[Path, ...], field: str = "model", *, offline: bool = False
) -> str:
    """A model reference -> what ``load_model`` takes (a local directory or a hub id).

    A local directory is confined to ``roots`` by its real path and by the real path of
    every file in it. A hub id must follow the hub's rules; ``offline``, it must also be in
    the local hub cache already (else a job would be created only to fail on the network)."""
    ref = (ref or "").strip()
    if not ref:
        raise InvalidArgument.one(field, "is required")
    check_text(ref, field)
    if ref.lower() in _REGISTRY:
        return str(_ensure_registered(ref.lower(), home))
    if looks_like_path(ref):
        path = confine(ref, roots, field)
        if not path.exists():
            raise InvalidArgument.one(field, f"{shown(ref)} does not exist")
        if path.is_dir():
            confine_tree(path, roots, field, raw=ref)
        if not (path / "config.json").is_file():
            raise InvalidArgument.one(
                field, f"{shown(ref)} is not an mlx-lm model directory (no config.json)"
            )
        return str(path)
    if _hub_id_ok(ref):
        if offline and not _hub_cached(ref):
            raise InvalidArgument.one(
                field,
                f"unknown model {shown(ref)}: not a registered name, not a directory, and "
                "not in the local hub cache (this service is offline: MLXU_OFFLINE)",
            )
        return ref  # a Hugging Face id: mlx-lm downloads it where a network exists
    names = ", ".join(_REGISTRY)
    raise InvalidArgument.one(
        field,
        f"unknown model {shown(ref)}: use a registered name ({names}), a model directory, "
        "or a Hugging Face id like 'org/name'",
    )


# ---------------------------------------------------------------- loading and quantizing
def confine_local(
    path: str | Path, adapter_path: str | None, roots: tuple[Path, ...] | None, field: str
) -> None:
    """Just before mlx-lm opens them: a local model / adapter directory and every file in it
    must resolve inside ``roots`` (default: the roots this process was started with; none
    configured means no check). A hub id is not a local path and is left to mlx-lm."""
    roots = roots if roots is not None else process_roots()
    if roots is None:
        return
    for raw, what in ((str(path), field), (adapter_path or "", f"{field}.adapter_path")):
        if raw and (looks_like_path(raw) or Path(raw).is_dir()):
            real = confine(raw, roots, what)
            if real.is_dir():
                confine_tree(real, roots, what, raw=raw)


def compute_dtype() -> str:
    """bf16 on a GPU (Metal/CUDA); fp32 on the CPU, where bf16 is far slower."""
    return "bfloat16" if mx.default_device().type == mx.DeviceType.gpu else "float32"


def _float_dtype(name: str, field: str) -> mx.Dtype:
    dt = getattr(mx, name, None) if name in ("float32", "float16", "bfloat16") else None
    if dt is None:
        raise InvalidArgument.one(field, f"dtype {name!r} must be float32, float16 or bfloat16")
    return dt


def load_model(
    path: str,
    adapter_path: str | None = None,
    dtype: str = "float32",
    lazy: bool = False,
    *,
    field: str = "model",
    roots: tuple[Path, ...] | None = None,
) -> tuple[nn.Module, Any]:
    """mlx-lm's load (base + optional adapters), then floating-point parameters cast to
    ``dtype``; packed quantized weights stay as they are. Local directories are confined
    first (``roots``, default the process's: see confine_local)."""
    from mlx_lm.utils import load

    dt = _float_dtype(dtype, f"{field}.dtype")
    confine_local(path, adapter_path, roots, field)
    try:
        model, tokenizer = load(str(path), adapter_path=adapter_path, lazy=lazy)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any load failure is an answer about this input
        what = f"model {path!r}" + (f" with adapters {adapter_path!r}" if adapter_path else "")
        raise InvalidArgument.one(field, f"cannot load {what}: {exc}") from exc
    model.set_dtype(dt)
    if not lazy:
        mx.eval(model.parameters())
    return model, tokenizer


def quantize(
    model: nn.Module, bits: int = 4, group_size: int = 64, *, field: str = "quantization"
) -> dict[str, Any]:
    """Quantize linear and embedding layers in place (affine). Returns the ``quantization``
    entry for config.json (``mlx_lm.utils.save_config`` mirrors it to quantization_config)."""
    if bits not in (2, 3, 4, 5, 6, 8):
        raise InvalidArgument.one(f"{field}.bits", f"must be 2, 3, 4, 5, 6 or 8 (got {bits})")
    if group_size not in (32, 64, 128):
        raise InvalidArgument.one(
            f"{field}.group_size", f"must be 32, 64 or 128 (got {group_size})"
        )

    def eligible(_path: str, module: nn.Module) -> bool:
        # Layers whose input width the group size does not divide stay in full precision;
        # mlx-lm's loader sees no .scales for them and leaves them unquantized too.
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size, bits, class_predicate=eligible)
    return {"group_size": group_size, "bits": bits, "mode": "affine"}


def model_config(path: str | Path) -> dict[str, Any]:
    """The config.json of a local model directory."""
    from mlx_lm.utils import load_config

    return load_config(Path(path))


model_family_config = model_config  # name used in docs/internal/HELPERS.md


def param_count(model: nn.Module, trainable: bool = False) -> int:
    """Number of parameters, counting quantized weights at their unpacked size (tied
    embeddings once). With ``trainable``, only what the optimizer would update."""
    if trainable:
        return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding):
            total += m.weight.size * 32 // m.bits - m.weight.size - m.scales.size
            total -= m.biases.size if m.get("biases") is not None else 0
    return total
