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

import dataclasses
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from services.runtime import adapters, checkpoints, datasets, models
from services.runtime.adapters import LoraSettings, QuantizationSettings
from services.runtime.contract import CheckpointInfo, JobContext
from services.runtime.errors import Violations
from services.runtime.loop import (
    Artifact,
    DatasetSettings,
    LoopSettings,
    ModelSettings,
    ResourcesSettings,
    sub,
    train,
)
from services.runtime.optim import DictConfig, OptimizerSettings, zero_default

FORMATS = ("text", "chat", "completion")
# Sort each epoch's rows by length before batching (as mlx-lm does): far less padding.
SORT_CHUNK = 1 << 30
# Above this many logits per micro-batch the loss runs chunk by chunk over the sequence
# (recomputing each chunk's logits in the backward pass) so they never all live at once.
CHUNK_LOGITS = 1 << 28


@dataclass(frozen=True)
class SFTConfig(DictConfig):
    model: ModelSettings = sub(ModelSettings)
    dataset: DatasetSettings = sub(DatasetSettings)
    method: str = zero_default("lora")  # full | lora | dora | qlora
    lora: LoraSettings = sub(LoraSettings)
    quantization: QuantizationSettings = sub(QuantizationSettings)
    optimizer: OptimizerSettings = sub(OptimizerSettings)
    loop: LoopSettings = sub(LoopSettings)
    resources: ResourcesSettings = sub(ResourcesSettings)
    output_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict | None = None, *, prefix: str = "") -> SFTConfig:
        data = dict(data or {})
        # The default learning rate depends on the method: 1e-5 full, 1e-4 adapters.
        opt = dict(data.get("optimizer") or {})
        if not opt.get("learning_rate"):
            opt["learning_rate"] = 1e-5 if data.get("method") == "full" else 1e-4
        data["optimizer"] = opt
        return super().from_dict(data, prefix=prefix)

    def resolve(self) -> SFTConfig:
        return dataclasses.replace(self, method=self.method.lower())

    def validate(self, v: Violations, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        v.check(self.method in adapters.METHODS, f"{p}method", f"one of {adapters.METHODS}")
        v.check(bool(self.model.model), f"{p}model.model", "is required")
        v.check(bool(self.dataset.path), f"{p}dataset.path", "is required")
        v.check(
            self.dataset.format in ("", *FORMATS),
            f"{p}dataset.format",
            f"SFT takes {', '.join(FORMATS)} data",
        )


# ---- loss ----


@mx.custom_function
def _cross_entropy(logits: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    x = logits.astype(mx.float32)
    lse = mx.logsumexp(x, axis=-1)
    return lse - mx.take_along_axis(x, targets[..., None], axis=-1)[..., 0], lse


@_cross_entropy.vjp
def _cross_entropy_vjp(primals, cotangents, outputs):
    # softmax - onehot in fp32, written as one elementwise chain that mx.compile fuses:
    # no fp32 copy of the logits outlives the forward pass.
    logits, targets = primals
    d_ce, d_lse = cotangents
    p = mx.exp(logits.astype(mx.float32) - outputs[1][..., None])
    onehot = mx.arange(logits.shape[-1]) == targets[..., None]
    grad = p * (d_ce + d_lse)[..., None] - onehot * d_ce[..., None]
    return grad.astype(logits.dtype), mx.zeros_like(targets)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-token cross entropy computed in float32 whatever the logits' dtype."""
    return _cross_entropy(logits, targets)[0]


_HEAD_SPLIT = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def _head(model: nn.Module):
    """(body, head module, head fn) for families whose Model is ``head(model.model(x))``."""
    if getattr(model, "model_type", None) not in _HEAD_SPLIT or not hasattr(model, "model"):
        return None
    if getattr(model.args, "tie_word_embeddings", False):
        emb = model.model.embed_tokens
        return model.model, emb, emb.as_linear
    return model.model, model.lm_head, model.lm_head


def _chunked_sum(model: nn.Module, batch: dict[str, mx.array], split) -> mx.array:
    body, module, head = split
    h = body(batch["inputs"])
    B, L, _ = h.shape
    vocab = model.args.vocab_size
    n = min(L, math.ceil(B * L * vocab / CHUNK_LOGITS))
    size = math.ceil(L / n)

    def piece(params, hc, tc, mc):
        module.update(params)
        return (cross_entropy(head(hc), tc) * mc).sum()

    fn = mx.checkpoint(piece)
    params = module.trainable_parameters()
    total = mx.array(0.0)
    for s in range(0, L, size):
        e = s + size
        total = total + fn(params, h[:, s:e], batch["targets"][:, s:e], batch["loss_mask"][:, s:e])
    return total


def loss_fn(model: nn.Module, batch: dict[str, mx.array]):
    """Masked next-token cross entropy (fp32), mean over the tokens that count."""
    mask = batch["loss_mask"]
    ntoks = mask.sum()
    split = _head(model)
    B, L = batch["inputs"].shape
    if split is not None and B * L * model.args.vocab_size > CHUNK_LOGITS:
        total = _chunked_sum(model, batch, split)
    else:
        logits = model(batch["inputs"])
        total = (cross_entropy(logits, batch["targets"]) * mask).sum()
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
    cfg = SFTConfig.from_dict(config, prefix="spec")
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
    result = train(model, loss_fn, train_batches, valid_batches, loop, opt, ctx, artifact)

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
