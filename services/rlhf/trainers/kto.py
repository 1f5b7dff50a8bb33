"""KTO (Ethayarajh et al. 2024) on unpaired preference rows, through the shared loop.

``run(config, ctx)`` takes a resolved KTO spec dict: ``policy``, ``reference``, ``dataset``,
``method``, ``lora``, ``optimizer``, ``loop`` as DPO's, plus ``loss_type`` ("kto"),
``beta`` (0.1), ``desirable_weight`` / ``undesirable_weight`` (1.0), ``precompute_reference``.
Rows: ``{"prompt", "completion", "label": bool}`` (strings or messages); preference rows are
unpaired as TRL does (chosen -> true, rejected -> false).

The loss is TRL 1.16 KTOTrainer's: with ``r = log pi(y|x) - log ref(y|x)`` summed over the
completion, a desirable row costs ``1 - s(beta (r - z))``, an undesirable one
``1 - s(beta (z - r))``, times its weight, averaged over the micro-batch's rows. ``z``
estimates KL(pi || ref): the batch mean of ``r`` over mismatched pairs (row k's prompt, the
previous row's completion; see datasets.UnpairedBatches), without gradient, averaged over
ranks, clamped at 0. "apo_zero_unpaired" is ``1 - s(beta r)`` / ``s(beta r)``, no ``z``.
Defaults are TRL's KTOConfig (learning rate 1e-6 full, 1e-5 adapters as our DPO). TRL must
train in dataset order since it pairs KL rows once, over consecutive rows; ours pairs them
within each batch as drawn, so batches are shuffled like every other trainer's.

The reference is ``reference`` or the policy's starting checkpoint. With
``precompute_reference`` (default, as our DPO; TRL's is off) every row and KL row of the
run's batch schedule is scored before training and cached in ``<output_dir>/``
``reference_logps.safetensors`` under a fingerprint (a resumed attempt reuses it).

    uv run python -m services.rlhf.trainers.kto config.json /tmp/kto-out
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from services.rlhf.trainers import (
    dpo,
    load_policy,
    load_reference,
    run_cli,
    write_policy,
)
from services.rlhf.trainers.dpo import CACHE_FILE, load_cache, sequence_logps
from services.rlhf.trainers.losses import aux
from services.runtime import checkpoints, datasets
from services.runtime.contract import CheckpointInfo, JobContext
from services.runtime.errors import InvalidArgument
from services.runtime.loop import (
    Artifact,
    LoopSettings,
    total_steps,
    train,
)
from services.runtime.phases import Phase, duration
from services.schema.preference import KTO_FORMATS as FORMATS
from services.schema.preference import KTO_LOSSES, KTOConfig

KL_KEYS = ("kl_inputs", "kl_targets", "kl_loss_mask", "kl_lengths")


# ---- the loss ----


def kto_loss(
    logps: mx.array,
    ref_logps: mx.array,
    labels: mx.array,
    kl: mx.array,
    *,
    beta: float,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[mx.array, mx.array]:
    """Per-row losses and implicit rewards ``beta r``, both ``[B]``, as TRL's ``_compute_loss``.

    ``logps`` / ``ref_logps`` are completion log-probs summed over tokens, ``labels`` 1 for a
    desirable row, ``kl`` the (detached, clamped) estimate ``z`` of :func:`kl_estimate`."""
    r = logps - ref_logps
    if loss_type == "kto":  # eq. (7) of the KTO paper
        chosen = 1 - mx.sigmoid(beta * (r - kl))
        rejected = 1 - mx.sigmoid(beta * (kl - r))
    elif loss_type == "apo_zero_unpaired":
        chosen = 1 - mx.sigmoid(beta * r)
        rejected = mx.sigmoid(beta * r)
    else:
        raise ValueError(f"unknown KTO loss {loss_type!r}; expected one of {KTO_LOSSES}")
    losses = mx.where(labels > 0, desirable_weight * chosen, undesirable_weight * rejected)
    return losses, beta * mx.stop_gradient(r)


def kl_estimate(
    kl_logps: mx.array, ref_kl_logps: mx.array, real: mx.array, world_size: int = 1
) -> mx.array:
    """TRL's ``z``: the mean log-ratio of the mismatched rows (``real`` marks them), without
    gradient, averaged over the ranks of a data-parallel job, clamped at 0."""
    n = mx.maximum(real.sum(), 1.0)
    kl = mx.stop_gradient(((kl_logps - ref_kl_logps) * real).sum() / n)
    if world_size > 1:
        kl = mx.distributed.all_sum(kl) / world_size
    return mx.maximum(kl, 0.0)


def kl_view(batch: dict) -> dict:
    """The KL rows of an unpaired batch under the names ``sequence_logps`` reads."""
    return {k.removeprefix("kl_"): batch[k] for k in KL_KEYS}


def make_loss(cfg: KTOConfig, world_size: int = 1):
    use_kl = cfg.loss_type == "kto"
    names = ("beta", "loss_type", "desirable_weight", "undesirable_weight")
    params = {k: getattr(cfg, k) for k in names}

    def loss_fn(model: nn.Module, batch: dict[str, mx.array]):
        logps, _ = sequence_logps(model, batch)
        real = (batch["lengths"] > 0).astype(mx.float32)
        kl = mx.array(0.0)
        tokens = batch["lengths"].sum().astype(mx.float32)
        if use_kl:
            view = kl_view(batch)
            kl_logps, _ = sequence_logps(model, view)
            tokens = tokens + view["lengths"].sum().astype(mx.float32)
            kl = kl_estimate(kl_logps, batch["ref_kl_logps"], real, world_size)
        labels = batch["label"]
        losses, rewards = kto_loss(logps, batch["ref_logps"], labels, kl, **params)
        n = real.sum()
        good, bad = labels * real, (1 - labels) * real

        def mean(x, m):
            return (x * m).sum() / mx.maximum(m.sum(), 1.0)

        r_c, r_r = mean(rewards, good), mean(rewards, bad)
        metrics = {
            "kl": kl,
            "rewards_chosen": r_c,
            "rewards_rejected": r_r,
            "margins": r_c - r_r,
            "logps_chosen": mean(mx.stop_gradient(logps), good),
            "logps_rejected": mean(mx.stop_gradient(logps), bad),
            "tokens": tokens,
        }
        return mean(losses, real), aux(n), {k: aux(v) for k, v in metrics.items()}

    return loss_fn


# ---- reference log-probs ----


def _row_keys(view: dict) -> list[bytes | None]:
    """A content key per row: its tokens and where its completion starts (a KL row can hold
    the tokens of another row split elsewhere); None for rows padding a batch."""
    inputs, lengths = np.array(view["inputs"]), np.array(view["lengths"])
    starts = np.array(view["loss_mask"]).argmax(axis=1).astype(np.int32)
    return [
        hashlib.blake2b(
            np.ascontiguousarray(inputs[r, :n], np.int32).tobytes() + starts[r].tobytes(),
            digest_size=16,
        ).digest()
        if n > 0
        else None
        for r, n in enumerate(lengths.tolist())
    ]


def _lookup(table: dict[bytes, float], view: dict) -> mx.array:
    return mx.array([table[k] if k else 0.0 for k in _row_keys(view)], mx.float32)


class WithReference(dpo.WithReference):
    """Unpaired batches plus ``ref_logps [b]`` and (for the KL estimate) ``ref_kl_logps
    [b]``, from the cache or a live reference. Without the KL the KL rows are dropped, so
    the compiled step neither sees nor retraces on them."""

    def __init__(self, inner, cache, reference, use_kl: bool) -> None:
        super().__init__(inner, cache, reference)
        self.use_kl = use_kl

    def __iter__(self) -> Iterator[dict]:
        for batch in self.inner:
            if not self.use_kl:
                for k in KL_KEYS:
                    batch.pop(k)
            views = {"ref_logps": batch}
            if self.use_kl:
                views["ref_kl_logps"] = kl_view(batch)
            for key, view in views.items():
                if self.cache is not None:
                    batch[key] = _lookup(self.cache.table, view)
                else:
                    batch[key] = mx.stop_gradient(sequence_logps(self.reference, view)[0])
            mx.eval([batch[k] for k in views])
            yield batch


def _schedule(data: datasets.PreparedData, loop: LoopSettings, use_kl: bool) -> Iterator[dict]:
    """Every batch the run will hand out: the training schedule from step 1 to the last (with
    the KL rows; their pairs depend on the draw) or one pass without, then one validation
    pass. Global micro-batches: every rank's slice is in them."""
    bs = loop.micro_batch_size
    if use_kl:
        batches = data.batches("train", bs, seed=loop.seed)
        it = iter(batches)
        for _ in range(total_steps(loop, batches) * loop.grad_accumulation_steps):
            yield next(it)
    else:
        yield from data.batches("train", bs, seed=loop.seed, shuffle=False)
    if data.valid:
        yield from data.batches("valid", bs, seed=loop.seed, shuffle=False)


def _schedule_len(data: datasets.PreparedData, loop: LoopSettings, use_kl: bool) -> int:
    """How many batches ``_schedule`` yields (for the scoring phase's progress)."""
    bs = loop.micro_batch_size
    train = data.batches("train", bs, seed=loop.seed, shuffle=use_kl)
    n = total_steps(loop, train) * loop.grad_accumulation_steps if use_kl else len(train)
    return n + (len(data.batches("valid", bs, seed=loop.seed, shuffle=False)) if data.valid else 0)


def _score_all(
    reference: nn.Module, batches, use_kl: bool, phase: Phase | None = None
) -> dict[bytes, float]:
    table: dict[bytes, float] = {}
    for batch in batches:
        if phase is not None:
            phase.advance()
        for view in [batch, kl_view(batch)] if use_kl else [batch]:
            keys = _row_keys(view)
            if all(k is None or k in table for k in keys):  # a later epoch's rows
                continue
            logps, _ = sequence_logps(reference, view)
            for key, lp in zip(keys, logps.tolist(), strict=True):
                if key is not None:
                    table[key] = lp
    return table


def _save_cache(path: Path, table: dict[bytes, float], fingerprint: str) -> None:
    keys = list(table)  # the layout dpo.load_cache reads
    arrays = {
        "logps": mx.array(np.asarray([table[k] for k in keys], np.float32)),
        "keys": mx.array(np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), 16)),
    }
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    mx.save_safetensors(str(tmp), arrays, metadata={"fingerprint": fingerprint})
    os.replace(tmp, path)


def _fingerprint(ref: dict, cfg: KTOConfig, data: datasets.PreparedData, use_kl: bool) -> str:
    loop = cfg.loop
    meta = {**ref, "dtype": loop.dtype, "msl": data.max_seq_length, "kl": use_kl}
    if use_kl:  # the schedule decides the KL rows
        meta.update(seed=loop.seed, batch=loop.batch_size, accum=loop.grad_accumulation_steps,
                    steps=loop.max_steps, epochs=loop.epochs)  # fmt: skip
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for item in (*data.train, *data.valid):
        h.update(np.asarray(item.seq.tokens[: item.seq.prompt_len], np.int32).tobytes())
        h.update(b"|" + np.asarray(item.completion, np.int32).tobytes() + b"|")
    return h.hexdigest()


def _reference(cfg: KTOConfig, policy, data, ctx: JobContext, use_kl: bool):
    """(resolved reference ref, cache or None, live reference model or None)."""
    ref_settings = cfg.reference or cfg.policy
    ref_cfg = {"model": ref_settings.model, "adapter_path": ref_settings.adapter_path}
    path = Path(ctx.output_dir) / CACHE_FILE
    fingerprint = _fingerprint(ref_cfg, cfg, data, use_kl)
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
    n = _schedule_len(data, cfg.loop, use_kl)
    phase = Phase(ctx.log, "scoring reference log-probs", n, "batches")
    table = _score_all(reference, _schedule(data, cfg.loop, use_kl), use_kl, phase)
    _save_cache(path, table, fingerprint)  # every rank writes the same numbers (rename)
    ctx.log(
        f"reference log-probs: {len(table)} sequences scored in {duration(phase.elapsed)}, "
        f"cached in {path}"
    )
    del reference
    gc.collect()
    mx.clear_cache()
    return ref_cfg, dpo.ReferenceLogps(table), None


# ---- the data ----


def balance_note(labels: list[bool], desirable: float, undesirable: float) -> str | None:
    """TRL's hint when the weights do not offset an imbalance (KTO paper, eq. 8)."""
    n_d = max(sum(labels), 1)
    n_u = max(len(labels) - n_d, 1)
    if n_d == n_u:
        return None
    d_lo, d_hi = round(n_u * undesirable / n_d, 2), round(n_u * undesirable / n_d * 1.33, 2)
    u_lo, u_hi = round(n_d * desirable / n_u / 1.33, 2), round(n_d * desirable / n_u, 2)
    if d_lo <= desirable <= d_hi or u_lo <= undesirable <= u_hi:
        return None
    return (
        f"{n_d} desirable vs {n_u} undesirable rows: consider desirable_weight in "
        f"[{d_lo}, {d_hi}] or undesirable_weight in [{u_lo}, {u_hi}] (not both)"
    )


# ---- the trainer ----


def run(config: dict, ctx: JobContext) -> CheckpointInfo:
    cfg = KTOConfig.rehydrate(config)
    loop, opt = cfg.loop, cfg.optimizer
    world = mx.distributed.init()
    mx.random.seed(loop.seed)

    policy = load_policy(cfg.policy, cfg.method, cfg.lora, loop.dtype)
    data = datasets.prepare(
        cfg.dataset.to_dict(),
        policy.tokenizer,
        allowed_formats=FORMATS,
        max_seq_length=loop.max_seq_length,
        mask_prompt=True,
        seed=loop.seed,
    )
    if data.format == "preference":
        data = datasets.unpair(data)
    labels = [it.label for it in data.train]
    ctx.log(
        f"kto ({cfg.loss_type}): {len(labels)} training rows ({sum(labels)} desirable), "
        f"{len(data.valid)} held out"
    )
    note = balance_note(labels, cfg.desirable_weight, cfg.undesirable_weight)
    if note:
        ctx.log(note)

    use_kl = cfg.loss_type == "kto"
    ref_cfg, cache, live_ref = _reference(cfg, policy, data, ctx, use_kl)
    dp = {"rank": world.rank(), "world_size": world.size()}
    train_batches = WithReference(
        data.batches("train", loop.micro_batch_size, seed=loop.seed, **dp), cache, live_ref, use_kl
    )
    valid_batches = None
    if data.valid and loop.steps_per_eval != -1:
        limit = None if loop.val_batches < 0 else loop.val_batches
        inner = data.batches(
            "valid", loop.micro_batch_size, seed=loop.seed, shuffle=False, limit=limit, **dp
        )
        valid_batches = WithReference(inner, cache, live_ref, use_kl)

    resolved = {"trainer": "kto", **cfg.to_dict(), "resolved_reference": ref_cfg}
    artifact = Artifact(
        kind=policy.kind,
        write=lambda dst: write_policy(dst, policy),
        base_model=policy.base,
        config=resolved,
    )
    loss_fn = make_loss(cfg, world.size())
    result = train(policy.model, loss_fn, train_batches, valid_batches, loop, opt, ctx, artifact)

    metrics = dict(result.metrics)  # the loop's last validation: val_loss, val_margins, ...
    if result.checkpoint is None:  # a non-main rank of a data-parallel job
        return CheckpointInfo(Path(ctx.output_dir) / checkpoints.FINAL, policy.kind, result.step)
    final = checkpoints.publish(result.checkpoint.path, Path(ctx.output_dir), metrics)
    ctx.checkpoint_written(final)
    return final


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, sys.argv[1:] if argv is None else argv, __name__)


if __name__ == "__main__":
    raise SystemExit(main())
