"""The real RLHF service on loopback: reward model + Score, DPO, PPO (with kill -9 resume)."""

from __future__ import annotations

import os
import random
import signal

import grpc
import pytest

from mlx_unified.v1 import common_pb2, generation_pb2, rlhf_pb2, rlhf_pb2_grpc
from tests.conftest import write_jsonl
from tests.integration.helpers import Stubs, violations
from tests.integration.test_resume import worker_pids

GOOD = ["great", "wonderful", "lovely", "excellent", "superb", "delightful"]
BAD = ["awful", "terrible", "dreadful", "horrible", "boring", "miserable"]
TOPICS = ["the film", "the meal", "the trip", "the book", "the concert", "the game"]


def preferences(n: int = 64, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt": f"How was {rng.choice(TOPICS)}?",
            "chosen": f"It was {rng.choice(GOOD)}.",
            "rejected": f"It was {rng.choice(BAD)}.",
        }
        for _ in range(n)
    ]


def loop(steps: int, **kw) -> common_pb2.LoopConfig:
    base = dict(batch_size=8, max_steps=steps, steps_per_report=1, max_seq_length=64, seed=0)
    return common_pb2.LoopConfig(**{**base, **kw})


def const_lr(lr: float, **kw) -> common_pb2.OptimizerConfig:
    return common_pb2.OptimizerConfig(
        learning_rate=lr, schedule=common_pb2.LR_SCHEDULE_CONSTANT, **kw
    )


@pytest.fixture
def rlhf(serve):
    srv = serve("rlhf")
    stubs = Stubs(srv.address)
    yield rlhf_pb2_grpc.RLHFServiceStub(stubs.channel), stubs
    stubs.close()


def progress(events, key: str) -> list[float]:
    return [
        e.progress.metrics[key]
        for e in events
        if e.WhichOneof("payload") == "progress" and key in e.progress.metrics
    ]


def test_reward_model_separates_and_scores(rlhf, tiny_model, tmp_path):
    stub, stubs = rlhf
    data = write_jsonl(tmp_path / "prefs.jsonl", preferences())
    spec = rlhf_pb2.RewardModelSpec(
        model=common_pb2.ModelRef(model=str(tiny_model)),
        dataset=common_pb2.DatasetRef(path=str(data), valid_fraction=0.25),
        method=common_pb2.FINETUNE_METHOD_FULL,
        optimizer=const_lr(1e-3),
        loop=loop(25),
        center_rewards_coef=0.01,
    )
    job = stub.StartRewardModel(rlhf_pb2.StartRewardModelRequest(spec=spec), timeout=120).job
    final, events = stubs.wait(job.job_id)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    metrics = dict(final.result.metrics)
    assert "val_accuracy" in metrics and metrics["val_accuracy"] > 0.9, metrics
    held_out = preferences(16, seed=99)
    items = [
        generation_pb2.PromptCompletion(prompt=r["prompt"], completion=c)
        for r in held_out
        for c in (r["chosen"], r["rejected"])
    ]
    scores = stub.Score(
        rlhf_pb2.ScoreRequest(
            reward_model=common_pb2.ModelRef(model=final.result.path), items=items
        ),
        timeout=120,
    ).scores
    wins = sum(scores[2 * i] > scores[2 * i + 1] for i in range(len(held_out)))
    assert wins >= 14, scores


def test_dpo_uses_the_policy_as_reference_and_raises_accuracy(rlhf, tiny_model, tmp_path):
    stub, stubs = rlhf
    data = write_jsonl(tmp_path / "prefs.jsonl", preferences())
    spec = rlhf_pb2.DPOSpec(
        policy=common_pb2.ModelRef(model=str(tiny_model)),
        dataset=common_pb2.DatasetRef(path=str(data), valid_fraction=0.25),
        method=common_pb2.FINETUNE_METHOD_LORA,
        lora=common_pb2.LoraConfig(rank=8, num_layers=-1),
        optimizer=const_lr(1e-3),
        loop=loop(20),
        beta=0.1,
    )
    job = stub.StartDPO(rlhf_pb2.StartDPORequest(spec=spec), timeout=120).job
    assert job.resolved_config["reference"]["model"] == str(tiny_model)
    final, events = stubs.wait(job.job_id)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    acc = progress(events, "train_accuracies")
    assert sum(acc[-5:]) / 5 > sum(acc[:3]) / 3, acc
    metrics = dict(final.result.metrics)
    assert "val_accuracies" in metrics and metrics["val_accuracies"] >= 0.75, metrics
    # Held-out accuracy and margins are measured on the validation pairs from step 0 (policy
    # == reference: margins 0), labelled val_; batch figures are train_; no perplexity.
    reports = [e.progress for e in events if e.WhichOneof("payload") == "progress"]
    assert reports[0].step == 0 and "train_loss" not in reports[0].metrics
    assert reports[0].metrics["val_margins"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["val_accuracies"] > reports[0].metrics["val_accuracies"]
    assert not any("val_ppl" in r.metrics or "accuracies" in r.metrics for r in reports)
    # tokens, not pairs: 20 steps of 8 pairs put well over 20 * 8 * 2 * 4 tokens through.
    assert reports[-1].tokens > 20 * 8 * 2 * 4 and reports[-1].metrics["tokens_per_second"] > 100


def ppo_spec(model, data, steps: int, ckpt_every: int = 100) -> rlhf_pb2.PPOSpec:
    return rlhf_pb2.PPOSpec(
        policy=common_pb2.ModelRef(model=str(model)),
        dataset=common_pb2.DatasetRef(path=str(data)),
        reward=rlhf_pb2.RewardSource(reward_function="token_count:!"),
        method=common_pb2.FINETUNE_METHOD_FULL,
        optimizer=const_lr(1e-2),
        loop=loop(steps, steps_per_checkpoint=ckpt_every),
        rollout=rlhf_pb2.RolloutConfig(
            batch_size=16, sampling=generation_pb2.SamplingParams(max_tokens=16, temperature=1.0)
        ),
        minibatch_size=8,
        ppo_epochs=2,
        init_kl_coef=0.01,
        adaptive_kl=True,
    )


def test_ppo_raises_a_toy_reward_and_resumes_after_kill9(rlhf, tiny_model, tmp_path):
    stub, stubs = rlhf
    words = ["cats", "dogs", "birds", "fish", "trees", "rain", "snow", "sun", "moon", "stars"]
    words += ["tea", "bread", "music", "books", "roads", "hills"]
    data = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about {w}."} for w in words]
    )
    job = stub.StartPPO(
        rlhf_pb2.StartPPORequest(spec=ppo_spec(tiny_model, data, 12, 3)), timeout=120
    ).job
    for resp in stubs.watch(job.job_id):
        if resp.event.WhichOneof("payload") == "checkpoint":
            break
    for pid in worker_pids(job.job_id):
        os.kill(pid, signal.SIGKILL)
    final, events = stubs.wait(job.job_id)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.attempts == 2
    steps = [e.progress.step for e in events if e.WhichOneof("payload") == "progress"]
    assert steps[-1] == 12 and steps.count(1) == 1  # the second attempt did not start over
    reward = progress(events, "reward_mean")
    assert sum(reward[-3:]) / 3 > sum(reward[:2]) / 2 + 1.0, reward
    assert "kl_coef" in final.metrics


def test_bad_rlhf_input_is_rejected(rlhf, tiny_model, tmp_path):
    stub, stubs = rlhf
    missing = write_jsonl(tmp_path / "m.jsonl", [preferences(1)[0], {"prompt": "p", "chosen": "a"}])
    same = write_jsonl(
        tmp_path / "s.jsonl", [preferences(1)[0], {"prompt": "p", "chosen": "x", "rejected": "x"}]
    )
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"hi {i}"} for i in range(16)])
    one_prompt = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "hi"}])

    def dpo(path):
        return rlhf_pb2.StartDPORequest(
            spec=rlhf_pb2.DPOSpec(
                policy=common_pb2.ModelRef(model=str(tiny_model)),
                dataset=common_pb2.DatasetRef(path=str(path)),
            )
        )

    for req, field, text in [
        (dpo(missing), "spec.dataset.path", "row 2"),
        (dpo(same), "spec.dataset.path", "row 2"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            stub.StartDPO(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert text in violations(err.value).get(field, ""), violations(err.value)
    no_reward = ppo_spec(tiny_model, prompts, 2)
    no_reward.ClearField("reward")
    no_head = ppo_spec(tiny_model, prompts, 2)
    no_head.reward.Clear()
    no_head.reward.reward_model.model = str(tiny_model)
    too_big = ppo_spec(tiny_model, one_prompt, 2)  # 16 prompts a rollout, 1 in the file
    cases = [
        (no_reward, "spec.reward"),
        (no_head, "spec.reward.reward_model.model"),
        (too_big, "spec.rollout.batch_size"),
    ]
    for spec, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.StartPPO(rlhf_pb2.StartPPORequest(spec=spec))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in violations(err.value), violations(err.value)
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(
            rlhf_pb2.ScoreRequest(
                reward_model=common_pb2.ModelRef(model=str(tiny_model)),
                items=[generation_pb2.PromptCompletion(prompt="a")],
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(stubs.jobs.ListJobs(common_pb2.ListJobsRequest()).jobs) == []
