"""Supervised fine-tuning: full, LoRA, DoRA and QLoRA on text / chat / completion data.

``run(config, ctx)`` is the trainer the training service's worker calls; ``config`` is the
resolved SFTSpec as a dict (``SFTConfig.from_dict`` fills every default and rejects unknown
keys). It loads the model, tokenizes the data (services.runtime.datasets), makes the chosen
parameters trainable (services.runtime.adapters), trains with the shared loop
(services.runtime.loop) and publishes ``<output_dir>/final``: an adapter dir that
``mlx_lm.load(base, adapter_path=...)`` opens, or a full mlx-lm model dir.

Run it directly (benchmarks do the same through ``run``)::

    uv run python -m services.training.trainers.sft config.json /tmp/sft-out

where config.json is e.g. ``{"model": {"model": "/path/to/mlx-model"}, "dataset":
{"path": "data/train.jsonl"}, "method": "lora", "loop": {"max_steps": 100}}``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from services.runtime import adapters, checkpoints, datasets, linear_ce, models
from services.runtime.contract import CheckpointInfo, JobContext
from services.runtime.loop import (
    Artifact,
    train,
)
from services.schema.training import SFTConfig

FORMATS = ("text", "chat", "completion")
# Sort each epoch's rows by length before batching (as mlx-lm does): far less padding.
SORT_CHUNK = 1 << 30


# ---- loss ----


# float16 / bfloat16 logits: per-token logsumexp exact in float32 (True) or accumulated in
# float32 and rounded to the logits' dtype (False, as mlx-lm). Exact needs a float32 copy of a
# block of logits alive at the activation peak: measured on an H200 (135M llama, 49k vocab,
# 8 x 1024 tokens, LoRA) it cost ~1.5 GB (+20%) and ~10% step time; the rounded value is what
# mlx-lm trains with. Masking, sums and the mean are float32 either way.
EXACT_HALF_LOGSUMEXP = False
# Rows of logits upcast at a time by the exact path.
CE_CHUNK_ELEMENTS = 1 << 26


def _logsumexp_f32(logits: mx.array) -> mx.array:
    if logits.dtype == mx.float32 or not EXACT_HALF_LOGSUMEXP:
        return mx.logsumexp(logits, axis=-1).astype(mx.float32)
    flat = logits.reshape(-1, logits.shape[-1])
    rows = max(1, CE_CHUNK_ELEMENTS // logits.shape[-1])
    blocks = [
        mx.logsumexp(flat[s : s + rows].astype(mx.float32), axis=-1)
        for s in range(0, flat.shape[0], rows)
    ]
    return mx.concatenate(blocks).reshape(logits.shape[:-1])


@mx.custom_function
def _cross_entropy(logits: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    lse = _logsumexp_f32(logits)
    target = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - target.astype(mx.float32), lse


@_cross_entropy.vjp
def _cross_entropy_vjp(primals, cotangents, outputs):
    # softmax(logits) = exp(logits - hi) * exp(hi - lse) with hi = lse rounded to the logits'
    # dtype: the per-token factor carries what the rounding lost, so the [tokens, vocab] part
    # runs in the logits' dtype (bf16 on GPU: no fp32 copy of the logits in the backward).
    logits, targets = primals
    d_ce, d_lse = cotangents
    lse = outputs[1]
    dt = logits.dtype
    hi = lse.astype(dt)
    scale = (mx.exp(hi.astype(mx.float32) - lse) * (d_ce + d_lse)).astype(dt)
    onehot = mx.arange(logits.shape[-1]) == targets[..., None]
    grad = mx.exp(logits - hi[..., None]) * scale[..., None] - onehot * d_ce.astype(dt)[..., None]
    return grad, mx.zeros_like(targets)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-token cross entropy as float32 (see EXACT_HALF_LOGSUMEXP for half logits). Its
    backward pass is one elementwise chain in the logits' dtype (no fp32 [tokens, vocab])."""
    return _cross_entropy(logits, targets)[0]


def loss_fn(model: nn.Module, batch: dict[str, mx.array]):
    """Masked next-token cross entropy (fp32), mean over the tokens that count."""
    mask = batch["loss_mask"]
    ntoks = mask.sum()
    total = linear_ce.masked_nll_rows(model, batch, cross_entropy).sum()
    return total / mx.maximum(ntoks, 1.0), ntoks, {}


# ---- model files ----


def source_dir(model: str) -> Path | None:
    p = Path(model)
    if p.is_dir():
        return p
    try:  # a hub id: mlx-lm's local snapshot
        from mlx_lm.utils import _download

        return Path(_download(model))
    except Exception:  # noqa: BLE001 - no snapshot: tokenizer files come from the tokenizer
        return None


def save_full(dst: Path, model: nn.Module, tokenizer: Any, config: dict, source: Path | None):
    """A full mlx-lm model dir: weights, config.json, tokenizer files."""
    from mlx_lm.utils import save_config, save_model

    save_model(dst, model, donate_model=False)
    save_config(dict(config), dst / "config.json")
    tokenizer.save_pretrained(str(dst))
    if source is not None and (source / "generation_config.json").is_file():
        shutil.copy(source / "generation_config.json", dst)


# ---- the trainer ----


def run(config: dict, ctx: JobContext) -> CheckpointInfo:
    cfg = SFTConfig.rehydrate(config)
    loop, opt = cfg.loop, cfg.optimizer
    world = mx.distributed.init()
    mx.random.seed(loop.seed)

    base = cfg.model.model
    init_adapter = cfg.model.adapter_path or None
    if cfg.method == "full" and init_adapter:
        # Continue from base + adapter: fuse it, then train every weight.
        model, tokenizer = models.load_model(
            base, init_adapter, dtype=loop.dtype, field="spec.model"
        )
        adapters.fuse(model)
        init_adapter = None
    else:
        model, tokenizer = models.load_model(base, dtype=loop.dtype, field="spec.model")
    adapter_config = adapters.apply(
        model, cfg.method, cfg.lora, cfg.quantization, base_model=base, init_adapter=init_adapter
    )
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    ctx.log(f"{cfg.method}: {trainable / 1e6:.3f}M trainable parameters")

    data = datasets.prepare(
        cfg.dataset.to_dict(),
        tokenizer,
        allowed_formats=FORMATS,
        max_seq_length=loop.max_seq_length,
        mask_prompt=loop.mask_prompt,
        seed=loop.seed,
    )
    ctx.log(f"data: {data.format}, {json.dumps(data.stats.as_dict())}")
    dp = {"rank": world.rank(), "world_size": world.size(), "sort_chunk": SORT_CHUNK}
    train_batches = data.batches("train", loop.micro_batch_size, seed=loop.seed, **dp)
    valid_batches = None
    if data.valid and loop.steps_per_eval != -1:
        limit = None if loop.val_batches < 0 else loop.val_batches
        valid_batches = data.batches(
            "valid", loop.micro_batch_size, seed=loop.seed, shuffle=False, limit=limit, **dp
        )

    if adapter_config is not None:
        kind = "adapter"

        def write(dst: Path) -> None:
            adapters.save_adapter(dst, model, adapter_config)

    else:
        kind = "full"
        source = source_dir(base)
        model_cfg = models.model_config(source) if source is not None else {}

        def write(dst: Path) -> None:
            save_full(dst, model, tokenizer, model_cfg, source)

    resolved = cfg.to_dict()
    artifact = Artifact(kind=kind, write=write, base_model=base, config=resolved)
    result = train(
        model, loss_fn, train_batches, valid_batches, loop, opt, ctx, artifact, perplexity=True
    )

    metrics = dict(result.metrics)
    metrics["train_rows"] = float(data.stats.rows)
    if result.checkpoint is None:  # a non-main rank of a data-parallel job
        return CheckpointInfo(Path(ctx.output_dir) / checkpoints.FINAL, kind, result.step, base)
    final = checkpoints.publish(result.checkpoint.path, Path(ctx.output_dir), metrics)
    ctx.checkpoint_written(final)
    return final


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m services.training.trainers.sft CONFIG.json OUTPUT_DIR")
        return 2
    from services.runtime.contract import Report

    def report(r: Report) -> None:
        shown = {k: round(v, 4) for k, v in sorted(r.metrics.items())}
        print(f"step {r.step}/{r.total_steps} {shown}", flush=True)

    ctx = JobContext(job_id="local", output_dir=Path(args[1]), report=report, log=print)
    ctx.resume_from = checkpoints.latest(ctx.output_dir)
    info = run(json.loads(Path(args[0]).read_text()), ctx)
    print(f"final: {info.path} {info.metrics}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
