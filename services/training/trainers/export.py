"""Export jobs: fuse an adapter into its base, quantize, or dequantize a model.

``run(config, ctx)`` takes the resolved ExportSpec as a dict::

    {"model": {"model": base_or_model_dir, "adapter_path": adapter_dir},
     "mode": "fuse" | "quantize" | "dequantize", "quantization": {"bits", "group_size"}}

and writes a full mlx-lm model dir to ``<output_dir>/final`` (atomically, with a manifest).
The result is opened with ``mlx_lm.load`` and run on a few tokens before it is published.

- fuse: base + LoRA/DoRA adapter -> one model, as ``mlx_lm.fuse`` (a quantized base stays
  quantized). A QLoRA adapter is fused into the full-precision base it names.
- quantize: to ``bits`` / ``group_size`` (affine), recorded in config.json.
- dequantize: quantized layers back to full precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from services.runtime import adapters, checkpoints, models
from services.runtime.contract import CheckpointInfo, JobContext, Report
from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.schema.training import ExportConfig
from services.training.trainers.sft import save_full, source_dir

MODES = ("fuse", "quantize", "dequantize")


def _load(path: str, adapter_path: str | None) -> tuple[nn.Module, Any, dict]:
    from mlx_lm.utils import load

    # Files may have been swapped for symlinks since Start checked them: check again here.
    models.confine_local(path, adapter_path, None, "spec.model")
    try:
        # mlx-lm's own loader: the stored dtype is kept (no cast to a training dtype).
        return load(path, adapter_path=adapter_path, return_config=True)
    except Exception as exc:  # noqa: BLE001 - a load failure is an answer about the input
        what = f"model {path!r}" + (f" with adapter {adapter_path!r}" if adapter_path else "")
        raise InvalidArgument.one("spec.model", f"cannot load {what}: {exc}") from exc


def _check_loads(path: Path) -> None:
    """The written dir must open with mlx_lm.load and give finite logits."""
    from mlx_lm.utils import load

    model, tokenizer = load(str(path))
    ids = tokenizer.encode("Hello") or [0]
    logits = model(mx.array([ids]))
    if not bool(mx.all(mx.isfinite(logits)).item()):
        raise RuntimeError(f"exported model at {path} produces non-finite logits")


def run(config: dict, ctx: JobContext) -> CheckpointInfo:
    cfg = ExportConfig.rehydrate(config)
    src = cfg.model.model
    adapter = cfg.model.adapter_path or None
    if cfg.mode != "fuse" and adapter:
        ctx.log("the adapter is fused first, then the model is " + cfg.mode + "d")
    model, tokenizer, model_cfg = _load(src, adapter)
    metrics: dict[str, float] = {}

    if adapter:
        n = adapters.fuse(model)
        if n == 0:
            raise InvalidArgument.one("spec.model.adapter_path", "has no LoRA/DoRA layers to fuse")
        metrics["fused_layers"] = float(n)
    if cfg.mode == "quantize":
        if adapters.is_quantized(model):
            raise FailedPrecondition("the model is already quantized; dequantize it first")
        q = cfg.quantization
        model_cfg["quantization"] = models.quantize(
            model, q.bits, q.group_size, field="spec.quantization"
        )
    elif cfg.mode == "dequantize":
        from mlx_lm.utils import dequantize_model

        if not adapters.is_quantized(model):
            raise FailedPrecondition("the model is not quantized: nothing to dequantize")
        model = dequantize_model(model)
        model_cfg.pop("quantization", None)
        model_cfg.pop("quantization_config", None)
    mx.eval(model.parameters())
    metrics["parameters"] = float(models.param_count(model))
    source = source_dir(src)

    def write(tmp: Path) -> None:
        save_full(tmp, model, tokenizer, model_cfg, source)
        _check_loads(tmp)

    manifest = {
        "job_id": ctx.job_id,
        "kind": "full",
        "base_model": src,
        "adapter_path": adapter or "",
        "mode": cfg.mode,
        "config": cfg.to_dict(),
        "metrics": metrics,
    }
    info = checkpoints.save_final(Path(ctx.output_dir), write, manifest)
    ctx.report(Report(step=1, total_steps=1, metrics=metrics))
    ctx.checkpoint_written(info)
    return info
