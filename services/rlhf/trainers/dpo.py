"""DPO and its family (IPO, hinge, robust) on preference pairs, through the shared loop.

``run(config, ctx)`` takes a resolved DPOSpec dict::

    {"policy": {"model": "/path", "adapter_path": ""}, "reference": {"model": ...},
     "dataset": {"path": "prefs.jsonl"}, "method": "lora", "lora": {...},
     "optimizer": {...}, "loop": {...}, "loss": "sigmoid", "beta": 0.1,
     "label_smoothing": 0.0, "precompute_reference": true}

Defaults follow TRL 1.16's DPOConfig: beta 0.1, the sigmoid loss, label_smoothing 0 (robust
loss only), learning rate 1e-6 for full training; adapters 1e-5 (TRL's own LoRA example
scales its full-training rate by 10).

The reference is ``reference`` when given, else the policy's *starting* checkpoint (base +
its starting adapter), never silently the bare base. With ``precompute_reference`` (default)
its log-probs of every pair are computed once, before training, and cached in
``<output_dir>/reference_logps.safetensors`` under a fingerprint of the reference and the
tokenized data, so a resumed attempt reuses them and the reference never occupies memory
during training. Otherwise the reference stays loaded and scores each batch as it comes.

    uv run python -m services.rlhf.trainers.dpo config.json /tmp/dpo-out
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from services.rlhf.trainers import (
    load_policy,
    load_reference,
    run_cli,
    write_policy,
)
from services.rlhf.trainers.losses import aux, dpo_loss, token_logps
from services.runtime import checkpoints, datasets, linear_ce
from services.runtime.contract import CheckpointInfo, JobContext
from services.runtime.errors import InvalidArgument
from services.runtime.loop import (
    Artifact,
    train,
)
from services.runtime.phases import Phase, duration
from services.schema.preference import DPOConfig

CACHE_FILE = "reference_logps.safetensors"


# ---- log-probs ----


def sequence_logps(model: nn.Module, batch: dict[str, mx.array]) -> tuple[mx.array, mx.array]:
    """Summed log-probs of each row's answer tokens and their count, both ``[rows]``."""
    nll = linear_ce.masked_nll_rows(model, batch, lambda lg, t: -token_logps(lg, t))
    return -nll, batch["loss_mask"].sum(axis=1)


def _digest(tokens: np.ndarray) -> bytes:
    return hashlib.blake2b(
        np.ascontiguousarray(tokens, np.int32).tobytes(), digest_size=16
    ).digest()


def _row_keys(batch: dict[str, Any]) -> list[bytes | None]:
    """A content key per row (a digest of its real tokens); None for rows padding a batch."""
    inputs = np.array(batch["inputs"])
    lengths = np.array(batch["lengths"])
    return [_digest(inputs[r, :n]) if n > 0 else None for r, n in enumerate(lengths.tolist())]


def _pair_key(seq: datasets.Tokenized, max_seq_length: int) -> bytes:
    return np.asarray(seq.tokens[:max_seq_length], np.int32).tobytes()


class ReferenceLogps:
    """Reference log-probs of answers, looked up by a digest of the answer's tokens."""

    def __init__(self, table: dict[bytes, float]) -> None:
        self.table = table

    def for_batch(self, batch: dict[str, Any]) -> mx.array:
        return mx.array([self.table[k] if k else 0.0 for k in _row_keys(batch)], mx.float32)


def _fingerprint(ref: dict, dtype: str, data: datasets.PreparedData) -> str:
    h = hashlib.sha256(json.dumps({**ref, "dtype": dtype, "msl": data.max_seq_length}).encode())
    for pair in (*data.train, *data.valid):
        for seq in (pair.chosen, pair.rejected):
            h.update(_pair_key(seq, data.max_seq_length))
            h.update(b"|")
    return h.hexdigest()


def _score_all(
    reference: nn.Module, data: datasets.PreparedData, batch_size: int, phase: Phase | None = None
) -> dict:
    table: dict[bytes, float] = {}
    for split in ("train", "valid"):
        if not getattr(data, split):
            continue
        for batch in data.batches(split, batch_size, seed=0, shuffle=False):
            arrays = {k: v for k, v in batch.items() if isinstance(v, mx.array)}
            logps, _ = sequence_logps(reference, arrays)
            keys = _row_keys(batch)
            for key, lp in zip(keys, logps.tolist(), strict=True):
                if key is not None:
                    table[key] = lp
            if phase is not None:
                phase.advance(sum(k is not None for k in keys))
    return table


def precompute(
    path: Path,
    reference: nn.Module,
    data: datasets.PreparedData,
    fingerprint: str,
    bs: int,
    phase: Phase | None = None,
) -> ReferenceLogps:
    """Score every answer once with the reference (``phase`` counts the answers); write the
    cache atomically."""
    table = _score_all(reference, data, bs, phase)
    keys = list(table)
    arrays = {
        "logps": mx.array(np.asarray([table[k] for k in keys], np.float32)),
        "keys": mx.array(np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), 16)),
    }
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    mx.save_safetensors(str(tmp), arrays, metadata={"fingerprint": fingerprint})
    os.replace(tmp, path)
    return ReferenceLogps(table)


def load_cache(path: Path, fingerprint: str) -> ReferenceLogps | None:
    """The cached reference log-probs, if ``path`` holds them for this very fingerprint."""
    if not path.is_file():
        return None
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception:  # noqa: BLE001 - a damaged cache is recomputed
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    keys = np.array(arrays["keys"])
    logps = np.array(arrays["logps"]).tolist()
    return ReferenceLogps({k.tobytes(): lp for k, lp in zip(keys, logps, strict=True)})


class WithReference:
    """Preference batches plus ``ref_logps [2b]``, from the cache or a live reference."""

    def __init__(self, inner, cache: ReferenceLogps | None, reference: nn.Module | None):
        self.inner, self.cache, self.reference = inner, cache, reference

    steps_per_epoch = property(lambda self: self.inner.steps_per_epoch)
    epoch = property(lambda self: self.inner.epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def state(self) -> dict:
        return self.inner.state()

    def restore(self, state: dict) -> None:
        self.inner.restore(state)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.inner:
            if self.cache is not None:
                batch["ref_logps"] = self.cache.for_batch(batch)
            else:
                arrays = {k: v for k, v in batch.items() if isinstance(v, mx.array)}
                logps, _ = sequence_logps(self.reference, arrays)
                batch["ref_logps"] = mx.stop_gradient(logps)
                mx.eval(batch["ref_logps"])
            yield batch


# ---- loss ----


def make_loss(loss_type: str, beta: float, label_smoothing: float):
    def loss_fn(model: nn.Module, batch: dict[str, mx.array]):
        logps, ntok = sequence_logps(model, batch)
        ref = batch["ref_logps"]
        if loss_type == "ipo":  # IPO compares mean per-token log-probs
            denom = mx.maximum(ntok, 1.0)
            logps, ref = logps / denom, ref / denom
        b = logps.shape[0] // 2
        losses, r_c, r_r = dpo_loss(
            logps[:b],
            logps[b:],
            ref[:b],
            ref[b:],
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
        )
        real = (batch["lengths"][:b] > 0).astype(mx.float32)
        n = real.sum()
        denom = mx.maximum(n, 1.0)

        def mean(x):
            return (x * real).sum() / denom

        metrics = {
            "rewards_chosen": mean(r_c),
            "rewards_rejected": mean(r_r),
            "accuracies": mean((r_c > r_r).astype(mx.float32)),
            "margins": mean(r_c - r_r),
            "logps_chosen": mean(mx.stop_gradient(logps[:b])),
            "logps_rejected": mean(mx.stop_gradient(logps[b:])),
            "tokens": batch["lengths"].sum().astype(mx.float32),  # both answers of every pair
        }
        return mean(losses), aux(n), {k: aux(v) for k, v in metrics.items()}

    return loss_fn


# ---- the trainer ----


def run(config: dict, ctx: JobContext) -> CheckpointInfo:
    cfg = DPOConfig.rehydrate(config)
    loop, opt = cfg.loop, cfg.optimizer
    world = mx.distributed.init()
    mx.random.seed(loop.seed)

    policy = load_policy(cfg.policy, cfg.method, cfg.lora, loop.dtype)
    data = datasets.prepare(
        cfg.dataset.to_dict(),
        policy.tokenizer,
        allowed_formats=("preference",),
        max_seq_length=loop.max_seq_length,
        mask_prompt=True,
        seed=loop.seed,
    )
    ctx.log(f"dpo ({cfg.loss}): {data.stats.rows} training pairs, {data.stats.valid_rows} held out")

    ref_cfg, cache, live_ref = _reference(cfg, policy, data, ctx)

    dp = {"rank": world.rank(), "world_size": world.size()}
    train_batches = WithReference(
        data.batches("train", loop.micro_batch_size, seed=loop.seed, **dp), cache, live_ref
    )
    valid_batches = None
    if data.valid and loop.steps_per_eval != -1:
        limit = None if loop.val_batches < 0 else loop.val_batches
        inner = data.batches(
            "valid", loop.micro_batch_size, seed=loop.seed, shuffle=False, limit=limit, **dp
        )
        valid_batches = WithReference(inner, cache, live_ref)

    resolved = {"trainer": "dpo", **cfg.to_dict(), "resolved_reference": ref_cfg}
    artifact = Artifact(
        kind=policy.kind,
        write=lambda dst: write_policy(dst, policy),
        base_model=policy.base,
        config=resolved,
    )
    loss_fn = make_loss(cfg.loss, cfg.beta, cfg.label_smoothing)
    result = train(policy.model, loss_fn, train_batches, valid_batches, loop, opt, ctx, artifact)

    # The loop's last validation left val_loss, val_accuracies and val_margins in here.
    metrics = dict(result.metrics)
    if result.checkpoint is None:  # a non-main rank of a data-parallel job
        return CheckpointInfo(Path(ctx.output_dir) / checkpoints.FINAL, policy.kind, result.step)
    final = checkpoints.publish(result.checkpoint.path, Path(ctx.output_dir), metrics)
    ctx.checkpoint_written(final)
    return final


def _reference(cfg: DPOConfig, policy, data, ctx: JobContext):
    """(resolved reference ref, cache or None, live reference model or None)."""
    ref_settings = cfg.reference or cfg.policy
    ref_cfg = {"model": ref_settings.model, "adapter_path": ref_settings.adapter_path}
    path = Path(ctx.output_dir) / CACHE_FILE
    fingerprint = _fingerprint(ref_cfg, cfg.loop.dtype, data)
    if cfg.precompute_reference:
        cache = load_cache(path, fingerprint)
        if cache is not None:
            ctx.log(f"reference log-probs: reusing {path}")
            return ref_cfg, cache, None
    reference, ref_cfg = load_reference(cfg.reference, cfg.policy, cfg.loop.dtype)
    if reference.args.vocab_size != policy.model.args.vocab_size:
        raise InvalidArgument.one(
            "spec.reference.model",
            f"vocabulary size {reference.args.vocab_size} differs from the policy's "
            f"({policy.model.args.vocab_size}): the reference must share its tokenizer",
        )
    if not cfg.precompute_reference:
        return ref_cfg, None, reference
    Path(ctx.output_dir).mkdir(parents=True, exist_ok=True)
    # Every rank of a data-parallel job scores and writes the same numbers (atomic rename).
    answers = 2 * (len(data.train) + len(data.valid))
    phase = Phase(ctx.log, "scoring reference log-probs", answers, "answers")
    cache = precompute(path, reference, data, fingerprint, cfg.loop.micro_batch_size, phase)
    ctx.log(
        f"reference log-probs: {len(cache.table)} answers scored in {duration(phase.elapsed)}, "
        f"cached in {path}"
    )
    del reference
    gc.collect()
    mx.clear_cache()
    return ref_cfg, cache, None


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, sys.argv[1:] if argv is None else argv, __name__)


if __name__ == "__main__":
    raise SystemExit(main())
