"""RLHF trainers on a tiny random llama (fp32, CPU): heads, rollouts, reward functions,
validation, and short real training runs of the reward model, DPO, PPO and GRPO."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import services  # noqa: F401  (BLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

from services.rlhf import validate
from services.rlhf.trainers import heads, rewards
from services.rlhf.trainers.rollout import RolloutRNG, RolloutSampling, generate, pack
from services.runtime import checkpoints
from services.runtime.contract import Interrupted, JobContext
from services.runtime.errors import InvalidArgument
from services.runtime.models import load_model

GOOD = ["great", "good", "nice", "happy", "love"]
BAD = ["awful", "bad", "sad", "hate", "poor"]
TOPICS = ["the movie", "the food", "the book", "the trip", "the song", "the game", "the show"]
WORDS = ["cats", "dogs", "birds", "fish", "trees", "rain", "snow", "sun", "moon", "stars"]
WORDS += ["tea", "bread", "music", "books", "roads", "hills"]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    """Separable preferences: the chosen answer has a positive word, the rejected a negative."""
    rng = random.Random(0)
    rows = [
        {
            "prompt": f"How was {rng.choice(TOPICS)}?",
            "chosen": f"It was {rng.choice(GOOD)}.",
            "rejected": f"It was {rng.choice(BAD)}.",
        }
        for _ in range(64)
    ]
    return _jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", rows)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    rows = [{"prompt": f"Say something about {w}."} for w in WORDS]
    return _jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(str(tiny_model))


def _ctx(out: Path, reports: list, stop_after: int | None = None, logs: list | None = None):
    ctx = JobContext(job_id="test", output_dir=out, report=reports.append)
    ctx.log = (logs if logs is not None else []).append
    ctx.should_stop = lambda: stop_after is not None and len(reports) >= stop_after
    ctx.resume_from = checkpoints.latest(out)
    return ctx


# -- heads -------------------------------------------------------------------------------------


def test_head_shares_the_trunk_and_reads_the_last_token(tiny_model, tmp_path):
    lm, _ = load_model(str(tiny_model))
    heads.attach_head(lm, seed=1)
    x = mx.array([[5, 6, 7, 8], [9, 10, 0, 0]])
    logits, values = heads.logits_and_values(lm, x)
    assert mx.allclose(logits, lm(x), atol=1e-5).item()
    r = heads.rewards(lm, x, mx.array([4, 2]))
    np.testing.assert_allclose(np.array(r), [values[0, 3].item(), values[1, 1].item()])
    heads.save_head(lm, tmp_path, "reward")
    assert heads.head_metadata(tmp_path)["mlxu_head"] == "reward"
    other, _ = load_model(str(tiny_model))
    assert heads.load_head(other, tmp_path) == "reward"
    np.testing.assert_allclose(np.array(heads.values(other, x)), np.array(values), atol=1e-6)
    assert heads.head_metadata(tiny_model) is None


# -- rollouts ----------------------------------------------------------------------------------


def test_batched_rollout_matches_single_prompts_and_forward_logprobs(lm):
    model, _ = lm
    prompts = [[1, 20, 30, 40, 50], [1, 60], [70]]
    greedy = RolloutSampling(max_tokens=6, temperature=0.0)
    both = generate(model, prompts, greedy, mx.random.key(0), eos_ids=frozenset())
    for i, p in enumerate(prompts):
        one = generate(model, [p], greedy, mx.random.key(0), eos_ids=frozenset())
        assert one.completion_ids[0] == both.completion_ids[i]
    sampled = generate(
        model, prompts, RolloutSampling(max_tokens=6), mx.random.key(3), eos_ids=set()
    )
    arrays = pack(sampled.prompt_ids, sampled.completion_ids, pad_id=0)
    logits = model(arrays["inputs"]).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logp, arrays["targets"][..., None], axis=-1)[..., 0]
    for r, (p, lp) in enumerate(zip(prompts, sampled.logprobs, strict=True)):
        want = np.array(picked[r, len(p) - 1 : len(p) - 1 + len(lp)])
        np.testing.assert_allclose(lp, want, atol=1e-4)


def test_rollout_rng_resumes_the_same_stream_and_stops_at_eos(lm):
    model, _ = lm
    s = RolloutSampling(max_tokens=8)
    a = RolloutRNG(7)
    first = generate(model, [[1, 2, 3]] * 3, s, a.next(), eos_ids=set())
    saved = a.state()
    second = generate(model, [[1, 2, 3]] * 3, s, a.next(), eos_ids=set())
    b = RolloutRNG(0)
    b.restore(json.loads(json.dumps(saved)))
    again = generate(model, [[1, 2, 3]] * 3, s, b.next(), eos_ids=set())
    assert again.completion_ids == second.completion_ids != first.completion_ids
    eos = first.completion_ids[0][2]
    cut = generate(model, [[1, 2, 3]] * 3, s, RolloutRNG(7).next(), eos_ids={eos})
    assert cut.completion_ids[0] == first.completion_ids[0][:3] and cut.finished[0]


# -- reward functions --------------------------------------------------------------------------


def test_builtin_reward_functions(lm):
    _, tok = lm
    bang = tok.encode("!", add_special_tokens=False)[0]
    ids = [[bang, 5, bang], [5, 6]]
    texts = ["!x!", "hello world"]
    count = rewards.parse_reward_function("token_count:!", tok, "f")
    assert count([None, None], ids, texts) == [2.0, 0.0]
    assert rewards.parse_reward_function(f"token_count:{bang}", tok, "f")([0, 0], ids, texts) == [
        2.0,
        0.0,
    ]
    assert rewards.parse_reward_function("length", tok, "f")([0, 0], ids, texts) == [3.0, 2.0]
    contains = rewards.parse_reward_function("contains:world", tok, "f")
    assert contains([0, 0], ids, texts) == [0.0, 1.0]
    for bad in ("unknown", "token_count:", "length:3"):
        with pytest.raises(InvalidArgument, match="unknown reward function"):
            rewards.parse_reward_function(bad, tok, "spec.reward.reward_function")
    with pytest.raises(InvalidArgument, match="tokens for this tokenizer"):
        rewards.parse_reward_function("token_count:a long phrase", tok, "f")


# -- validation --------------------------------------------------------------------------------


def _fields(exc: pytest.ExceptionInfo) -> dict[str, str]:
    return {v.field: v.description for v in exc.value.violations}


def test_validation_names_bad_rows(tmp_path, tiny_model):
    base = {"policy": {"model": str(tiny_model)}}
    missing = _jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2)
    missing.write_text(missing.read_text() + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(InvalidArgument) as e:
        validate.check("dpo", {**base, "dataset": {"path": str(missing)}})
    assert "row 3: missing 'rejected'" in _fields(e)["spec.dataset.path"]
    same = _jsonl(
        tmp_path / "s.jsonl",
        [
            {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "x", "rejected": "x"},
        ],
    )
    with pytest.raises(InvalidArgument) as e:
        validate.check(
            "reward_model", {"model": {"model": str(tiny_model)}, "dataset": {"path": str(same)}}
        )
    assert "row 2: 'chosen' and 'rejected' are identical" in _fields(e)["spec.dataset.path"]


def test_validation_of_fields(tmp_path, tiny_model, prefs, prompts):
    pol = {"policy": {"model": str(tiny_model)}}
    with pytest.raises(InvalidArgument) as e:
        validate.check("dpo", {**pol, "dataset": {"path": str(prefs)}, "beta": -0.1, "loss": "kto"})
    f = _fields(e)
    assert f["spec.beta"] == "must be > 0" and "spec.loss" in f
    with pytest.raises(InvalidArgument) as e:
        validate.check(
            "dpo", {**pol, "dataset": {"path": str(prefs)}, "loss": "ipo", "label_smoothing": 0.1}
        )
    assert "not ipo" in _fields(e)["spec.label_smoothing"]
    validate.check("dpo", {**pol, "dataset": {"path": str(prefs)}, "loss": "DPO_LOSS_ROBUST"})

    ppo = {**pol, "dataset": {"path": str(prompts)}}
    with pytest.raises(InvalidArgument) as e:
        validate.check("ppo", ppo)
    assert "reward model" in _fields(e)["spec.reward"]
    with pytest.raises(InvalidArgument) as e:
        validate.check("ppo", {**ppo, "reward": {"reward_model": {"model": str(tiny_model)}}})
    assert "no value head" in _fields(e)["spec.reward.reward_model.model"]
    with pytest.raises(InvalidArgument) as e:
        validate.check("grpo", {**ppo, "reward": {"reward_function": "length"}, "group_size": 1})
    assert "spec.group_size" in _fields(e)
    with pytest.raises(InvalidArgument) as e:
        validate.check(
            "ppo",
            {
                **ppo,
                "reward": {"reward_function": "length"},
                "rollout": {"endpoint": "h:1", "sync_every": 4, "max_staleness": 2},
                "resources": {"num_processes": 2},
            },
        )
    assert {"spec.rollout.max_staleness", "spec.rollout.remote"} <= set(_fields(e))
    validate.check("ppo", {**ppo, "reward": {"reward_function": "token_count:!"}})
    with pytest.raises(InvalidArgument):
        validate.check_score({"model": str(tiny_model)})


# -- trainers ----------------------------------------------------------------------------------


def test_reward_model_learns_separable_preferences(tiny_model, prefs, tmp_path):
    from services.rlhf.trainers import reward_model

    cfg = {
        "model": {"model": str(tiny_model)},
        "dataset": {"path": str(prefs), "valid_fraction": 0.25},
        "method": "full",
        "optimizer": {"learning_rate": 1e-3, "schedule": "constant"},
        "loop": {"batch_size": 8, "max_steps": 25, "steps_per_report": 5, "max_seq_length": 64},
        "center_rewards_coef": 0.01,
    }
    reports: list = []
    info = reward_model.run(cfg, _ctx(tmp_path / "rm", reports))
    trained = [r for r in reports if r.step > 0]
    assert trained[0].metrics["train_accuracy"] < trained[-1].metrics["train_accuracy"]
    # Held-out accuracy is measured before training (step 0) and at the end.
    assert reports[0].step == 0 and "val_accuracy" in reports[0].metrics
    assert info.metrics["val_accuracy"] > reports[0].metrics["val_accuracy"]
    assert info.metrics["val_accuracy"] > 0.9
    assert info.metrics["val_margin"] > 0
    assert heads.head_metadata(info.path)["mlxu_head"] == "reward"
    validate.check_score({"model": str(info.path)})
    import mlx_lm

    mlx_lm.load(str(info.path))  # the LM files stay a plain mlx-lm model
    scores = rewards.score_pairs(
        info.path,
        [("How was the game?", "It was nice."), ("How was the game?", "It was poor.")],
    )
    assert scores[0] > scores[1]


def test_dpo_raises_chosen_over_rejected_and_reuses_reference_cache(
    tiny_model, prefs, tmp_path, monkeypatch
):
    from services.rlhf.trainers import dpo
    from services.runtime import phases

    monkeypatch.setattr(phases, "EVERY_S", 0.0)  # a progress line per batch scored

    cfg = {
        "policy": {"model": str(tiny_model)},
        "dataset": {"path": str(prefs), "valid_fraction": 0.25},
        "method": "lora",
        "beta": 0.1,
        "optimizer": {"learning_rate": 1e-3, "schedule": "constant"},
        "loop": {
            "batch_size": 8,
            "max_steps": 20,
            "steps_per_report": 5,
            "steps_per_checkpoint": 5,
            "max_seq_length": 64,
        },
    }
    out = tmp_path / "dpo"
    reports: list = []
    logs: list = []
    with pytest.raises(Interrupted):
        dpo.run(cfg, _ctx(out, reports, stop_after=2, logs=logs))
    assert (out / dpo.CACHE_FILE).is_file()
    assert any("answers scored" in m for m in logs)
    # Scoring says how far it got while it runs (64 pairs: 128 answers, 16 a batch).
    assert "scoring reference log-probs: 128 answers" in logs
    progress = "scoring reference log-probs: 16/128 answers (12%)"
    assert any(m.startswith(progress) for m in logs), logs
    logs.clear()
    info = dpo.run(cfg, _ctx(out, reports, logs=logs))
    assert any("reusing" in m for m in logs)
    assert any("resumed from" in m for m in logs)
    assert info.step == 20
    for key in ("rewards_chosen", "rewards_rejected", "accuracies", "margins", "logps_chosen"):
        assert f"train_{key}" in reports[-1].metrics and key not in reports[-1].metrics
    # Held-out accuracy and margins are measured on the validation pairs at every eval; at
    # step 0 policy == reference: every implicit reward is 0, the loss log(2), margins 0.
    assert reports[0].step == 0
    assert reports[0].metrics["val_loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert reports[0].metrics["val_margins"] == pytest.approx(0.0, abs=1e-5)
    assert "val_ppl" not in info.metrics
    # tokens_per_second counts tokens (both answers of each pair), not pairs.
    assert reports[-1].tokens > 20 * 8 * 2
    assert info.metrics["val_accuracies"] > 0.9
    assert info.metrics["val_margins"] > 0
    assert info.metrics["val_loss"] < np.log(2) - 0.02
    import mlx_lm

    mlx_lm.load(str(tiny_model), adapter_path=str(info.path))


def _rl_cfg(tiny_model, prompts, **kw) -> dict:
    cfg = {
        "policy": {"model": str(tiny_model)},
        "dataset": {"path": str(prompts)},
        "reward": {"reward_function": "token_count:!"},
        "method": "full",
        "optimizer": {"learning_rate": 1e-2, "schedule": "constant"},
        "rollout": {"batch_size": 8, "sampling": {"max_tokens": 16}},
        "loop": {"max_steps": 12, "steps_per_report": 1, "steps_per_checkpoint": 100},
    }
    cfg.update(kw)
    return cfg


def test_ppo_raises_a_token_count_reward(tiny_model, prompts, tmp_path):
    from services.rlhf.trainers import ppo

    # A random tiny llama samples ~uniformly from 512 tokens: 16 x 16 tokens a step find the
    # rewarded one about every other step, and PPO takes it from there.
    cfg = _rl_cfg(
        tiny_model,
        prompts,
        init_kl_coef=0.01,
        minibatch_size=8,
        ppo_epochs=2,
        rollout={"batch_size": 16, "sampling": {"max_tokens": 16}},
    )
    reports: list = []
    info = ppo.run(cfg, _ctx(tmp_path / "ppo", reports))
    reward = [r.metrics["reward_mean"] for r in reports]
    m = reports[-1].metrics
    for key in ("kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "value_loss", "returns_mean"):
        assert np.isfinite(m[key])
    assert {"time_generation", "time_scoring", "time_update"} <= set(m)
    assert np.mean(reward[-3:]) > np.mean(reward[:3]) + 2.0
    assert heads.head_metadata(info.path)["mlxu_head"] == "value"


def test_ppo_first_minibatch_sees_ratio_one(tiny_model, prompts, tmp_path):
    """Old log-probs and values come from the same forward as the update's: the first
    minibatch of a step moves nothing yet (no clipping, zero approx KL)."""
    from services.rlhf.trainers import ppo

    cfg = _rl_cfg(tiny_model, prompts, ppo_epochs=1, minibatch_size=8)
    cfg["loop"] = {**cfg["loop"], "max_steps": 1}
    reports: list = []
    ppo.run(cfg, _ctx(tmp_path / "ppo1", reports))
    assert reports[0].metrics["approx_kl"] < 1e-8
    assert reports[0].metrics["clipfrac"] == 0.0


def test_ppo_resume_continues_exactly(tiny_model, prompts, tmp_path):
    from services.rlhf.trainers import ppo

    cfg = _rl_cfg(
        tiny_model,
        prompts,
        method="lora",
        adaptive_kl=True,
        kl_target=1.0,
        kl_horizon=100,
        minibatch_size=2,
        ppo_epochs=2,
        rollout={"batch_size": 4, "sampling": {"max_tokens": 8}},
    )
    cfg["loop"] = {**cfg["loop"], "max_steps": 6}
    whole: list = []
    ppo.run(cfg, _ctx(tmp_path / "a", whole))
    parts: list = []
    with pytest.raises(Interrupted):
        ppo.run(cfg, _ctx(tmp_path / "b", parts, stop_after=3))
    saved = checkpoints.latest(tmp_path / "b")
    state = json.loads((saved / "trainer_state" / "state.json").read_text())
    stopped = len(parts)
    assert state["step"] == stopped
    assert state["extra"]["kl"]["value"] != 0.2  # the controller moved and was saved
    logs: list = []
    ppo.run(cfg, _ctx(tmp_path / "b", parts, logs=logs))
    assert any(f"at step {stopped}" in m for m in logs)
    assert [r.step for r in parts] == [r.step for r in whole] == list(range(1, 7))
    for a, b in zip(whole, parts, strict=True):
        assert a.metrics["kl_coef"] == pytest.approx(b.metrics["kl_coef"], rel=1e-6)
        assert a.metrics["loss"] == pytest.approx(b.metrics["loss"], rel=1e-4, abs=1e-6)
        assert a.metrics["reward_mean"] == b.metrics["reward_mean"]


def test_grpo_raises_a_token_count_reward(tiny_model, prompts, tmp_path):
    from services.rlhf.trainers import grpo

    # k3's exp(ref - logp) makes raw GRPO gradients spiky: clip them, as one would in practice.
    # beta > 0 (TRL's default is 0) so that the reference path is exercised too.
    # 1e-2: with torch's bias-corrected Adam the first updates are smaller than they were.
    opt = {"learning_rate": 1e-2, "schedule": "constant", "grad_clip_norm": 1.0}
    cfg = _rl_cfg(tiny_model, prompts, group_size=4, beta=0.04, optimizer=opt)
    cfg["loop"] = {**cfg["loop"], "batch_size": 16}
    reports: list = []
    info = grpo.run(cfg, _ctx(tmp_path / "grpo", reports))
    reward = [r.metrics["reward_mean"] for r in reports]
    assert np.mean(reward[-3:]) > np.mean(reward[:3]) + 2.0
    assert np.isfinite(reports[-1].metrics["kl"])
    assert not (info.path / heads.HEAD_FILE).exists()


def test_grpo_defaults_are_trl_grpo_config():
    from services.rlhf.trainers.grpo import GRPOConfig

    base = {"policy": {"model": "m"}, "reward": {"reward_function": "length"}}
    c = GRPOConfig.from_dict(base)
    # trl 1.16 GRPOConfig: num_generations 8, beta 0.0, epsilon 0.2, loss_type "dapo",
    # scale_rewards "group", num_iterations 1.
    assert (c.group_size, c.beta, c.clip_range) == (8, 0.0, 0.2)
    assert (c.loss_type, c.scale_rewards, c.num_iterations) == ("dapo", "group", 1)
    # beta 0 is a value, not "unset" (it used to become 0.04, and loaded a reference)
    assert GRPOConfig.from_dict({**base, "beta": 0.0}).beta == 0.0
    with pytest.raises(InvalidArgument):
        GRPOConfig.from_dict({**base, "loss_type": "sapo"})


def test_grpo_iterations_reuse_one_split_and_record_every_update(tiny_model, prompts, tmp_path):
    """num_iterations passes over the same minibatches (TRL reuses its buffered split), and
    the recording hook sees every update with the rows it consumed."""
    from services.rlhf.trainers import grpo
    from services.rlhf.trainers.rollout import RECORD

    cfg = _rl_cfg(tiny_model, prompts, group_size=2, num_iterations=2,
                  rollout={"batch_size": 2, "sampling": {"max_tokens": 4}})  # fmt: skip
    cfg["loop"] = {**cfg["loop"], "max_steps": 1, "batch_size": 2}
    events: list = []
    ctx = _ctx(tmp_path / "g", [])
    ctx.extra[RECORD] = events.append
    grpo.run(cfg, ctx)
    assert [e["event"] for e in events] == ["start", "step"]
    assert "model.embed_tokens.weight" in events[0]["params"]  # full fine-tuning
    rows = [sorted(idx.tolist()) for idx, _ in events[1]["updates"]]
    assert len(rows) == 4 and rows[:2] == rows[2:]
    assert sorted(rows[0] + rows[1]) == [0, 1, 2, 3]
    # dapo: the rollout batch's tokens over its 2 minibatches
    assert float(events[1]["normalizer"]) == pytest.approx(events[1]["mask"].sum() / 2)


def test_ppo_lr_schedule_steps_once_per_iteration():
    """TRL's PPOTrainer steps its scheduler once per rollout batch: every minibatch update of
    iteration k uses transformers' warmup + cosine factor of k."""
    import mlx.nn as nn

    from services.rlhf.trainers.ppo import schedule_per_iteration
    from services.runtime.optim import OptimizerSettings, build_optimizer

    iterations, updates, warmup, lr = 6, 3, 2, 1e-2
    s = OptimizerSettings.from_dict(
        {"learning_rate": lr, "schedule": "cosine", "warmup_steps": warmup}
    )
    opt = build_optimizer(s, iterations * updates)
    schedule_per_iteration(opt, s, iterations, updates)
    layer = nn.Linear(2, 1)
    opt.init(layer.trainable_parameters())
    seen = []
    for _ in range(iterations * updates):
        grads = {k: mx.ones_like(v) for k, v in layer.trainable_parameters().items()}
        opt.update(layer, grads)
        seen.append(opt.learning_rate.item())

    def factor(k: int) -> float:  # transformers' get_cosine_schedule_with_warmup
        if k < warmup:
            return k / warmup
        return 0.5 * (1 + math.cos(math.pi * (k - warmup) / (iterations - warmup)))

    want = [lr * factor(u // updates) for u in range(iterations * updates)]
    np.testing.assert_allclose(seen, want, rtol=1e-5, atol=1e-9)
