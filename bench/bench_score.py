"""The Score RPC's cost per call: the old path (load the reward checkpoint every call) beside
the service's path now (services.rlhf.scoring: checkpoints kept loaded), on a real model.

    uv run python bench/bench_score.py [--model smollm2-135m-instruct] [--items 16] [--calls 5]

Builds a reward checkpoint (the model plus a fresh value head) under a temp dir, then times
``calls`` Score-sized requests of ``items`` (prompt, completion) pairs each way. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--calls", type=int, default=5)
    a = ap.parse_args()

    from services.rlhf import scoring
    from services.rlhf.trainers import heads
    from services.rlhf.trainers.rewards import score_pairs
    from services.runtime.models import load_model, resolve_model
    from services.runtime.settings import Settings

    s = Settings.from_env("rlhf")
    src = Path(resolve_model(a.model, s.home, s.allowed_roots))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "reward"
        shutil.copytree(src, ckpt)
        lm, _ = load_model(str(ckpt))
        heads.attach_head(lm, seed=0)
        heads.save_head(lm, ckpt, "reward")
        del lm
        items = [
            (f"Review {i}: what did you think of the film?", "It was " + "quite good " * (i % 5))
            for i in range(a.items)
        ]

        def timed(fn) -> list[float]:
            out = []
            for _ in range(a.calls):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
            return out

        reload = timed(lambda: score_pairs(ckpt, items))
        cache = scoring.ScorerCache()
        cached = timed(lambda: scoring.score(cache, str(ckpt), items, max_tokens=8192))
        print(
            json.dumps(
                {
                    "model": a.model,
                    "items_per_call": a.items,
                    "calls": a.calls,
                    "reload_each_call_s": [round(x, 3) for x in reload],
                    "cached_s": [round(x, 3) for x in cached],
                    "loads_cached": cache.loads,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
