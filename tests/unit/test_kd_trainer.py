"""Distillation trainer on tiny random llamas (teacher 4 layers x 64, student 2 layers x 32)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from services.distillation import validate as V
from services.distillation.trainers import kd, losses, student, teacher_backends, teachers
from services.runtime import checkpoints
from services.runtime.contract import Interrupted, JobContext
from services.runtime.errors import InvalidArgument
from services.runtime.models import build_tiny_model, load_model

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What color is the sky?", "The sky is blue on a clear day."),
    ("When did the train leave?", "The morning train left the station at seven."),
    ("What does the recipe need?", "Two cups of flour, one egg and a pinch of salt."),
    ("Who waters the tomatoes?", "The old man next door waters his tomatoes."),
    ("When does the library open?", "The library opened at ten."),
    ("How should software be written?", "Good software is written to be read."),
]


def _sharpen(path: Path, factor: float) -> None:
    """Scale the untied output head so the random teacher has peaked, informative outputs."""
    f = path / "model.safetensors"
    w = dict(mx.load(str(f)))
    w["lm_head.weight"] = w["lm_head.weight"] * factor
    mx.save_safetensors(str(f), w, metadata={"format": "mlx"})


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kd")
    t1 = build_tiny_model(
        root / "teacher", num_layers=4, hidden_size=64, seed=1, tie_word_embeddings=False
    )
    t2 = build_tiny_model(
        root / "teacher2",
        num_layers=3,
        hidden_size=48,
        num_heads=4,
        num_kv_heads=2,
        seed=2,
        tie_word_embeddings=False,
    )
    for t in (t1, t2):
        _sharpen(t, 40.0)
    s = build_tiny_model(
        root / "student", num_layers=2, hidden_size=32, intermediate_size=64, seed=3
    )
    # Same tokenizer, wider (padded) vocabulary: logits are sliced to the shared 512.
    wide = build_tiny_model(root / "wide", num_layers=2, hidden_size=64, vocab_size=640, seed=4)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(s / name, wide / name)
    other = build_tiny_model(root / "other_tok", num_layers=2, hidden_size=32, vocab_size=300)
    rows = [
        {"prompt": q, "completion": a, "domain": "general" if i % 2 else "facts"}
        for i, (q, a) in enumerate(QA * 3)
    ]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "root": root,
        "t1": t1,
        "t2": t2,
        "student": s,
        "wide": wide,
        "other": other,
        "data": data,
    }


def config(env: dict, **over) -> dict:
    c = {
        "student": {"model": str(env["student"])},
        "teachers": [{"model": {"model": str(env["t1"])}}],
        "dataset": {"path": str(env["data"]), "valid_fraction": 0.2},
        "method": "full",
        "alpha": 0.9,
        "temperature": {"initial": 2.0},
        "optimizer": {"learning_rate": 3e-3, "schedule": "constant", "name": "adam"},
        "loop": {
            "batch_size": 4,
            "max_steps": 12,
            "max_seq_length": 64,
            "steps_per_report": 1,
            "steps_per_eval": 12,
            "val_batches": 2,
            "steps_per_checkpoint": 100,
        },
    }
    c.update(over)
    return c


def ctx_for(path: Path, reports: list, **kw) -> JobContext:
    return JobContext(job_id="kd-test", output_dir=path, report=reports.append, **kw)


# --- building blocks ---------------------------------------------------------------------------


def test_hidden_states_match_model_forward(env) -> None:
    model, _ = load_model(str(env["t1"]))
    x = mx.array([[5, 9, 31, 200, 7, 3]])
    h, feats = student.hidden_states(model, x, capture=(0, 3))
    np.testing.assert_allclose(np.array(student.logits(model, h)), np.array(model(x)), atol=1e-4)
    assert sorted(feats) == [0, 3] and feats[3].shape == (1, 6, 64)


def test_layer_maps_and_projection_shapes() -> None:
    assert student.uniform_layer_map(2, 4) == [(0, 1), (1, 3)]
    assert student.uniform_layer_map(3, 7) == [(0, 1), (1, 4), (2, 6)]
    assert student.evenly_spaced(3, 4) == [0, 2, 3]
    proj = student.Projections([(0, 1), (1, 3)], 32, 64)
    out = proj(1, mx.zeros((2, 5, 32)))
    assert out.shape == (2, 5, 64) and len(proj.layers) == 2
    assert proj.layers[0].weight.shape == (64, 32)
    same = student.Projections([(0, 1)], 64, 64)
    assert same.identity and not tree_flatten(same.parameters())


def test_student_init_keeps_selected_layers(env, tmp_path) -> None:
    out, keep = student.init_student(env["t1"], tmp_path / "s", keep_layers=[3, 0])
    assert keep == [0, 3]
    small, _ = load_model(str(out))
    big, _ = load_model(str(env["t1"]))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    for i, j in enumerate(keep):
        a = dict(tree_flatten(small.layers[i].parameters()))
        b = dict(tree_flatten(big.layers[j].parameters()))
        assert all(mx.array_equal(a[k], b[k]) for k in b)
    # Its forward is the teacher's with only those blocks.
    x = mx.array([[5, 9, 31, 200]])
    big.model.layers = [big.model.layers[j] for j in keep]
    np.testing.assert_allclose(np.array(small(x)), np.array(big(x)), atol=1e-4)
    _, keep = student.init_student(env["t1"], tmp_path / "s3", num_layers=3)
    assert keep == [0, 2, 3]


def test_vocab_slicing_and_tokenizer_check(env) -> None:
    s_model, s_tok = load_model(str(env["student"]))
    w = teachers.load_teacher(teachers.TeacherSpec(str(env["wide"])), 0)
    assert teachers.output_vocab(w.model) == 640 and teachers.output_vocab(s_model) == 512
    sig = teachers.tokenizer_signature(s_tok)
    teachers.check_tokenizers(sig, [teachers.tokenizer_signature(w.tokenizer)])  # same: fine
    h, _ = teachers.teacher_hidden(w, mx.array([[1, 2, 3]]))
    assert teachers.head_logits(w, h, 512).shape == (1, 3, 512)
    other = teachers.signature_from_dir(env["other"])
    with pytest.raises(InvalidArgument) as e:
        teachers.check_tokenizers(sig, [None, other])
    assert e.value.violations[0].field == "spec.teachers[1].model"
    assert "teachers[1] uses a different tokenizer than the student" in str(e.value)


def test_validate_rejects_bad_configs(env) -> None:
    def bad(**over) -> dict[str, str]:
        with pytest.raises(InvalidArgument) as e:
            V.validate(config(env, **over))
        return {v.field: v.description for v in e.value.violations}

    assert "spec.teachers" in bad(teachers=[])
    t = {"model": {"model": str(env["t1"])}}
    assert "spec.teachers[1].weight" in bad(teachers=[t, {**t, "weight": -1.0}])
    assert "sum to a positive" in bad(teachers=[{**t, "weight": -1.0}])["spec.teachers"]
    assert "spec.alpha" in bad(alpha=1.5)
    assert "spec.jsd_beta" in bad(jsd_beta=1.0)
    assert "spec.temperature.initial" in bad(temperature={"initial": -1.0})
    f = bad(features={"enabled": True, "layer_map": [{"student_layer": 1, "teacher_layer": 4}]})
    assert "out of range" in f["spec.features.layer_map[0].teacher_layer"]
    f = bad(teachers=[t, {"model": {"model": str(env["other"])}}])
    assert f["spec.teachers[1].model"] == "teachers[1] uses a different tokenizer than the student"
    f = bad(student_init={"keep_teacher_layers": [0, 7]})
    assert "spec.student_init.keep_teacher_layers[1]" in f
    routed = [
        {**t, "route_value": "facts"},
        {"model": {"model": str(env["t2"])}, "route_value": "news"},
    ]
    f = bad(teachers=routed, route_field="domain")
    assert f["spec.dataset.path"].startswith("row 2: domain='general' matches no teacher")
    c = V.validate(config(env, divergence="jsd", jsd_beta=0.3))
    assert (c.divergence, c.jsd_beta, c.method) == ("jsd", 0.3, "full")


def test_defaults_against_the_references() -> None:
    """The resolved defaults, each against where it comes from (bench/parity_kd.py checks the
    loss they define step by step against TRL's GKD loss)."""
    c = V.parse({"teachers": [{"model": {"model": "t"}}], "student": {"model": "s"},
                 "dataset": {"path": "d"}})  # fmt: skip
    # Hinton et al. 2015 KD, as the proto documents: (1 - alpha) CE + alpha T^2 KL(P || Q).
    assert (c.divergence, c.alpha, c.temperature.mode, c.temperature.initial) == (
        "forward_kl",
        0.5,
        "fixed",
        2.0,
    )
    # TRL GKDConfig: beta 0.5, max_new_tokens 128; sampling at T = 1 (TRL's DistillationConfig
    # and the paper's on-policy samples; GKDConfig's 0.9 would sample off the student's
    # distribution); on-policy is opt-in (GKD's lmbda is 0.5).
    assert c.jsd_beta == 0.5
    assert (c.on_policy.fraction, c.on_policy.max_new_tokens, c.on_policy.temperature) == (
        0.0,
        128,
        1.0,
    )
    assert (c.cache.enabled, c.cache.top_k, c.features.loss, c.features.weight) == (
        False,
        32,
        "mse",
        1.0,
    )


# --- the loss ----------------------------------------------------------------------------------


def _batch(ts_models, vocab: int, rows: int = 2, length: int = 12, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, vocab, size=(rows, length + 1)).astype(np.int32)
    mask = np.ones((rows, length), np.float32)
    mask[:, :3] = 0
    return {
        "inputs": mx.array(toks[:, :-1]),
        "targets": mx.array(toks[:, 1:]),
        "loss_mask": mx.array(mask),
        "temperature": mx.array(2.0),
        "teacher_weights": mx.ones((rows, 1)),
    }


def test_chunking_and_checkpointing_do_not_change_loss_or_grads(env) -> None:
    import mlx.nn as nn

    t = teachers.load_teacher(teachers.TeacherSpec(str(env["t1"])), 0)
    model, _ = load_model(str(env["student"]))
    batch = _batch([t], 512)
    results = []
    for chunk, ckpt in ((5, True), (64, False)):
        c = V.parse(config(env, chunk_size=chunk))
        fn = kd.make_loss_fn(c, [t], 512, [], cached=False, chunked=ckpt)
        vg = nn.value_and_grad(model, lambda mdl, b, fn=fn: fn(mdl, b)[0])
        loss, grads = vg(model, batch)
        results.append((loss.item(), dict(tree_flatten(grads))))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    # Models without the llama layout are distilled from their full logits: same loss here.
    assert student.blockwise_ok(model) and t.blockwise
    slow = teachers.Teacher(t.spec, t.model, t.tokenizer, blockwise=False)
    c = V.parse(config(env, chunk_size=5))
    full = kd.make_loss_fn(c, [slow], 512, [], cached=False, blockwise=False)(model, batch)[0]
    assert full.item() == pytest.approx(results[0][0], rel=1e-5)
    for k, v in results[0][1].items():
        np.testing.assert_allclose(np.array(v), np.array(results[1][1][k]), rtol=1e-3, atol=1e-6)


def test_teacher_cache_matches_full_loss_for_large_k(env, tmp_path) -> None:
    t = teachers.load_teacher(teachers.TeacherSpec(str(env["t1"])), 0)
    model, _ = load_model(str(env["student"]))
    rng = np.random.default_rng(1)
    items = [rng.integers(3, 512, size=n).tolist() for n in (9, 13)]
    batch = _batch([t], 512, rows=2, length=12)
    toks = np.zeros((2, 13), np.int32)
    for r, it in enumerate(items):
        toks[r, : len(it)] = it
    batch["inputs"], batch["targets"] = mx.array(toks[:, :-1]), mx.array(toks[:, 1:])
    mask = np.zeros((2, 12), np.float32)
    mask[0, 2:8], mask[1, 2:12] = 1, 1
    batch["loss_mask"] = mx.array(mask)
    w = np.ones(1, np.float32)
    for kind in ("forward_kl", "jsd"):
        c = V.parse(config(env, divergence=kind))
        full = kd.make_loss_fn(c, [t], 512, [], cached=False)(model, batch)[2]["kd_loss"].item()
        errs = {}
        for k in (512, 256, 8):
            score = teacher_backends.TopKScorer([teacher_backends.LocalBackend(t)], 512, k)
            cache = teachers.TeacherCache.open_or_build(
                tmp_path / kind, f"k{k}", score, c.teachers, w, None, items, k=k, vocab=512
            )
            b = {**batch, **cache.lookup([0, 1], 12)}
            got = kd.make_loss_fn(c, [], 512, [], cached=True)(model, b)[2]["kd_loss"].item()
            errs[k] = abs(got - full) / full
        # T=2 with k=V is exact; top-256 of 512 is within 5%; top-8 is a coarser approximation.
        assert errs[512] < 1e-4 and errs[256] < 0.05 and errs[8] > errs[256], (kind, errs)
    # Reopening with the same inputs reuses the file; other rows rebuild it.
    again = teachers.TeacherCache.open_or_build(
        tmp_path / "forward_kl", "k8", None, c.teachers, w, None, items, k=8, vocab=512
    )
    assert again.k == 8 and again.offsets.tolist() == [0, 8, 20]


def test_chunked_loss_bounds_memory(env, tmp_path) -> None:
    """The full-vocabulary part of the loss is computed one chunk at a time, backward too."""
    import mlx.nn as nn

    v = 4096
    big = build_tiny_model(tmp_path / "t", num_layers=1, hidden_size=32, vocab_size=v, seed=5)
    t = teachers.load_teacher(teachers.TeacherSpec(str(big)), 0)
    model, _ = load_model(str(big))
    batch = _batch([t], 300, rows=2, length=256)
    peaks = {}
    for chunked in (False, True):
        c = V.parse(config(env, chunk_size=32))
        fn = kd.make_loss_fn(c, [t], v, [], cached=False, chunked=chunked)
        vg = nn.value_and_grad(model, lambda m, b, fn=fn: fn(m, b)[0])
        mx.eval(vg(model, batch))
        mx.reset_peak_memory()
        loss, grads = vg(model, batch)
        mx.eval(loss, grads)
        peaks[chunked] = mx.get_peak_memory() / 1e6
    one = 2 * 256 * v * 4 / 1e6  # one float32 [B, L, V] array
    print(
        f"peak MB: whole sequence {peaks[False]:.0f}, chunked {peaks[True]:.0f} ([B,L,V]={one:.0f})"
    )
    assert peaks[True] < 0.3 * peaks[False] and peaks[False] > 6 * one


def test_quantized_teacher_scores_like_full_precision(env) -> None:
    full = teachers.load_teacher(teachers.TeacherSpec(str(env["t1"])), 0)
    q8 = teachers.load_teacher(teachers.TeacherSpec(str(env["t1"]), quantize_bits=8), 0)
    assert teachers._is_quantized(q8.model) and not teachers._is_quantized(full.model)
    model, _ = load_model(str(env["student"]))
    c = V.parse(config(env))
    batch = _batch([full], 512)
    a = kd.make_loss_fn(c, [full], 512, [], cached=False)(model, batch)[2]["kd_loss"].item()
    b = kd.make_loss_fn(c, [q8], 512, [], cached=False)(model, batch)[2]["kd_loss"].item()
    assert a == pytest.approx(b, rel=0.05) and a != b


def test_teacher_from_base_plus_adapter(env, tmp_path) -> None:
    from services.runtime import adapters

    base, _ = load_model(str(env["t1"]))
    cfg = adapters.apply(base, "lora", adapters.LoraSettings(rank=4, num_layers=-1))
    flat = [
        (k, mx.random.normal(v.shape) * 0.5) for k, v in tree_flatten(base.trainable_parameters())
    ]
    base.update(tree_unflatten(flat))
    adapters.save_adapter(tmp_path / "adapter", base, {**cfg, "base_model": str(env["t1"])})
    plain = teachers.load_teacher(teachers.TeacherSpec(str(env["t1"])), 0)
    spec = teachers.TeacherSpec(str(env["t1"]), adapter_path=str(tmp_path / "adapter"))
    tuned = teachers.load_teacher(spec, 0)
    x = mx.array([[5, 9, 31, 200]])
    want = base(x)
    got = teachers.head_logits(tuned, teachers.teacher_hidden(tuned, x)[0], 512)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-3)
    assert not tree_flatten(tuned.model.trainable_parameters())  # frozen
    other = teachers.head_logits(plain, teachers.teacher_hidden(plain, x)[0], 512)
    assert float(mx.abs(other - got).max()) > 1e-2


def test_on_policy_batches_are_seeded_and_resumable(env) -> None:
    from services.runtime import datasets

    model, tok = load_model(str(env["student"]))
    data = datasets.prepare(
        {"path": str(env["data"]), "valid_fraction": 0.0},
        tok,
        allowed_formats=kd.FORMATS,
        max_seq_length=64,
        mask_prompt=None,
        seed=0,
    )

    def stream(fraction: float) -> kd.KDStream:
        inner = kd.IndexedBatches(data.train, 2, pad_id=data.pad_id, max_seq_length=64, seed=0)
        parts = kd.StreamParts(np.ones(1, np.float32), None, losses.Temperature(), 10, 1)
        pol = student.OnPolicy(fraction, model, tok, data.train, 5, 1.0, data.pad_id, 64)
        return kd.KDStream(inner, parts, policy=pol, seed=7)

    plain = [b["inputs"] for _, b in zip(range(4), stream(0.0), strict=False)]
    s = stream(0.5)
    mixed = [b for _, b in zip(range(4), s, strict=False)]
    swapped = [not mx.array_equal(b["inputs"], p) for b, p in zip(mixed, plain, strict=True)]
    assert 0 < sum(swapped) < 4, swapped  # a seeded coin per batch, fraction 0.5
    for b, sw in zip(mixed, swapped, strict=True):
        if sw:  # same prompt, new completion, loss only on the completion
            assert int(b["loss_mask"].sum()) > 0
    # Resume after batch 2: the same coins and the same samples follow.
    s2 = stream(0.5)
    first = stream(0.5)
    it = iter(first)
    next(it), next(it)
    s2.restore(first.state())
    again = [b for _, b in zip(range(2), s2, strict=False)]
    for a, b in zip(again, mixed[2:], strict=True):
        assert mx.array_equal(a["inputs"], b["inputs"])


def test_multi_teacher_mixture_and_routing_in_loss(env) -> None:
    t1 = teachers.load_teacher(teachers.TeacherSpec(str(env["t1"]), weight=1.0), 0)
    t2 = teachers.load_teacher(teachers.TeacherSpec(str(env["t2"]), weight=3.0), 1)
    model, _ = load_model(str(env["student"]))
    c = V.parse(
        config(
            env,
            teachers=[
                {"model": {"model": str(env["t1"])}, "weight": 1.0},
                {"model": {"model": str(env["t2"])}, "weight": 3.0},
            ],
        )
    )
    w = teachers.normalized_weights(c.teachers)
    np.testing.assert_allclose(w, [0.25, 0.75])
    batch = _batch([t1, t2], 512)
    batch["teacher_weights"] = mx.array(np.tile(w, (2, 1)))
    fn = kd.make_loss_fn(c, [t1, t2], 512, [], cached=False)
    m = fn(model, batch)[2]
    # Mixture KD is below the weighted mean of the per-teacher KDs (KL is convex in P).
    per = [m["kd_teacher_0"].item(), m["kd_teacher_1"].item()]
    assert m["kd_loss"].item() < 0.25 * per[0] + 0.75 * per[1]
    # Routing row 0 to teacher 0 and row 1 to teacher 1: each per-teacher metric is its rows.
    batch["teacher_weights"] = mx.array([[1.0, 0.0], [0.0, 1.0]])
    raw = {f"train_{k}": v.item() for k, v in fn(model, batch)[2].items()}
    routed = {k.removeprefix("train_"): v for k, v in kd.finish_metrics(raw, 2).items()}
    assert routed["kd_teacher_0_tokens"] == pytest.approx(0.5)
    for i in (0, 1):
        one = {**batch, "teacher_weights": mx.ones((1, 1))}
        one = {
            k: (v[i : i + 1] if k in ("inputs", "targets", "loss_mask") else v)
            for k, v in one.items()
        }
        ref = kd.make_loss_fn(c, [(t1, t2)[i]], 512, [], cached=False)(model, one)[2]["kd_loss"]
        assert routed[f"kd_teacher_{i}"] == pytest.approx(ref.item(), rel=1e-4)


# --- whole runs --------------------------------------------------------------------------------


def test_kd_run_with_features_lowers_kd_loss(env, tmp_path) -> None:
    reports: list = []
    cfg = config(env, features={"enabled": True, "uniform": True, "loss": "cosine", "weight": 1.0})
    # Adam is bias-corrected (torch's) now: its first steps are ~lr, not several times that,
    # so 12 steps need a larger lr to move the kd loss by 20%.
    cfg["optimizer"] = {**cfg["optimizer"], "learning_rate": 1e-2}
    info = kd.run(cfg, ctx_for(tmp_path / "job", reports))
    before, trained = reports[0].metrics, [r for r in reports if r.step > 0]

    def avg(key: str, part: slice) -> float:
        return float(np.mean([r.metrics[f"train_{key}"] for r in trained[part]]))

    kd0, kd1 = avg("kd_loss", slice(0, 3)), avg("kd_loss", slice(-3, None))
    f0, f1 = avg("feature_loss", slice(0, 3)), avg("feature_loss", slice(-3, None))
    print(f"kd_loss {kd0:.3f} -> {kd1:.3f}; feature_loss (cosine) {f0:.3f} -> {f1:.3f}")
    assert kd1 < 0.8 * kd0 and f1 < 0.8 * f0
    m = reports[-1].metrics
    for key in ("loss", "train_ce_loss", "train_kd_teacher_0", "temperature", "val_loss"):
        assert key in m, key
    assert m["temperature"] == pytest.approx(2.0)
    # Held-out teacher-student divergence, before training (step 0) and after.
    assert reports[0].step == 0 and m["val_kd_loss"] < before["val_kd_loss"]
    assert "val_ppl" not in m and "val_temperature" not in m
    # Projections are saved with checkpoints but the final student is a plain mlx-lm model.
    ckpt = checkpoints.latest(tmp_path / "job")
    assert (ckpt / student.PROJECTIONS_FILE).is_file()
    assert info.path.name == "final" and not (info.path / student.PROJECTIONS_FILE).exists()
    final, _ = load_model(str(info.path))
    assert not any(k.startswith(kd.PROJ) for k, _ in tree_flatten(final.parameters()))
    assert final(mx.array([[1, 2, 3]])).shape == (1, 3, 512)


def test_resume_matches_uninterrupted_run(env, tmp_path) -> None:
    cfg = config(
        env,
        method="lora",
        lora={"rank": 4, "num_layers": -1},
        student_init={"num_layers": 2},
        temperature={"mode": "annealed", "initial": 3.0, "final": 1.0},
        on_policy={"fraction": 0.5, "max_new_tokens": 6, "temperature": 1.0},
        loop={
            **config(env)["loop"],
            "max_steps": 6,
            "steps_per_checkpoint": 3,
            "steps_per_eval": -1,
        },
    )
    full_reports: list = []
    a = kd.run(cfg, ctx_for(tmp_path / "a", full_reports))
    reports: list = []
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= 3

    with pytest.raises(Interrupted):
        kd.run(cfg, ctx_for(tmp_path / "b", reports, should_stop=stop))
    resume = checkpoints.latest(tmp_path / "b")
    assert resume is not None and resume.name.endswith("3")
    b = kd.run(cfg, ctx_for(tmp_path / "b", reports, resume_from=resume))
    temps = [r.metrics["temperature"] for r in full_reports]
    assert temps[0] == pytest.approx(3.0) and temps[-1] == pytest.approx(1.0)
    wa = mx.load(str(a.path / "adapters.safetensors"))
    wb = mx.load(str(b.path / "adapters.safetensors"))
    for k in wa:
        np.testing.assert_allclose(np.array(wa[k]), np.array(wb[k]), rtol=1e-5, atol=1e-7)
    assert full_reports[-1].metrics["train_kd_loss"] == pytest.approx(
        reports[-1].metrics["train_kd_loss"], 1e-5
    )
    assert json.loads((a.path / "adapter_config.json").read_text())["base_model"].endswith(
        "student_init"
    )


def test_routed_cached_run(env, tmp_path, monkeypatch) -> None:
    from services.runtime import phases

    monkeypatch.setattr(phases, "EVERY_S", 0.0)
    reports: list = []
    logs: list[str] = []
    cfg = config(
        env,
        teachers=[
            {"model": {"model": str(env["t1"])}, "route_value": "facts"},
            {"model": {"model": str(env["t2"])}, "route_value": "general"},
        ],
        route_field="domain",
        teacher_cache={"enabled": True, "top_k": 16},
        divergence="reverse_kl",
        temperature={"mode": "adaptive", "min": 1.0, "final": 3.0},
    )
    kd.run(cfg, ctx_for(tmp_path / "job", reports, log=logs.append))
    assert (tmp_path / "job" / "teacher_cache" / "train.safetensors").is_file()
    # Caching the teachers reports its progress, then what it built.
    caching = [m for m in logs if m.startswith("caching the teachers' top-16 of the train")]
    assert len(caching) >= 2 and any("%" in m and "ETA" in m for m in caching), logs
    assert any(m.startswith("teacher cache: ") for m in logs)
    trained = [r for r in reports if r.step > 0]
    m0, m1 = trained[0].metrics, trained[-1].metrics
    assert 1.0 < m1["temperature"] < 3.0
    assert m1["train_kd_loss"] < m0["train_kd_loss"]
    # Routed: a teacher's kd is the mean over the tokens routed to it, absent when none were.
    both = 0
    for r in trained:
        for i in (0, 1):
            has = f"train_kd_teacher_{i}" in r.metrics
            assert has == (r.metrics[f"train_kd_teacher_{i}_tokens"] > 0)
        both += "train_kd_teacher_0" in r.metrics and "train_kd_teacher_1" in r.metrics
    assert both >= 6, both
