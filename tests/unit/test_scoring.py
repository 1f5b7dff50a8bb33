"""The Score RPC's work: reward checkpoints stay loaded, long items are refused by name, a
passed deadline stops between batches."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from services.runtime.errors import InvalidArgument


@pytest.fixture(scope="module")
def reward_ckpt(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.rlhf.trainers import heads
    from services.runtime.models import load_model

    out = tmp_path_factory.mktemp("rm") / "reward"
    shutil.copytree(tiny_model, out)
    lm, _ = load_model(str(out))
    heads.attach_head(lm, seed=0)
    heads.save_head(lm, out, "reward")
    return out


def test_scorers_are_cached_and_scores_match_the_uncached_path(reward_ckpt: Path):
    from services.rlhf import scoring
    from services.rlhf.trainers.rewards import score_pairs

    cache = scoring.ScorerCache()
    items = [("Hi", "hello there"), ("Hi", "go away"), ("2+2?", "4")] * 4
    first = scoring.score(cache, str(reward_ckpt), items, max_tokens=512, batch_size=5)
    again = scoring.score(cache, str(reward_ckpt), items, max_tokens=512)
    assert cache.loads == 1
    assert first == pytest.approx(again, abs=1e-5)
    assert first == pytest.approx(score_pairs(reward_ckpt, items), abs=1e-5)
    assert len(set(round(x, 6) for x in first[:3])) == 3  # a real head: different texts differ


def test_long_items_are_refused_by_name_and_deadlines_stop(reward_ckpt: Path):
    from services.rlhf import scoring

    cache = scoring.ScorerCache()
    items = [("Hi", "short"), ("Hi", "word " * 400)]
    with pytest.raises(InvalidArgument) as e:
        scoring.score(cache, str(reward_ckpt), items, max_tokens=64)
    assert e.value.violations[0].field == "items[1]"
    assert "at most 64" in e.value.violations[0].description
    with pytest.raises(scoring.Stopped, match="deadline"):
        scoring.score(
            cache, str(reward_ckpt), items[:1], max_tokens=64, should_stop=lambda: "deadline"
        )
