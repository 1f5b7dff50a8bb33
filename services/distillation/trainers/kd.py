"""Knowledge distillation: ``run(config, ctx) -> CheckpointInfo`` (job name
``services.distillation.trainers.kd:run``).

loss = (1 - alpha) * CE + alpha * mean_t T_t^2 * D(teacher_T || student_T) + w_f * feature loss

Reads top to bottom: resolve the config, load teachers and the student (or build one from the
first teacher's layers), prepare the data, optionally precompute the teacher top-k cache, then
hand a loss and a batch stream to the shared loop (services.runtime.loop). The stream adds
what the loss needs to each batch (row mixture weights, the scheduled temperature, cached
teacher top-k) and swaps in student-generated completions for on-policy batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from services.distillation import validate as validation
from services.distillation.trainers import losses, student, teachers
from services.runtime import adapters, checkpoints, datasets, models
from services.runtime.contract import CheckpointInfo, JobContext
from services.runtime.data_batches import Batches
from services.runtime.errors import InvalidArgument
from services.runtime.loop import Artifact, LoopSettings, OptimizerSettings, total_steps, train

PROJ = student.PROJ
FORMATS = ("text", "chat", "completion")


class IndexedBatches(Batches):
    """Batches that also say which items they hold ("rows", -1 = padding row), so routing and
    the teacher cache can find each row's teacher data."""

    def _collate(self, global_idx: list[int]) -> dict[str, Any]:
        batch = super()._collate(global_idx)
        batch["rows"] = self._sched.local_slice(global_idx)
        return batch


@dataclasses.dataclass
class StreamParts:
    weights: np.ndarray  # [N] normalised mixture weights
    route: list[int] | None  # teacher index of every item when routing
    temperature: losses.Temperature
    total: int
    accum: int
    cache: teachers.TeacherCache | None = None
    vocab: int = 0
    top_k: int = 0
    teachers: list[teachers.Teacher] = dataclasses.field(default_factory=list)


class KDStream:
    """Wraps IndexedBatches: resumable (the loop saves state()), and counts micro-batches so the
    annealed temperature and the seeded on-policy coin flips continue exactly on resume."""

    def __init__(
        self,
        inner: IndexedBatches,
        parts: StreamParts,
        *,
        policy=None,
        seed: int = 0,
        step_of=None,
        rank: int = 0,
    ) -> None:
        self.inner, self.parts, self.policy, self.seed = inner, parts, policy, seed
        # Data parallel: each rank completes its own rows; the same coin flips on every rank
        # (all take on-policy steps together), a different sampling seed on each.
        self.rank = rank
        self.served = 0
        self.step_of = step_of  # valid stream: the train stream's step

    steps_per_epoch = property(lambda self: self.inner.steps_per_epoch)
    epoch = property(lambda self: self.inner.epoch)

    @property
    def step(self) -> int:
        return self.served // self.parts.accum

    def state(self) -> dict:
        return {"batches": self.inner.state(), "served": self.served}

    def restore(self, state: dict) -> None:
        self.inner.restore(state["batches"])
        self.served = int(state["served"])

    def __iter__(self) -> Iterator[dict]:
        for batch in self.inner:
            yield self.decorate(batch)

    def decorate(self, batch: dict) -> dict:
        p = self.parts
        rows = batch.pop("rows")
        step = self.step_of() if self.step_of else self.step
        counter, self.served = self.served, self.served + (0 if self.step_of else 1)
        fresh = False
        if self.policy is not None:
            coin = np.random.default_rng([self.seed % 2**63, counter]).random()
            if coin < self.policy.fraction:
                seed = self.seed * 1_000_003 + counter + self.rank * 0x9E3779B1
                batch = self.policy.replace(rows, seed=seed)
                fresh = True
        batch["teacher_weights"] = mx.array(teachers.row_weights(p.route, p.weights, rows))
        batch["temperature"] = mx.array(p.temperature.scheduled(step, p.total), mx.float32)
        if p.cache is not None:
            if fresh:  # new completions: the teachers score them now, in the cache's format
                idx, top, rest = teachers.combined_topk(
                    p.teachers, batch["teacher_weights"], batch["inputs"], p.vocab, p.top_k
                )
                batch.update(t_idx=mx.array(idx), t_top=mx.array(top), t_rest=mx.array(rest))
            else:
                batch.update(p.cache.lookup(rows, batch["inputs"].shape[1]))
        return batch


# --- the loss ----------------------------------------------------------------------------------


def make_loss_fn(
    c: validation.DistillConfig,
    ts: list[teachers.Teacher],
    vocab: int,
    pairs: list[tuple[int, int]],
    cached: bool,
    chunked: bool = True,
    blockwise: bool = True,
):
    """loss_fn(model, batch) -> (loss, tokens, metrics) for the shared loop. `blockwise`: the
    student has the llama layout (else its full logits feed the chunks; see student.forward)."""
    kd_cfg = losses.KDSettings(c.alpha, c.divergence, c.jsd_beta, c.temperature)
    s_cap, t_cap = [s for s, _ in pairs], [t for _, t in pairs]
    n = len(c.teachers)
    per_teacher = not (cached and n > 1 and not c.route_field)

    def loss_fn(model, batch):
        inputs, length = batch["inputs"], batch["inputs"].shape[1]
        s_h, s_feats = student.forward(model, inputs, s_cap, blockwise)
        t_hs, t_feats = [], {}
        if not cached:
            outs = [
                teachers.teacher_hidden(t, inputs, t_cap if i == 0 else ())
                for i, t in enumerate(ts)
            ]
            t_hs, t_feats = [o[0] for o in outs], outs[0][1]
        head = student.head_module(model) if blockwise else None

        seq_keys = ["targets", "loss_mask"] + (["t_idx", "t_top", "t_rest"] if cached else [])

        def chunk_sums(head_params, diff, seq, consts):
            (s_hc,) = diff
            t_hcs, x = seq[: len(t_hs)], dict(zip(seq_keys, seq[len(t_hs) :], strict=True))
            w, temp = consts
            if head_params:
                head.update(tree_unflatten(list(head_params.items())))
            s_logits = student.head(model, s_hc, blockwise)
            if cached:
                terms = losses.cached_token_terms(
                    s_logits, x["t_idx"], x["t_top"], x["t_rest"], x["targets"], temp, kd_cfg, vocab
                )
            else:
                t_logits = [
                    teachers.head_logits(t, mx.stop_gradient(h), vocab)
                    for t, h in zip(ts, t_hcs, strict=True)
                ]
                terms = losses.token_terms(s_logits, t_logits, w, x["targets"], temp, kd_cfg)
            return losses.masked_sums(terms, x["loss_mask"], w)

        params = dict(tree_flatten(head.trainable_parameters())) if head is not None else {}
        seq = [*t_hs, *(batch[k] for k in seq_keys)]
        consts = [batch["teacher_weights"], batch["temperature"]]
        if chunked:
            total = losses.chunked_sum(chunk_sums, params, [s_h], seq, consts, length, c.chunk_size)
        else:
            total = chunk_sums(params, [s_h], seq, consts)
        ntok = total["tokens"]
        denom = mx.maximum(ntok, 1.0)
        ce, kd = total["ce"] / denom, total["kd"] / denom
        feat = mx.array(0.0)
        for k, (si, ti) in enumerate(pairs):
            d = losses.feature_distance(model[PROJ](k, s_feats[si]), t_feats[ti], c.features.loss)
            feat = feat + mx.sum(d * batch["loss_mask"]) / denom / len(pairs)
        loss = (1 - c.alpha) * ce + c.alpha * kd + c.features.weight * feat
        metrics = {
            "ce_loss": ce,
            "kd_loss": kd,
            "feature_loss": feat,
            "temperature": total["temperature"] / denom,
        }
        if per_teacher:
            # Token-weighted sums the loop can average over steps; `finish_metrics` divides.
            for i in range(n):
                metrics[f"kd_teacher_{i}"] = total["kd_teachers"][i] / denom
                metrics[f"kd_teacher_{i}_tokens"] = total["teacher_tokens"][i] / denom
        return loss, ntok, metrics

    return loss_fn


def finish_metrics(m: dict[str, float], n: int) -> dict[str, float]:
    """Reported metrics: `loss` (= train_loss); `temperature` (the schedule's value, not a
    batch mean); and, for the training batches (train_) and the validation set (val_),
    kd_teacher_i as the mean over the tokens that teacher i scored (absent when it scored
    none, e.g. no routed rows), kd_teacher_i_tokens the fraction of counted tokens it
    scored. val_kd_loss is the held-out teacher-student divergence."""
    out = {"loss": m.get("train_loss", 0.0), **m}
    if "train_temperature" in out:
        out["temperature"] = out.pop("train_temperature")
    out.pop("val_temperature", None)
    for split in ("train", "val"):
        for i in range(n):
            frac = out.get(f"{split}_kd_teacher_{i}_tokens")
            if frac is None:
                continue
            if frac > 0:
                out[f"{split}_kd_teacher_{i}"] = out[f"{split}_kd_teacher_{i}"] / frac
            else:
                out.pop(f"{split}_kd_teacher_{i}", None)
    return out


# --- run ---------------------------------------------------------------------------------------


def _routes(c, data, tokenizer, specs) -> tuple[list[int], list[int]]:
    """Teacher index of every prepared train / valid item, matched to the raw rows by tokens."""
    by_tokens: dict[tuple[int, ...], int] = {}
    for rows, field in validation.dataset_rows(c.dataset):
        route = teachers.route_rows(rows, c.route_field, specs, field)
        toks = datasets.tokenize_rows(
            rows,
            data.format,
            tokenizer,
            max_seq_length=data.max_seq_length,
            mask_prompt=data.mask_prompt,
            field=field,
        )
        for n, (t, r) in enumerate(zip(toks, route, strict=True), 1):
            if by_tokens.setdefault(tuple(t.tokens), r) != r:
                raise InvalidArgument.one(
                    field, f"row {n}: the same text as an earlier row routed to a different teacher"
                )
    train = [by_tokens[tuple(t.tokens)] for t in data.train]
    return train, [by_tokens[tuple(t.tokens)] for t in data.valid]


def _student(c, ctx: JobContext, dtype: str) -> tuple[str, Any, Any]:
    path = c.student
    if c.student_init.enabled:
        out = Path(ctx.output_dir) / "student_init"
        world = mx.distributed.init()
        # Data parallel: rank 0 writes it (one temp dir, no race), the others wait for it.
        if world.rank() == 0 and not (out / "config.json").is_file():
            student.init_student(
                c.teachers[0].model,
                out,
                keep_layers=c.student_init.keep_teacher_layers,
                num_layers=c.student_init.num_layers,
            )
        if world.size() > 1:
            mx.eval(mx.distributed.all_sum(mx.array(1), stream=mx.cpu))
        path = str(out)
    model, tokenizer = models.load_model(
        path, c.student_adapter or None, dtype, field="spec.student.model"
    )
    return path, model, tokenizer


def _caches(c, ctx, data, ts, weights, routes, vocab) -> dict:
    caches: dict[str, teachers.TeacherCache | None] = {"train": None, "valid": None}
    if not c.cache.enabled:
        return caches
    splits = (("train", data.train), ("valid", data.valid))
    for (split, items), route in zip(splits, routes, strict=True):
        if items:
            caches[split] = teachers.TeacherCache.open_or_build(
                Path(ctx.output_dir) / teachers.CACHE_DIR,
                split,
                ts,
                c.teachers,
                weights,
                route,
                [t.tokens for t in items],
                k=min(c.cache.top_k, vocab),
                vocab=vocab,
                log=ctx.log,
            )
    return caches


def _streams(c, loop, data, model, tokenizer, ts, weights, routes, caches, vocab):
    """The train stream (on-policy swaps, temperature schedule, cache) and the valid one."""
    world = mx.distributed.init()
    common = {
        "pad_id": data.pad_id,
        "max_seq_length": data.max_seq_length,
        "seed": loop.seed,
        "rank": world.rank(),
        "world_size": world.size(),
    }
    inner = IndexedBatches(data.train, loop.micro_batch_size, **common)
    parts = StreamParts(
        weights,
        routes[0],
        c.temperature,
        total_steps(loop, inner),
        loop.grad_accumulation_steps,
        caches["train"],
        vocab,
        min(c.cache.top_k, vocab),
        ts,
    )
    policy = None
    if c.on_policy.fraction > 0:
        policy = student.OnPolicy(
            c.on_policy.fraction,
            model,
            tokenizer,
            data.train,
            c.on_policy.max_new_tokens,
            c.on_policy.temperature,
            data.pad_id,
            data.max_seq_length,
        )
    train_stream = KDStream(inner, parts, policy=policy, seed=loop.seed, rank=world.rank())
    if not data.valid or loop.steps_per_eval == -1:
        return train_stream, None
    limit = None if loop.val_batches == -1 else loop.val_batches
    vb = IndexedBatches(data.valid, loop.micro_batch_size, shuffle=False, limit=limit, **common)
    vparts = dataclasses.replace(parts, route=routes[1], cache=caches["valid"])
    return train_stream, KDStream(vb, vparts, step_of=lambda: train_stream.step)


def run(config: dict, ctx: JobContext) -> CheckpointInfo:
    c = validation.validate(config)
    loop = LoopSettings.from_dict(c.loop, prefix="spec.loop")
    opt = OptimizerSettings.from_dict(c.optimizer, prefix="spec.optimizer")
    lora = adapters.LoraSettings.from_dict(c.lora, prefix="spec.lora")
    world = mx.distributed.init()
    mx.random.seed(loop.seed)  # LoRA and projection init: the same in every attempt of the job

    ts = [teachers.load_teacher(s, i, loop.dtype) for i, s in enumerate(c.teachers)]
    path, model, tokenizer = _student(c, ctx, loop.dtype)
    blockwise = student.blockwise_ok(model)  # before adapters: dropout would blur the probe
    sig = teachers.tokenizer_signature(tokenizer)
    teachers.check_tokenizers(sig, [teachers.tokenizer_signature(t.tokenizer) for t in ts])
    vocab = min(teachers.output_vocab(m) for m in [model, *(t.model for t in ts)])

    if c.student_adapter and c.method != "full":
        adapter_config = {
            **adapters.read_adapter_config(Path(c.student_adapter)),
            "base_model": path,
        }
        model.train()  # mlx-lm loaded the adapter trainable; keep training it
    else:
        if c.student_adapter:  # full fine-tuning of base + adapter: fuse first
            fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
            model.update_modules(tree_unflatten(fused))
        adapter_config = adapters.apply(model, c.method, lora, base_model=path)
    kind = "full" if adapter_config is None else "adapter"

    pairs: list[tuple[int, int]] = []
    if c.features.enabled:
        if not (blockwise and ts[0].blockwise):
            raise InvalidArgument.one(
                "spec.features.enabled",
                "feature distillation needs llama-layout models (embed -> layers -> norm -> head) "
                "for the student and teachers[0]",
            )
        ls, lt = student.num_layers(model), student.num_layers(ts[0].model)
        pairs = list(c.features.pairs) or student.uniform_layer_map(ls, lt)
        model[PROJ] = student.Projections(
            pairs, student.hidden_size(model), student.hidden_size(ts[0].model)
        )
        mx.eval(model[PROJ].parameters())

    data = datasets.prepare(
        c.dataset,
        tokenizer,
        allowed_formats=FORMATS,
        max_seq_length=loop.max_seq_length,
        mask_prompt=loop.mask_prompt,
        seed=loop.seed,
    )
    route_train, route_valid = (
        _routes(c, data, tokenizer, c.teachers) if c.route_field else (None, None)
    )
    weights = teachers.normalized_weights(c.teachers)

    caches = _caches(c, ctx, data, ts, weights, (route_train, route_valid), vocab)
    if caches["train"] is not None and c.on_policy.fraction == 0:
        ts = []  # the cache replaces the teachers: free their memory
    train_stream, valid_stream = _streams(
        c, loop, data, model, tokenizer, ts, weights, (route_train, route_valid), caches, vocab
    )

    resolved = {
        **dataclasses.asdict(c),
        "loop": loop.to_dict(),
        "optimizer": opt.to_dict(),
        "lora": lora.to_dict(),
        "student_path": path,
        "shared_vocab": vocab,
        "layer_map": pairs,
    }
    model_config = models.model_config(path)
    write = student.writer(model, tokenizer, adapter_config, model_config, with_projections=True)
    artifact = Artifact(kind, write, base_model=path if kind == "adapter" else "", config=resolved)
    loss_fn = make_loss_fn(c, ts, vocab, pairs, cached=c.cache.enabled, blockwise=blockwise)

    def report(r) -> None:
        ctx.report(dataclasses.replace(r, metrics=finish_metrics(r.metrics, len(c.teachers))))

    run_ctx = dataclasses.replace(ctx, report=report)
    result = train(model, loss_fn, train_stream, valid_stream, loop, opt, run_ctx, artifact)
    if not ctx.is_main or world.rank() != 0:
        return result.checkpoint  # type: ignore[return-value]
    final_write = student.writer(
        model, tokenizer, adapter_config, model_config, with_projections=False
    )
    manifest = {
        "job_id": ctx.job_id,
        "kind": kind,
        "base_model": artifact.base_model,
        "config": resolved,
        "metrics": finish_metrics(result.metrics, len(c.teachers)),
    }
    return checkpoints.save_final(Path(ctx.output_dir), final_write, manifest, step=result.step)
