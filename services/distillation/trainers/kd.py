"""Knowledge distillation: ``run(config, ctx) -> CheckpointInfo`` (job name
``services.distillation.trainers.kd:run``).

loss = (1 - alpha) * CE + alpha * mean_t T_t^2 * D(teacher_T || student_T) + w_f * feature loss

Reads top to bottom: resolve the config, load teachers and the student (or build one from the
first teacher's layers), prepare the data, optionally precompute the teacher top-k cache, then
hand a loss and a batch stream to the shared loop (services.runtime.loop). The stream adds
what the loss needs to each batch (row mixture weights, the scheduled temperature, cached
teacher top-k) and swaps in student-generated completions for on-policy batches.

This module is the run's setup; the loss lives in kd_loss.py and the stream in kd_stream.py,
and their names stay importable from here (``__all__``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_unflatten

from services.distillation import validate as validation
from services.distillation.trainers import student, teacher_backends, teachers
from services.distillation.trainers.kd_loss import finish_metrics, make_loss_fn
from services.distillation.trainers.kd_stream import IndexedBatches, KDStream, StreamParts
from services.runtime import adapters, checkpoints, datasets, models
from services.runtime.contract import CheckpointInfo, JobContext
from services.runtime.errors import InvalidArgument
from services.runtime.loop import Artifact, LoopSettings, OptimizerSettings, total_steps, train

__all__ = [
    "FORMATS",
    "PROJ",
    "IndexedBatches",
    "KDStream",
    "StreamParts",
    "finish_metrics",
    "make_loss_fn",
    "run",
]

PROJ = student.PROJ
FORMATS = ("text", "chat", "completion")


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


def _caches(c, ctx, data, scorer, weights, routes, vocab) -> dict:
    caches: dict[str, teachers.TeacherCache | None] = {"train": None, "valid": None}
    if not c.cache.enabled:
        return caches
    splits = (("train", data.train), ("valid", data.valid))
    for (split, items), route in zip(splits, routes, strict=True):
        if items:
            caches[split] = teachers.TeacherCache.open_or_build(
                Path(ctx.output_dir) / teachers.CACHE_DIR,
                split,
                scorer,
                c.teachers,
                weights,
                route,
                [t.tokens for t in items],
                k=scorer.k,
                vocab=vocab,
                log=ctx.log,
            )
    return caches


def _streams(c, loop, data, model, tokenizer, scorer, weights, routes, caches, vocab):
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
        scorer.k if scorer is not None else 0,
        scorer,
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
    c = validation.parse(config, validated=True)  # Start validated it, files included
    loop = LoopSettings.rehydrate(c.loop)
    opt = OptimizerSettings.rehydrate(c.optimizer)
    lora = adapters.LoraSettings.rehydrate(c.lora)
    world = mx.distributed.init()
    mx.random.seed(loop.seed)  # LoRA and projection init: the same in every attempt of the job

    path, model, tokenizer = _student(c, ctx, loop.dtype)
    backends = [
        teacher_backends.open_backend(s, i, loop.dtype, tokenizer) for i, s in enumerate(c.teachers)
    ]
    ts = [b.teacher for b in backends if isinstance(b, teacher_backends.LocalBackend)]
    blockwise = student.blockwise_ok(model)  # before adapters: dropout would blur the probe
    teacher_backends.check_tokenizers(backends, teachers.tokenizer_signature(tokenizer))
    vocab = min([teachers.output_vocab(model), *(b.vocab_size() for b in backends)])
    # A remote teacher gives top-k log-probs only: the loss runs on them as on the cache.
    remote = len(ts) < len(backends)
    topk = c.cache.enabled or remote
    k = min(c.cache.top_k, vocab, *(b.max_top_k for b in backends))
    if topk and k < min(c.cache.top_k, vocab):
        ctx.log(f"teacher top-k: {k} (the most the remote teacher serves), not {c.cache.top_k}")
    scorer = teacher_backends.TopKScorer(backends, vocab, k) if topk else None

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

    caches = _caches(c, ctx, data, scorer, weights, (route_train, route_valid), vocab)
    if caches["train"] is not None and c.on_policy.fraction == 0:
        ts, scorer = [], None  # the cache replaces the teachers: free their memory
        for b in backends:
            b.close()
        backends = []
    train_stream, valid_stream = _streams(
        c, loop, data, model, tokenizer, scorer, weights, (route_train, route_valid), caches, vocab
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
    loss_fn = make_loss_fn(c, ts, vocab, pairs, cached=topk, blockwise=blockwise)

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
