"""Rollout backends without servers: the openai answer formats, the staleness bound (re-sample,
then refuse), and the policy versions on disk (atomic, pruned, resumed)."""

from __future__ import annotations

import math

import pytest

from services.rlhf.trainers.rollout_backends import Samples, parse_logprobs


def test_parse_logprobs_reads_mlx_lm_and_vllm_answers() -> None:
    mlx = {"content": [{"id": 7, "logprob": -1.5}, {"id": 2, "logprob": -0.25}]}
    assert parse_logprobs(mlx) == ([7, 2], [-1.5, -0.25])
    vllm = {"tokens": ["token_id:7", "token_id:2"], "token_logprobs": [-1.5, None]}
    ids, lps = parse_logprobs(vllm)
    assert ids == [7, 2] and lps[0] == -1.5 and math.isnan(lps[1])


class _Lagging:
    """A backend whose answers come from a policy version ``lag`` steps old, ``bad`` times."""

    name = "fake"

    def __init__(self, lag: int, bad: int) -> None:
        self.lag, self.bad, self.calls = lag, bad, 0

    def sample(self, prompts, group, key, step) -> Samples:  # noqa: ANN001
        self.calls += 1
        lag = self.lag if self.calls <= self.bad else 0
        n = len(prompts) * group
        return Samples([[5, 6]] * n, [[-1.0, -2.0]] * n, [False] * n, step - lag)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def policy(tiny_model):  # noqa: ANN001, ANN201
    from services.rlhf.trainers import load_policy
    from services.schema.common import LoraSettings, ModelSettings

    return load_policy(ModelSettings(model=str(tiny_model)), "lora", LoraSettings(), "float32")


def test_stale_rollouts_are_resampled_then_refused(policy) -> None:  # noqa: ANN001
    from services.rlhf.trainers.rollout import RolloutRNG, StaleRollouts, sample
    from services.schema.rollouts import RolloutSettings

    settings = RolloutSettings.rehydrate({"sync_every": 2, "max_staleness": 1})
    batch = {"tokens": [[1, 2, 3]], "prompts": ["p"]}
    flaky = _Lagging(lag=3, bad=2)
    got = sample(policy, settings, RolloutRNG(0), batch, 2, None, flaky, step=5)
    assert flaky.calls == 3 and got.version == 5
    assert got.rollout.completion_ids == [[5, 6], [5, 6]]
    with pytest.raises(StaleRollouts, match="3 steps behind step 5; rollout.max_staleness is 1"):
        sample(policy, settings, RolloutRNG(0), batch, 2, None, _Lagging(3, 99), step=5)


def test_policy_versions_are_atomic_pruned_and_resumed(policy, tmp_path) -> None:  # noqa: ANN001
    from services.rlhf.trainers.policy_versions import PolicyVersions

    v = PolicyVersions(tmp_path, policy, sync_every=2)
    assert [v.at(s).step for s in range(5)] == [0, 0, 2, 2, 4]
    names = sorted(p.name for p in (tmp_path / "policy").iterdir())
    assert names == ["step_0000002", "step_0000004"]  # the newest two, no temp dirs left
    assert (tmp_path / "policy" / "step_0000004" / "adapter_config.json").is_file()
    # A resumed attempt at step 3: step 4 is the killed attempt's future; 2 is reused.
    again = PolicyVersions(tmp_path, policy, sync_every=2)
    mtime = (tmp_path / "policy" / "step_0000002" / "manifest.json").stat().st_mtime_ns
    assert again.at(3).step == 2
    assert not (tmp_path / "policy" / "step_0000004").exists()
    assert (tmp_path / "policy" / "step_0000002" / "manifest.json").stat().st_mtime_ns == mtime
