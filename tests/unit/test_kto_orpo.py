"""KTO and ORPO: each loss against an independent NumPy transcription of TRL 1.16's code
(KTOTrainer._compute_loss with its KL estimate; ORPOTrainer.concatenated_forward +
odds_ratio_loss), config validation, the unpaired row format, and short real runs on a tiny
random llama (fp32, CPU)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import services  # noqa: F401  (BLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

from services.rlhf.trainers import kto, orpo
from services.runtime import checkpoints, datasets
from services.runtime.contract import Interrupted, JobContext
from services.runtime.errors import InvalidArgument

V = 11  # vocabulary of the stand-in model


def _fields(exc: pytest.ExceptionInfo) -> dict[str, str]:
    return {v.field: v.description for v in exc.value.violations}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class _TableModel:
    """A stand-in LM: the logits at a position are a fixed random row of the input token."""

    def __init__(self, seed: int) -> None:
        self.table = np.random.default_rng(seed).normal(size=(V, V)).astype(np.float32) * 2

    def __call__(self, inputs: mx.array) -> mx.array:
        return mx.array(self.table)[inputs]

    def np_logps(self, ids: np.ndarray) -> np.ndarray:
        """TRL's selective_log_softmax of logits[:, :-1] at labels ids[:, 1:] (float64)."""
        logits = self.table.astype(np.float64)[ids[:, :-1]]
        logz = np.log(np.exp(logits).sum(-1))
        return np.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0] - logz


def _rows(rng: np.random.Generator, n: int, width: int):
    """Random right-padded rows as TRL lays them out: input_ids [n, width], attention and
    completion masks; and ours: inputs / targets / loss_mask / lengths."""
    ids = rng.integers(1, V, size=(n, width))
    lengths = rng.integers(4, width + 1, size=n)
    prompt = np.array([rng.integers(1, int(n_) - 1) for n_ in lengths])
    pos = np.arange(width)[None, :]
    attn = pos < lengths[:, None]
    comp = attn & (pos >= prompt[:, None])
    ids = np.where(attn, ids, 0)
    ours = {
        "inputs": mx.array(ids[:, :-1].astype(np.int32)),
        "targets": mx.array(ids[:, 1:].astype(np.int32)),
        "loss_mask": mx.array(comp[:, 1:].astype(np.float32)),
        "lengths": mx.array(lengths.astype(np.int32)),
    }
    return ids, attn, comp, ours


# -- KTO ---------------------------------------------------------------------------------------


def _trl_kto(model, ids, comp, kl_ids, kl_comp, ref, ref_kl, labels, beta, loss_type, dw, uw):
    """KTOTrainer._compute_loss (precomputed reference log-probs), in NumPy."""
    logps = (model.np_logps(ids) * comp[:, 1:]).sum(-1)
    if loss_type == "kto":
        kl_logps = (model.np_logps(kl_ids) * kl_comp[:, 1:]).sum(-1)
        kl = max((kl_logps - ref_kl).mean(), 0.0)
    else:
        kl = 0.0
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    ch = logps[labels] - ref[labels]
    rj = logps[~labels] - ref[~labels]
    if loss_type == "kto":
        c_loss, r_loss = 1 - sig(beta * (ch - kl)), 1 - sig(beta * (kl - rj))
    else:
        c_loss, r_loss = 1 - sig(beta * ch), sig(beta * rj)
    return np.concatenate([dw * c_loss, uw * r_loss]).mean(), kl, beta * ch.mean()


@pytest.mark.parametrize(
    ("loss_type", "beta", "dw", "uw"),
    [("kto", 0.1, 1.0, 1.0), ("kto", 0.7, 1.33, 0.5), ("apo_zero_unpaired", 0.3, 1.0, 2.0)],
)
def test_kto_loss_matches_trl_transcription(loss_type, beta, dw, uw):
    rng = np.random.default_rng(0)
    model = _TableModel(1)
    n, width = 6, 9
    ids, _, comp, batch = _rows(rng, n, width)
    kl_ids, _, kl_comp, kl_batch = _rows(rng, n, width + 3)
    labels = np.array([True, False, True, True, False, True])
    ref = rng.normal(size=n) * 3 - 10
    ref_kl = rng.normal(size=n) * 3 - 20  # z clearly > 0
    batch.update({f"kl_{k}": v for k, v in kl_batch.items()})
    batch["label"] = mx.array(labels.astype(np.float32))
    batch["ref_logps"] = mx.array(ref.astype(np.float32))
    batch["ref_kl_logps"] = mx.array(ref_kl.astype(np.float32))
    cfg = kto.KTOConfig.from_dict(
        {
            "policy": {"model": "m"},
            "loss_type": loss_type,
            "beta": beta,
            "desirable_weight": dw,
            "undesirable_weight": uw,
        }  # fmt: skip
    )
    loss, weight, metrics = kto.make_loss(cfg)(model, batch)
    want, kl, r_c = _trl_kto(
        model, ids, comp, kl_ids, kl_comp, ref, ref_kl, labels, beta, loss_type, dw, uw
    )
    np.testing.assert_allclose(loss.item(), want, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"].item(), kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["rewards_chosen"].item(), r_c, rtol=1e-5)
    assert weight.item() == n
    if loss_type == "kto":
        assert kl > 1.0  # the estimate mattered
        # Clamped at 0: a reference far above the policy on the KL rows gives z = 0.
        batch["ref_kl_logps"] = mx.array(np.zeros(n, np.float32))
        assert kto.make_loss(cfg)(model, batch)[2]["kl"].item() == 0.0


def test_kto_kl_term_carries_no_gradient():
    rng = np.random.default_rng(3)
    logps = mx.array(rng.normal(size=4).astype(np.float32))
    real = mx.ones(4)

    def f(x):
        return kto.kl_estimate(x, mx.zeros(4) - 5.0, real)

    assert mx.abs(mx.grad(f)(logps)).max().item() == 0.0
    assert f(logps).item() == pytest.approx(float(np.array(logps).mean()) + 5.0, rel=1e-6)


# -- ORPO --------------------------------------------------------------------------------------


def _np_log1mexp(x: np.ndarray) -> np.ndarray:
    return np.where(x < -0.6931471805599453, np.log1p(-np.exp(x)), np.log(-np.expm1(x)))


def test_orpo_loss_matches_trl_transcription():
    rng = np.random.default_rng(5)
    model = _TableModel(2)
    b, width, beta = 4, 10, 0.25
    ids, attn, comp, batch = _rows(rng, 2 * b, width)
    loss, weight, metrics = orpo.make_loss(beta)(model, batch)
    # ORPOTrainer.concatenated_forward: NLL over every real token of the chosen rows.
    lp = model.np_logps(ids)
    nll_mask = attn[:b, 1:]
    nll = -(lp[:b] * nll_mask).sum() / nll_mask.sum()
    avg = (lp * comp[:, 1:]).sum(-1) / comp[:, 1:].sum(-1)
    c, r = avg[:b], avg[b:]
    log_odds = (c - r) - (_np_log1mexp(c) - _np_log1mexp(r))
    ratio = -np.log1p(np.exp(-log_odds))
    np.testing.assert_allclose(loss.item(), nll - (beta * ratio).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["nll_loss"].item(), nll, rtol=1e-5)
    np.testing.assert_allclose(metrics["log_odds_chosen"].item(), log_odds.mean(), rtol=1e-4)
    np.testing.assert_allclose(metrics["rewards_chosen"].item(), beta * c.mean(), rtol=1e-5)
    assert weight.item() == b
    # The completion-only NLL would be another number: the prompt tokens count.
    assert abs(nll + (lp[:b] * comp[:b, 1:]).sum() / comp[:b, 1:].sum()) > 1e-3


def test_log1mexp_is_stable_on_both_branches():
    x = np.array([-1e-6, -0.01, -0.5, -0.7, -1.0, -5.0, -40.0])
    got = np.array(orpo.log1mexp(mx.array(x.astype(np.float32))))
    # float64 references, each where it is accurate (near 0, far from 0)
    np.testing.assert_allclose(got[:3], np.log(-np.expm1(x[:3])), rtol=1e-4)
    np.testing.assert_allclose(got[3:], np.log1p(-np.exp(x[3:])), rtol=1e-4)


def test_orpo_ignores_rows_padding_a_batch():
    rng = np.random.default_rng(8)
    model = _TableModel(3)
    _, _, _, full = _rows(rng, 4, 8)  # 2 pairs
    padded = {k: mx.concatenate([v[:2], mx.zeros_like(v[:1]), v[2:], mx.zeros_like(v[:1])])
              for k, v in full.items()}  # fmt: skip
    a, wa, _ = orpo.make_loss(0.1)(model, full)
    p, wp, _ = orpo.make_loss(0.1)(model, padded)
    assert np.isfinite(p.item()) and wp.item() == wa.item() == 2
    np.testing.assert_allclose(p.item(), a.item(), rtol=1e-6)


# -- configs -----------------------------------------------------------------------------------


def test_defaults_are_trl_configs():
    k = kto.KTOConfig.from_dict({"policy": {"model": "m"}})
    # trl 1.16 KTOConfig: loss_type "kto", beta 0.1, weights 1.0, learning_rate 1e-6.
    assert (k.loss_type, k.beta, k.desirable_weight, k.undesirable_weight) == ("kto", 0.1, 1, 1)
    assert k.precompute_reference is True and k.reference is None
    full = {"policy": {"model": "m"}, "method": "full"}
    assert kto.KTOConfig.from_dict(full).optimizer.learning_rate == 1e-6
    assert k.optimizer.learning_rate == 1e-5  # adapters: 10x, as our DPO
    o = orpo.ORPOConfig.from_dict({"policy": {"model": "m"}})
    # trl 1.16 ORPOConfig (trl.experimental.orpo): beta 0.1, learning_rate 1e-6.
    assert o.beta == 0.1 and orpo.ORPOConfig.from_dict(full).optimizer.learning_rate == 1e-6


def test_bad_configs_name_their_fields():
    with pytest.raises(InvalidArgument) as e:
        kto.KTOConfig.from_dict(
            {"policy": {"model": "m"}, "beta": 0.0, "loss_type": "sigmoid",
             "desirable_weight": -1.0, "dataset": {"path": "x", "format": "chat"}},
            prefix="spec",
        )  # fmt: skip
    f = _fields(e)
    assert f["spec.beta"] == "must be > 0"
    assert "spec.loss_type" in f and "spec.desirable_weight" in f and "spec.dataset.format" in f
    with pytest.raises(InvalidArgument) as e:
        kto.KTOConfig.from_dict(
            {"policy": {"model": "m"}, "loop": {"batch_size": 4, "grad_accumulation_steps": 4}},
            prefix="spec",
        )
    assert "KL estimate" in _fields(e)["spec.loop.batch_size"]
    # Without a KL estimate one row per micro-batch is fine (TRL allows it too).
    kto.KTOConfig.from_dict(
        {"policy": {"model": "m"}, "loss_type": "apo_zero_unpaired", "loop": {"batch_size": 1}}
    )
    with pytest.raises(InvalidArgument) as e:
        orpo.ORPOConfig.from_dict(
            {"beta": -1.0, "reference": {"model": "r"}, "policy": {"model": "m"}}, prefix="spec"
        )
    assert "spec.reference" in _fields(e)  # reference-free: an unknown field
    with pytest.raises(InvalidArgument) as e:
        orpo.ORPOConfig.from_dict({"beta": -1.0, "policy": {"model": "m"}}, prefix="spec")
    assert _fields(e) == {"spec.beta": "must be > 0"}


# -- the unpaired format -----------------------------------------------------------------------


def test_unpaired_rows_are_validated_with_row_numbers(tmp_path):
    good = {"prompt": "p", "completion": "c", "label": True}
    cases = [
        ({"prompt": "p", "completion": "c"}, "row 2: missing 'label'"),
        ({"completion": "c", "label": False}, "row 2: missing 'prompt'"),
        ({"prompt": "p", "completion": "c", "label": "yes"}, "row 2: 'label' must be true"),
        ({"prompt": "p", "completion": "c", "label": 1}, "row 2: 'label' must be true"),
        ({"prompt": "p", "completion": "", "label": False}, "row 2: 'completion' is empty"),
    ]
    for bad, message in cases:
        rows = [good, bad]
        with pytest.raises(InvalidArgument) as e:
            fmt = datasets.detect_format(rows, "f")
            datasets.validate_rows(rows, fmt, "f")
        assert message in e.value.violations[0].description, (bad, e.value.violations)
    assert datasets.detect_format([good], "f") == "unpaired_preference"
    with pytest.raises(InvalidArgument) as e:
        datasets.validate_rows([good, {"prompt": "p", "label": True}], "unpaired_preference", "f")
    assert "row 2: missing 'completion'" in e.value.violations[0].description


def test_unpaired_batches_pair_each_prompt_with_the_previous_completion(tiny_model, tmp_path):
    from services.runtime.models import load_model

    _, tok = load_model(str(tiny_model))
    rows = [{"prompt": f"question {i}?", "completion": f"answer {i} " * (i + 1),
             "label": i % 2 == 0} for i in range(5)]  # fmt: skip
    path = _jsonl(tmp_path / "u.jsonl", rows)
    data = datasets.prepare({"path": str(path), "valid_fraction": 0.0}, tok,
                            allowed_formats=kto.FORMATS, max_seq_length=64,
                            mask_prompt=True, seed=0)  # fmt: skip
    assert data.format == "unpaired_preference"
    items = data.train
    batch = next(iter(data.batches("train", 4, seed=0, shuffle=False)))
    batch2 = list(data.batches("train", 4, seed=0, shuffle=False))[1]  # 1 real row + 3 empty
    ids, lengths = np.array(batch["kl_inputs"]), np.array(batch["kl_lengths"])
    for k in range(4):
        want = items[k].with_completion_of(items[(k - 1) % 4], 64)
        assert ids[k, : lengths[k]].tolist() == want.tokens[: lengths[k]]
        start = int(np.array(batch["kl_loss_mask"])[k].argmax()) + 1
        assert start == items[k].seq.prompt_len  # the loss covers the other completion
    assert np.array(batch["label"]).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert np.array(batch2["kl_lengths"]).tolist()[1:] == [0, 0, 0]
    assert np.array(batch2["kl_inputs"])[0, : len(items[4].seq.tokens)].tolist() == (
        items[4].seq.tokens  # alone in its batch: its own completion, as TRL's rotation
    )
    # SFT still reads completions that carry some other "label" column.
    other = _jsonl(tmp_path / "o.jsonl", [{"prompt": "p", "completion": "c", "label": "x"}] * 2)
    sft = datasets.prepare({"path": str(other)}, tok, allowed_formats=("completion",),
                           max_seq_length=64, mask_prompt=None, seed=0)  # fmt: skip
    assert sft.format == "completion"


# -- training ----------------------------------------------------------------------------------

GOOD = ["great", "good", "nice", "happy", "love"]
BAD = ["awful", "bad", "sad", "hate", "poor"]
TOPICS = ["the movie", "the food", "the book", "the trip", "the song", "the game", "the show"]


def _ctx(out: Path, reports: list, logs: list, stop_after: int | None = None) -> JobContext:
    ctx = JobContext(job_id="test", output_dir=out, report=reports.append)
    ctx.log = logs.append
    ctx.should_stop = lambda: stop_after is not None and len(reports) >= stop_after
    ctx.resume_from = checkpoints.latest(out)
    return ctx


def _loop(**kw) -> dict:
    return {"batch_size": 8, "max_steps": 16, "steps_per_report": 4, "steps_per_checkpoint": 8,
            "max_seq_length": 64, **kw}  # fmt: skip


def test_kto_trains_resumes_and_loads(tiny_model, tmp_path):
    rng = random.Random(0)
    rows = [
        {"prompt": f"How was {rng.choice(TOPICS)}?",
         "completion": f"It was {rng.choice(GOOD if i % 3 else BAD)}.", "label": bool(i % 3)}
        for i in range(48)
    ]  # fmt: skip
    path = _jsonl(tmp_path / "kto.jsonl", rows)
    cfg = {
        "policy": {"model": str(tiny_model)},
        "dataset": {"path": str(path), "valid_fraction": 0.25},
        "beta": 0.5,
        "optimizer": {"learning_rate": 1e-2, "schedule": "constant"},
        "loop": _loop(),
    }
    out, reports, logs = tmp_path / "kto", [], []
    with pytest.raises(Interrupted):
        kto.run(cfg, _ctx(out, reports, logs, stop_after=2))
    assert any("sequences scored" in m for m in logs)
    assert any(m.startswith("scoring reference log-probs: ") for m in logs)
    logs.clear()
    info = kto.run(cfg, _ctx(out, reports, logs))
    assert any("reusing" in m for m in logs) and any("resumed from" in m for m in logs)
    assert info.step == 16
    trained = [r for r in reports if r.step > 0]
    first, last = trained[0].metrics, trained[-1].metrics
    assert last["train_loss"] < first["train_loss"] - 0.05
    assert last["train_rewards_chosen"] > last["train_rewards_rejected"]
    assert np.isfinite(last["train_kl"]) and last["train_kl"] >= 0
    assert np.isfinite(info.metrics["val_loss"]) and "val_kl" in info.metrics
    assert "val_margins" in info.metrics and "val_ppl" not in info.metrics
    import mlx_lm

    mlx_lm.load(str(tiny_model), adapter_path=str(info.path))


def test_orpo_trains_and_loads(tiny_model, tmp_path):
    rng = random.Random(1)
    rows = [
        {"prompt": f"How was {rng.choice(TOPICS)}?", "chosen": f"It was {rng.choice(GOOD)}.",
         "rejected": f"It was {rng.choice(BAD)}."}
        for _ in range(40)
    ]  # fmt: skip
    path = _jsonl(tmp_path / "prefs.jsonl", rows)
    cfg = {
        "policy": {"model": str(tiny_model)},
        "dataset": {"path": str(path), "valid_fraction": 0.2},
        "method": "full",
        "optimizer": {"learning_rate": 1e-3, "schedule": "constant"},
        "loop": _loop(steps_per_checkpoint=-1),
    }
    reports, logs = [], []
    info = orpo.run(cfg, _ctx(tmp_path / "orpo", reports, logs))
    before = reports[0].metrics  # step 0: the starting policy on the held-out pairs
    first, last = reports[1].metrics, reports[-1].metrics
    assert last["train_loss"] < first["train_loss"] - 0.5
    assert last["train_nll_loss"] < first["train_nll_loss"]
    assert last["train_margins"] > first["train_margins"]
    assert info.metrics["val_accuracies"] > 0.5
    assert info.metrics["val_loss"] < before["val_loss"] and "val_ppl" not in info.metrics
    import mlx_lm

    mlx_lm.load(str(info.path))
