"""RLHF speed and memory (DPO, PPO), and a small real check (reward model + DPO on reviews).

    uv run python bench/bench_rlhf.py                        # CPU defaults: every part
    uv run python bench/bench_rlhf.py --parts dpo --models smollm2 --steps 10
    uv run python bench/bench_rlhf.py --parts real --rm-steps 40 --dpo-steps 40

Part "dpo": services.rlhf.trainers.dpo.run (sigmoid loss, LoRA) with the reference
log-probs precomputed (``precompute_reference: true``, the default: the reference scores
every pair once before training and is freed) and live (``false``: the reference stays
loaded and scores every batch). Rows are preference pairs cut from the repository's text:
a short prompt and two different answers, every sequence exactly ``--seq-len`` tokens.

Part "ppo": services.rlhf.trainers.ppo.run (LoRA policy with its value head, frozen
reference) on review prompts, rewarded by a reward checkpoint (the model with a random
scalar head: scoring costs a real reward-model forward) or, with ``--ppo-reward length``,
a built-in function. Reported from the trainer's own per-step metrics ``time_generation``,
``time_scoring`` (reward + policy / reference / value passes + GAE) and ``time_update``.

Part "real": the RLHF issue's positive-review check. No polarity corpus is installed here
(gensim's pang_lee_polarity.cor is not; nothing is downloaded), so the labelled data are 40
clearly positive and 40 clearly negative one-sentence movie reviews written for this
benchmark (REVIEWS_POS / REVIEWS_NEG below); every fifth is held out. A reward model
(SmolLM2-135M + LoRA + scalar head) trains on (review prompt, positive, negative) pairs of
the training sentences; its held-out pairwise accuracy (all held-out positive x negative
pairs) is reported. Then DPO (LoRA) trains the policy on pairs of the same kind, and the
reward model scores completions of unseen review prompts sampled before and after.

Models: tiny = build_tiny_model 4 layers x hidden 128 (random weights), smollm2 =
SmolLM2-135M-Instruct. Each run is its own process. Results:
bench/results/rlhf-<host>-<date>.{json,md} (the DPO and PPO tables) and
rlhf-real-<host>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from bench_kd import Probe, busy_notes, clean_text

import services  # noqa: F401 - first: loads OpenBLAS before anything imports mlx.core

TINY = {"num_layers": 4, "hidden_size": 128, "num_heads": 4, "num_kv_heads": 2,
        "intermediate_size": 256, "tie_word_embeddings": False, "seed": 1}  # fmt: skip
SMOLLM2 = "smollm2-135m-instruct"
# DPO: (pairs per batch, seq_len, warmup, steps); PPO: (prompts, max_tokens, warmup, steps).
DPO_CPU = {"tiny": (4, 128, 2, 8), "smollm2": (2, 128, 1, 4)}
DPO_GPU = (8, 1024, 5, 30)
PPO_CPU = {"tiny": (8, 32, 1, 4), "smollm2": (4, 32, 1, 3)}
PPO_GPU = (32, 128, 2, 8)

DPO_COLUMNS = [
    ("model", "model"), ("reference", "reference"), ("steps", "steps"),
    ("batch", "pairs/batch"), ("seq_len", "seq len"), ("target_tps", "answer tok/s"),
    ("total_tps", "total tok/s"), ("pairs_s", "pairs/s"), ("step_ms", "ms/step"),
    ("median_ms", "median ms/step"), ("cpu_ms", "CPU ms/step"),
    ("peak_train_gb", "peak GB (train)"), ("peak_all_gb", "peak GB (all)"),
    ("rss_gb", "max RSS GB"), ("precompute_s", "precompute s"), ("loss", "loss first→last"),
    ("note", "note"),
]  # fmt: skip
PPO_COLUMNS = [
    ("model", "model"), ("reward", "reward"), ("steps", "steps"), ("prompts", "prompts/step"),
    ("max_tokens", "max tokens"), ("completion_len", "mean completion"),
    ("gen_tps", "rollout tok/s"), ("step_tps", "tok/s (whole step)"), ("step_s", "s/step"),
    ("gen_s", "generation s"), ("score_s", "scoring s"), ("update_s", "update s"),
    ("other_s", "other s"), ("peak_train_gb", "peak GB (train)"),
    ("peak_all_gb", "peak GB (all)"), ("rss_gb", "max RSS GB"), ("reward_mean", "reward"),
    ("note", "note"),
]  # fmt: skip

# ---------------------------------------------------------------- the review data

REVIEWS_POS = [
    "A warm, funny film with a cast that clearly loved every minute of it.",
    "The story builds slowly, but the final act is genuinely moving.",
    "I laughed out loud more times than I can count.",
    "Gorgeous photography and a score that stays with you long after the credits.",
    "One of the most honest portraits of family life I have seen in years.",
    "The lead gives a quiet, generous performance that carries the whole picture.",
    "Smart, tender and surprisingly tense, it never wastes a scene.",
    "A rare sequel that improves on the original in every way.",
    "The dialogue crackles, and the pacing is close to perfect.",
    "Kids and grown-ups at our screening were equally delighted.",
    "It takes a familiar premise and makes it feel fresh and alive.",
    "Beautifully acted, and the ending earns every tear.",
    "A clever little thriller that kept me guessing until the last shot.",
    "The animation is stunning and the jokes land for all ages.",
    "I walked out of the theater smiling and wanted to see it again.",
    "Its humor is gentle, its heart is enormous, and it is never sentimental.",
    "A bold, confident debut from a director worth watching.",
    "The chemistry between the two leads is a joy to watch.",
    "Every frame is packed with detail, and the world feels lived in.",
    "A thoughtful drama that trusts its audience and rewards their attention.",
    "The action scenes are thrilling and easy to follow.",
    "An uplifting story told with wit, warmth and real craft.",
    "The documentary is fascinating from start to finish.",
    "Funny, sharp and full of life, this is the comedy of the year.",
    "The supporting cast is wonderful, especially the grandmother.",
    "It is a moving, beautifully made film about friendship.",
    "I was completely absorbed for two hours and never checked the time.",
    "The script is tight, the performances are excellent, and the music soars.",
    "A delightful surprise that deserves a much bigger audience.",
    "Visually dazzling and emotionally rich, it is a must see.",
    "The film handles a difficult subject with grace and honesty.",
    "Charming from the first scene, it only gets better as it goes.",
    "A masterful piece of storytelling with a superb central performance.",
    "The twist is earned, and the characters feel like real people.",
    "Rich, funny and humane, it left the whole audience applauding.",
    "A gripping adventure with spectacular set pieces and a big heart.",
    "The costumes and sets are lovely, and the cast is perfectly chosen.",
    "It is the kind of film that reminds you why you love cinema.",
    "Sweet without being sugary, and clever without showing off.",
    "An excellent thriller, tense, stylish and beautifully paced.",
]
REVIEWS_NEG = [
    "A dull, lifeless film that drags on far too long.",
    "The plot makes no sense and the ending is a cheap cop-out.",
    "I checked my watch every ten minutes and regretted buying a ticket.",
    "The acting is wooden and the dialogue is painfully clumsy.",
    "A lazy sequel that simply repeats the jokes of the first one.",
    "The special effects look cheap and the story is even cheaper.",
    "Two hours of noise, confusion and characters I did not care about.",
    "It wastes a talented cast on a script that goes nowhere.",
    "The pacing is sluggish and the twist is obvious from the first scene.",
    "A boring, predictable mess that never finds its tone.",
    "The jokes fall flat and the romance feels forced.",
    "I have rarely been so bored in a cinema.",
    "Ugly to look at and tiresome to sit through.",
    "The editing is choppy and the action scenes are impossible to follow.",
    "A pretentious, self-important film with nothing to say.",
    "The lead seems to be sleepwalking through every scene.",
    "It is loud, shallow and instantly forgettable.",
    "The characters make stupid decisions just to keep the plot moving.",
    "A tedious documentary that repeats the same point for ninety minutes.",
    "Even the children at our screening were restless and bored.",
    "The music is grating and the cinematography is murky.",
    "A disappointing adaptation that misses everything that made the book good.",
    "The comedy is mean-spirited and rarely funny.",
    "By the halfway mark I no longer cared how it ended.",
    "The script is full of clichés and the performances are flat.",
    "A messy, overlong film that should have been cut by an hour.",
    "The villain is silly and the stakes never feel real.",
    "It tries to be clever but ends up confusing and dull.",
    "Poorly written, poorly acted and poorly directed.",
    "The film feels like a long advertisement with no heart.",
    "Weak performances and a muddled story sink it completely.",
    "A sour, unpleasant experience that I would not recommend to anyone.",
    "The horror scenes are more silly than scary.",
    "The story collapses in the last act and never recovers.",
    "A hollow remake that adds nothing to the original.",
    "It is a tiresome, joyless slog from start to finish.",
    "The dialogue is so bad that the audience laughed at the serious scenes.",
    "Flat direction and a lazy script make it a chore to watch.",
    "I wanted to like it, but it is a frustrating waste of time.",
    "Cheap, dull and badly acted, it is easily the worst film of the year.",
]
TRAIN_PROMPTS = [
    "Write a one-sentence review of the movie you saw last night.",
    "What did you think of the film?",
    "Give a short review of the new movie.",
    "How was the movie?",
    "Describe the film you just watched in one sentence.",
    "Share your opinion of the movie in one sentence.",
]
TEST_PROMPTS = [
    "Write a one-sentence review of the film 'The Long Summer'.",
    "What did you think of the movie 'Harbor Lights'?",
    "Review the new animated film in one sentence.",
    "In one sentence, tell me what you thought of the thriller you saw yesterday.",
    "Give your honest one-line review of the documentary about the ocean.",
    "How would you describe the comedy you watched this weekend, in one sentence?",
]


def review_split() -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]]:
    """((train pos, train neg), (held-out pos, held-out neg)): every fifth is held out."""

    def cut(xs: list[str]) -> tuple[list[str], list[str]]:
        return [x for i, x in enumerate(xs) if i % 5 != 4], [
            x for i, x in enumerate(xs) if i % 5 == 4
        ]

    (tp, hp), (tn, hn) = cut(REVIEWS_POS), cut(REVIEWS_NEG)
    return (tp, tn), (hp, hn)


def review_pairs(pos: list[str], neg: list[str], prompts: list[str], n: int, seed: int):
    """``n`` preference rows (prompt, chosen = a positive, rejected = a negative)."""
    rng = random.Random(seed)
    return [{"prompt": rng.choice(prompts), "chosen": rng.choice(pos), "rejected": rng.choice(neg)}
            for _ in range(n)]  # fmt: skip


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- child: DPO


def record_preference_batches() -> list[tuple[int, int, int]]:
    """(sequences, width, answer tokens) of every training preference batch, in order."""
    from services.runtime import data_batches

    seen: list[tuple[int, int, int]] = []
    collate = data_batches.PreferenceBatches._collate

    def recording(self, idx):
        batch = collate(self, idx)
        if self.shuffle:
            seen.append((*batch["inputs"].shape, batch["ntokens"]))
        return batch

    data_batches.PreferenceBatches._collate = recording
    return seen


def dpo_config(job: dict, total: int) -> dict:
    return {
        "policy": {"model": job["model"]},
        "dataset": {"path": job["dataset"], "valid_fraction": 0.0},
        "method": job.get("method", "lora"),
        "lora": {"rank": job["lora_rank"], "scale": job.get("lora_scale", 20.0),
                 "num_layers": job["lora_layers"]},
        "loss": "sigmoid",
        "beta": job["beta"],
        "precompute_reference": job["precompute"],
        "optimizer": {"name": "adamw", "learning_rate": job["lr"], "schedule": "constant",
                      "weight_decay": 0.0},
        "loop": {"batch_size": job["batch"], "max_steps": total,
                 "max_seq_length": job["seq_len"], "steps_per_report": 1, "steps_per_eval": -1,
                 "steps_per_checkpoint": -1, "keep_last_checkpoints": 1, "dtype": job["dtype"],
                 "seed": 0},
    }  # fmt: skip


def dpo_child(job: dict) -> dict[str, Any]:
    """One DPO run, measured (also the MLX side of bench_dpo_torch.py)."""
    from services.rlhf.trainers import dpo
    from services.runtime.contract import JobContext

    seen = record_preference_batches()
    timings: dict[str, float] = {}
    precompute = dpo.precompute

    def timed(*args, **kwargs):
        tic = time.perf_counter()
        try:
            return precompute(*args, **kwargs)
        finally:
            timings["precompute_s"] = time.perf_counter() - tic

    dpo.precompute = timed
    w, total = job["warmup"], job["warmup"] + job["steps"]
    probe = Probe(w, total)
    out = Path(job["workdir"]) / f"out-{job['stem']}"
    shutil.rmtree(out, ignore_errors=True)
    ctx = JobContext(job_id="bench", output_dir=out, report=probe.report, log=print)
    dpo.run(dpo_config(job, total), ctx)
    shutil.rmtree(out, ignore_errors=True)
    res = probe.result()
    secs = res["seconds"] or float("nan")
    target = sum(t for _, _, t in seen[w:total])
    positions = sum(b * length for b, length, _ in seen[w:total])
    pairs = sum(b // 2 for b, _, _ in seen[w:total])
    first = probe.metrics.get(1, {})
    return {**res, **timings, "answer_tokens": target, "target_tps": target / secs,
            "total_tps": positions / secs, "pairs_s": pairs / secs,
            "shapes": sorted({f"{b}x{n}" for b, n, _ in seen[w:total]}),
            "logps_chosen_step1": first.get("logps_chosen"),
            "logps_rejected_step1": first.get("logps_rejected")}  # fmt: skip


# ---------------------------------------------------------------- child: PPO


def random_reward_checkpoint(model: str, dst: Path) -> Path:
    """A reward checkpoint of ``model`` with a random scalar head: the model files linked,
    value_head.safetensors written (a real reward-model forward, meaningless scores)."""
    from services.rlhf.trainers import heads
    from services.runtime.models import load_model

    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(model).iterdir():
        if f.is_file() and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    lm, _ = load_model(model)
    heads.attach_head(lm, seed=0)
    heads.save_head(lm, dst, "reward")
    return dst


def ppo_config(job: dict, total: int, reward: dict) -> dict:
    return {
        "policy": {"model": job["model"]},
        "dataset": {"path": job["dataset"]},
        "reward": reward,
        "method": "lora",
        "lora": {"rank": job["lora_rank"], "scale": 20.0, "num_layers": job["lora_layers"]},
        "rollout": {"batch_size": job["prompts"],
                    "sampling": {"max_tokens": job["max_tokens"], "temperature": 1.0}},
        "ppo_epochs": job["ppo_epochs"],
        "minibatch_size": max(1, job["prompts"] // 2),
        "init_kl_coef": 0.05,
        "optimizer": {"name": "adamw", "learning_rate": job["lr"], "schedule": "constant",
                      "weight_decay": 0.0},
        "loop": {"max_steps": total, "steps_per_report": 1, "steps_per_checkpoint": -1,
                 "keep_last_checkpoints": 1, "dtype": job["dtype"], "seed": 0,
                 "max_seq_length": 512},
    }  # fmt: skip


def ppo_child(job: dict) -> dict[str, Any]:
    from services.rlhf.trainers import ppo
    from services.runtime.contract import JobContext

    work = Path(job["workdir"])
    if job["reward"] == "model":
        rm = random_reward_checkpoint(job["model"], work / f"rm-{job['stem']}")
        reward = {"reward_model": {"model": str(rm)}}
    else:
        reward = {"reward_function": job["reward"]}
    w, total = job["warmup"], job["warmup"] + job["steps"]
    probe = Probe(w, total)
    out = work / f"out-{job['stem']}"
    shutil.rmtree(out, ignore_errors=True)
    ctx = JobContext(job_id="bench", output_dir=out, report=probe.report, log=print)
    ppo.run(ppo_config(job, total, reward), ctx)
    shutil.rmtree(out, ignore_errors=True)
    res = probe.result(loss_key="loss")
    timed = [probe.metrics[s] for s in range(w + 1, total + 1)]

    def total_of(key: str) -> float:
        return sum(m.get(key, 0.0) for m in timed)

    n = max(len(timed), 1)
    gen, score, upd = total_of("time_generation"), total_of("time_scoring"), total_of("time_update")
    tokens = res["target_tokens"]  # the reports count completion tokens
    return {**res, "gen_tps": tokens / max(gen, 1e-9), "step_tps": res["target_tps"],
            "gen_s": gen / n, "score_s": score / n, "update_s": upd / n,
            "other_s": max(res["step_s_mean"] - (gen + score + upd) / n, 0.0),
            "completion_len": total_of("completion_length") / n,
            "reward_mean": total_of("reward_mean") / n}  # fmt: skip


# ---------------------------------------------------------------- child: the real check


def _sample(model, tokenizer, prompts: list[str], n: int, max_tokens: int, seed: int):
    """``n`` completions per prompt (temperature 0.7), decoded, end-of-sequence dropped."""
    import mlx.core as mx

    from services.rlhf.trainers import eos_ids, pad_id
    from services.rlhf.trainers.rollout import RolloutSampling, generate, strip_eos
    from services.runtime.datasets import tokenize_rows

    rows = [p for p in prompts for _ in range(n)]
    items = tokenize_rows([{"prompt": p} for p in rows], "prompt", tokenizer,
                          max_seq_length=512, mask_prompt=False)  # fmt: skip
    toks = [list(it.tokens) for it in items]
    eos = eos_ids(tokenizer)
    s = RolloutSampling(temperature=0.7, max_tokens=max_tokens)
    out = generate(model, toks, s, mx.random.key(seed), eos_ids=eos, pad_id=pad_id(tokenizer))
    texts = [tokenizer.decode(strip_eos(c, eos)).strip() for c in out.completion_ids]
    return rows, texts


def real_child(job: dict) -> dict[str, Any]:
    import mlx.core as mx
    import numpy as np

    from services.rlhf.trainers import dpo, reward_model
    from services.rlhf.trainers.rewards import RewardModelScorer
    from services.runtime.contract import JobContext
    from services.runtime.models import load_model

    work = Path(job["workdir"])
    (tp, tn), (hp, hn) = review_split()
    held_pairs = [{"prompt": p, "chosen": a, "rejected": b}
                  for a in hp for b in hn for p in TRAIN_PROMPTS[:1]]  # fmt: skip
    rm_data = work / "rm-data"
    _jsonl(rm_data / "train.jsonl", review_pairs(tp, tn, TRAIN_PROMPTS, job["pairs"], seed=1))
    _jsonl(rm_data / "valid.jsonl", held_pairs)
    lora = {"rank": 8, "scale": 20.0, "num_layers": -1}
    loop = {"batch_size": job["rm_batch"], "max_steps": job["rm_steps"],
            "max_seq_length": 128, "steps_per_report": 5, "steps_per_eval": job["rm_steps"],
            "val_batches": -1, "steps_per_checkpoint": -1, "keep_last_checkpoints": 1,
            "dtype": job["dtype"]}  # fmt: skip
    reports: list = []
    log: list = []

    def ctx(out: Path) -> JobContext:
        shutil.rmtree(out, ignore_errors=True)
        return JobContext(job_id="bench", output_dir=out, report=reports.append, log=log.append)

    tic = time.perf_counter()
    rm_cfg = {"model": {"model": job["model"]}, "dataset": {"path": str(rm_data)},
              "method": "lora", "lora": lora, "center_rewards_coef": 0.01,
              "optimizer": {"learning_rate": job["rm_lr"], "schedule": "constant"},
              "loop": loop}  # fmt: skip
    rm_info = reward_model.run(rm_cfg, ctx(work / "rm-out"))
    rm_s = time.perf_counter() - tic
    rm_reports = [(r.step, r.metrics.get("accuracy"), r.metrics.get("train_loss")) for r in reports]
    scorer = RewardModelScorer.load(rm_info.path)
    # Held-out classification: every held-out positive sentence against every negative one.
    p_scores = scorer.score([TRAIN_PROMPTS[0]] * len(hp), hp)
    n_scores = scorer.score([TRAIN_PROMPTS[0]] * len(hn), hn)
    auc = float(np.mean([a > b for a in p_scores for b in n_scores]))
    threshold = float(np.median(p_scores + n_scores))
    sign_acc = float(
        np.mean([s > threshold for s in p_scores] + [s <= threshold for s in n_scores])
    )

    dpo_data = work / "dpo-data"
    _jsonl(dpo_data / "train.jsonl", review_pairs(tp, tn, TRAIN_PROMPTS, job["pairs"], seed=2))
    _jsonl(dpo_data / "valid.jsonl", held_pairs)
    reports.clear()
    dpo_cfg = {"policy": {"model": job["model"]}, "dataset": {"path": str(dpo_data)},
               "method": "lora", "lora": lora, "beta": job["beta"],
               "optimizer": {"learning_rate": job["dpo_lr"], "schedule": "constant"},
               "loop": {**loop, "batch_size": job["dpo_batch"], "max_steps": job["dpo_steps"],
                        "steps_per_eval": job["dpo_steps"]}}  # fmt: skip
    tic = time.perf_counter()
    dpo_info = dpo.run(dpo_cfg, ctx(work / "dpo-out"))
    dpo_s = time.perf_counter() - tic

    samples = {}
    for side, adapter in (("before", None), ("after", str(dpo_info.path))):
        model, tok = load_model(job["model"], adapter)
        prompts, texts = _sample(model, tok, TEST_PROMPTS, job["samples"], job["max_tokens"], 7)
        scores = scorer.score(prompts, texts)
        samples[side] = [{"prompt": p, "completion": t, "score": s}
                         for p, t, s in zip(prompts, texts, scores, strict=True)]  # fmt: skip
        del model
        mx.clear_cache()
    return {
        "rm_seconds": rm_s,
        "rm_metrics": rm_info.metrics,
        "rm_reports": rm_reports,
        "heldout_auc": auc,
        "heldout_sign_acc": sign_acc,
        "heldout_pos_scores": p_scores,
        "heldout_neg_scores": n_scores,
        "dpo_seconds": dpo_s,
        "dpo_metrics": dpo_info.metrics,
        "samples": samples,
        "threshold": threshold,
    }


def child(job_file: Path) -> int:
    job = json.loads(job_file.read_text())
    out: dict[str, Any] = {"part": job["part"]}
    try:
        import mlx.core as mx

        run = {"dpo": dpo_child, "ppo": ppo_child, "real": real_child}[job["part"]]
        out.update(run(job))
        out["device"] = str(mx.default_device())
    except Exception as exc:  # noqa: BLE001 - the parent reports it in the table
        import traceback

        traceback.print_exc()
        out["error"] = f"{type(exc).__name__}: {exc}"
    libs = common.blas_in_process()
    out.update(blas=common.describe_blas(libs), rss_gb=common.max_rss_gb())
    Path(job["result"]).write_text(json.dumps(out, indent=2, default=str))
    return 0


# ---------------------------------------------------------------- parent


def model_path(name: str, home: Path) -> str:
    from services.runtime.models import build_tiny_model, resolve_model

    if name == "tiny":
        tag = f"bench-kd-l{TINY['num_layers']}-h{TINY['hidden_size']}-s{TINY['seed']}"
        return str(build_tiny_model(home / "models" / tag, **TINY))
    return resolve_model(SMOLLM2 if name == "smollm2" else name, home, (home, Path.cwd()))


def preference_text(work: Path, model: str, seq_len: int, rows: int, sources=None):
    """A preference dataset dir whose every chosen / rejected sequence is exactly ``seq_len``
    tokens (prompt included): prompt = a short question, answers = two different chunks of
    the repository's text. Returns (dir, stats)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from services.runtime import datasets

    text = clean_text(list(sources or common.default_text_sources()))
    tok = load_tokenizer(Path(model))
    cpt = 4
    while True:
        n = seq_len * cpt
        stride = max(1, (len(text) - n) // (2 * rows + 1))
        chunk = [text[i * stride : i * stride + n] for i in range(2 * rows)]
        pairs = [{"prompt": f"Continue the notes, part {i}:", "chosen": chunk[2 * i],
                  "rejected": chunk[2 * i + 1]} for i in range(rows)]  # fmt: skip
        out = _jsonl(work / f"prefs-L{seq_len}-c{cpt}" / "train.jsonl", pairs).parent
        data = datasets.prepare(
            {"path": str(out), "valid_fraction": 0.0}, tok, allowed_formats=("preference",),
            max_seq_length=seq_len, mask_prompt=True, seed=0,
        )  # fmt: skip
        lens = [len(s.tokens) for p in data.train for s in (p.chosen, p.rejected)]
        if min(lens) == seq_len or cpt > 64:
            return out, {"pairs": len(data.train), "min_len": min(lens), "max_len": max(lens),
                         "answer_tokens": data.stats.target_tokens}  # fmt: skip
        cpt *= 2


def measure(args, work: Path, job: dict, script: Path | None = None) -> common.ChildResult:
    stem = job["stem"]
    job = {**job, "result": str(work / f"{stem}.result.json"), "workdir": str(work)}
    job_file = work / f"{stem}.job.json"
    job_file.write_text(json.dumps(job))
    return common.run_child(
        [sys.executable, str(script or Path(__file__).resolve()), "--child", str(job_file)],
        Path(job["result"]),
        timeout=args.timeout,
        log_file=work / f"{stem}.log",
    )


def _pick(given: tuple, base: tuple) -> tuple:
    return tuple(g if g is not None else b for g, b in zip(given, base, strict=True))


def _dpo_rows(args, work: Path, name: str, path: str, on_gpu: bool, shared: dict):
    base = DPO_GPU if on_gpu else DPO_CPU.get(name, DPO_CPU["smollm2"])
    batch, seq_len, warmup, steps = _pick(
        (args.batch_size, args.seq_len, args.warmup, args.steps), base
    )
    ds, info = preference_text(work, path, seq_len, max(batch * (warmup + steps), 8))
    shared["data"][f"dpo/{name}"] = info
    print(f"[dpo {name}] {json.dumps(info)}", flush=True)
    for precompute in (True, False):
        job = {"part": "dpo", "model": path, "dataset": str(ds), "batch": batch,
               "seq_len": seq_len, "warmup": warmup, "steps": steps, "precompute": precompute,
               "lr": args.lr, "beta": 0.1, "lora_rank": args.lora_rank,
               "lora_layers": args.lora_layers, "dtype": shared["dtype"],
               "stem": f"dpo-{name}-p{int(precompute)}"}  # fmt: skip
        runs = [measure(args, work, job) for _ in range(args.repeat)]
        res = common.best(runs, "target_tps")
        r = res.result
        row = {"model": name, "reference": "precomputed" if precompute else "live",
               "batch": batch, "seq_len": seq_len, "rss_gb": r.get("rss_gb")}  # fmt: skip
        if not res.ok:
            print(f"  dpo {name} precompute={precompute}: FAILED {res.error[-400:]}")
            yield {**row, "loss": "FAILED", "note": res.error[-400:]}
            continue
        lf, ll = r.get("loss_first"), r.get("loss_last")
        row.update(
            steps=r["timed_steps"], target_tps=r["target_tps"], total_tps=r["total_tps"],
            pairs_s=r["pairs_s"], step_ms=1000 * r["step_s_mean"],
            median_ms=1000 * r["step_s_median"], cpu_ms=1000 * r["cpu_s_per_step"],
            peak_train_gb=r["peak_train_gb"], peak_all_gb=r["peak_all_gb"],
            precompute_s=r.get("precompute_s"),
            loss=f"{lf:.4f}→{ll:.4f}" if lf is not None and ll is not None else "",
            detail=r, child_seconds=round(res.seconds, 1),
        )  # fmt: skip
        print(f"  dpo {name} precompute={precompute}: {r['target_tps']:.1f} answer tok/s "
              f"({res.seconds:.0f} s)", flush=True)  # fmt: skip
        yield row


def _ppo_rows(args, work: Path, name: str, path: str, on_gpu: bool, shared: dict):
    base = PPO_GPU if on_gpu else PPO_CPU.get(name, PPO_CPU["smollm2"])
    prompts, max_tokens, warmup, steps = _pick(
        (args.prompts, args.max_tokens, args.warmup, args.steps), base
    )
    ds = _jsonl(work / "ppo-prompts.jsonl", [{"prompt": p} for p in TRAIN_PROMPTS + TEST_PROMPTS])
    job = {"part": "ppo", "model": path, "dataset": str(ds), "prompts": prompts,
           "max_tokens": max_tokens, "warmup": warmup, "steps": steps, "lr": args.lr,
           "ppo_epochs": args.ppo_epochs, "reward": args.ppo_reward,
           "lora_rank": args.lora_rank, "lora_layers": args.lora_layers,
           "dtype": shared["dtype"], "stem": f"ppo-{name}"}  # fmt: skip
    runs = [measure(args, work, job) for _ in range(args.repeat)]
    res = common.best(runs, "step_tps")
    r = res.result
    reward = "reward model (random head)" if args.ppo_reward == "model" else args.ppo_reward
    row = {"model": name, "reward": reward, "prompts": prompts, "max_tokens": max_tokens,
           "rss_gb": r.get("rss_gb")}  # fmt: skip
    if not res.ok:
        print(f"  ppo {name}: FAILED {res.error[-400:]}")
        return {**row, "note": res.error[-400:]}
    row.update(
        steps=r["timed_steps"], completion_len=r["completion_len"], gen_tps=r["gen_tps"],
        step_tps=r["step_tps"], step_s=r["step_s_mean"], gen_s=r["gen_s"],
        score_s=r["score_s"], update_s=r["update_s"], other_s=r["other_s"],
        peak_train_gb=r["peak_train_gb"], peak_all_gb=r["peak_all_gb"],
        reward_mean=r["reward_mean"], detail=r, child_seconds=round(res.seconds, 1),
        note=f"ppo_epochs {args.ppo_epochs}, minibatch {max(1, prompts // 2)}",
    )  # fmt: skip
    print(f"  ppo {name}: rollout {r['gen_tps']:.1f} tok/s, step {r['step_s_mean']:.2f} s "
          f"({res.seconds:.0f} s)", flush=True)  # fmt: skip
    return row


def _real(args, work: Path, shared: dict) -> tuple[list[dict], list[str], dict]:
    path = model_path(args.real_model, args.home)
    job = {"part": "real", "model": path, "pairs": args.pairs, "rm_steps": args.rm_steps,
           "rm_batch": args.rm_batch, "rm_lr": args.rm_lr, "dpo_steps": args.dpo_steps,
           "dpo_batch": args.dpo_batch, "dpo_lr": args.dpo_lr, "beta": args.beta,
           "samples": args.samples, "max_tokens": args.real_max_tokens,
           "dtype": shared["dtype"], "stem": "real"}  # fmt: skip
    res = measure(args, work, job)
    if not res.ok:
        raise SystemExit(f"real check failed: {res.error}")
    r = res.result
    rm, dm = r["rm_metrics"], r["dpo_metrics"]
    rows = []
    for side in ("before", "after"):
        sc = [s["score"] for s in r["samples"][side]]
        rows.append({"policy": f"{args.real_model} (start)" if side == "before" else "after DPO",
                     "mean_score": sum(sc) / len(sc),
                     "positive": sum(s > r["threshold"] for s in sc) / len(sc),
                     "n": len(sc)})  # fmt: skip
    notes = [
        "DATA: no polarity corpus is installed here and none was downloaded: the 40 positive "
        "and 40 negative one-sentence movie reviews are hand-written for this benchmark "
        "(bench/bench_rlhf.py REVIEWS_POS / REVIEWS_NEG); every fifth is held out (8 + 8).",
        f"Reward model: {args.real_model} + LoRA (rank 8, every block) + scalar head, "
        f"{args.rm_steps} steps x {args.rm_batch} pairs (lr {args.rm_lr}), on {args.pairs} "
        f"random (review prompt, positive, negative) pairs of the 32 + 32 training sentences; "
        f"{r['rm_seconds']:.0f} s. Held-out: trainer val_accuracy {rm.get('val_accuracy', 0):.3f}"
        f" over the 64 held-out pairs, val_margin {rm.get('val_margin', 0):.2f}; pairwise "
        f"accuracy (AUC) of the scores of the 16 held-out sentences {r['heldout_auc']:.3f}; "
        f"sign accuracy at the median score {r['heldout_sign_acc']:.3f}.",
        f"DPO: LoRA, beta {args.beta}, {args.dpo_steps} steps x {args.dpo_batch} pairs "
        f"(lr {args.dpo_lr}), precomputed reference, on {args.pairs} pairs of the training "
        f"sentences; {r['dpo_seconds']:.0f} s; held-out val_accuracies "
        f"{dm.get('val_accuracies', 0):.3f}, val_margins {dm.get('val_margins', 0):.3f}.",
        f"Scores: the reward model on {len(TEST_PROMPTS)} unseen review prompts x "
        f"{args.samples} samples (temperature 0.7, ≤ {args.real_max_tokens} tokens, the same "
        "seed before and after); 'positive' = above the median score of the held-out "
        f"sentences ({r['threshold']:.2f}).",
    ]
    for side in ("before", "after"):
        for s in r["samples"][side][: args.show]:
            text = s["completion"].replace("\n", " ").replace("|", "/")[:160]
            notes.append(f"{side}: [{s['score']:+.2f}] {s['prompt']} → {text}")
    return rows, notes, r


def _list(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--parts", default="dpo,ppo,real", help="dpo, ppo, real (comma-separated)")
    add("--models", default="tiny,smollm2", help="tiny, smollm2, or a model directory")
    add("--steps", type=int, help="timed steps (after --warmup); default by model")
    add("--warmup", type=int)
    add("--batch-size", type=int, help="DPO pairs per batch")
    add("--seq-len", type=int, help="DPO tokens per sequence")
    add("--prompts", type=int, help="PPO prompts per rollout batch")
    add("--max-tokens", type=int, help="PPO completion tokens at most")
    add("--ppo-epochs", type=int, default=2)
    add("--ppo-reward", default="model", help="model (random-head reward checkpoint) or a "
        "reward function (length, token_count:X, contains:X)")  # fmt: skip
    add("--lr", type=float, default=1e-5)
    add("--lora-rank", type=int, default=8)
    add("--lora-layers", type=int, default=16)
    add("--real-model", default="smollm2")
    add("--pairs", type=int, default=96, help="real check: training pairs (RM and DPO)")
    add("--rm-steps", type=int, default=24)
    add("--rm-batch", type=int, default=8)
    add("--rm-lr", type=float, default=3e-4)
    add("--dpo-steps", type=int, default=24)
    add("--dpo-batch", type=int, default=4)
    add("--dpo-lr", type=float, default=5e-5)
    add("--beta", type=float, default=0.1)
    add("--samples", type=int, default=2, help="real check: completions per test prompt")
    add("--real-max-tokens", type=int, default=40)
    add("--show", type=int, default=4, help="real check: samples shown per side")
    add("--repeat", type=int, default=1, help="DPO / PPO runs: N each, the best is kept")
    add("--dtype", default="auto", help="auto = float32 on CPU, bfloat16 on GPU")
    add("--home", type=Path, default=Path(os.environ.get("MLXU_HOME", "~/.mlxu")).expanduser())
    add("--out", type=Path, default=common.RESULTS)
    add("--timeout", type=float, default=1800, help="seconds per child process")
    add("--keep", action="store_true")
    add("--child", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


NOTES = [
    "DPO answer tok/s: the answer tokens (chosen + rejected, the ones that carry the loss) "
    "per second; total tok/s: every position of the [2 x pairs, L] batch; timed from the end "
    "of the last warmup step to the end of the last step (the live reference's forward is "
    "inside the step). precompute s: the reference pass over every pair before step 1.",
    "DPO: sigmoid loss, beta 0.1, LoRA (rank / last N blocks as in the settings, every "
    "linear layer), AdamW constant lr. With 'precomputed' the reference is freed before "
    "training; with 'live' it stays loaded.",
    "PPO: one step = sample one completion per prompt, score, ppo_epochs passes over "
    "minibatches of half the prompts. rollout tok/s: completion tokens / time_generation; "
    "tok/s (whole step): completion tokens / step time; generation / scoring / update s: the "
    "trainer's own time_* metrics, per step (mean over the timed steps); other: the rest of "
    "the step (reporting, bookkeeping).",
    "peak GB (train): mx.get_peak_memory over the timed steps; (all): the whole process "
    "(model loads, the reference precompute included); max RSS: ru_maxrss.",
]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        return child(args.child)
    import mlx.core as mx

    from services.runtime import blas
    from services.runtime.models import compute_dtype

    tic = time.perf_counter()
    args.home = args.home.resolve()
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    work = Path(tempfile.mkdtemp(prefix="bench-rlhf-"))
    shared = {"data": {}, "dtype": compute_dtype() if args.dtype == "auto" else args.dtype}
    info = common.machine({"device": str(mx.default_device()),
                           "blas": common.describe_blas(common.blas_in_process()),
                           "blas_path": blas.loaded or blas.reason})  # fmt: skip
    parts = _list(args.parts)
    settings = {"dtype": shared["dtype"], "lr": args.lr, "lora_rank": args.lora_rank,
                "lora_layers": args.lora_layers, "repeat": args.repeat}  # fmt: skip
    paths = {n: model_path(n, args.home) for n in _list(args.models)} if parts != ["real"] else {}
    dpo_rows, ppo_rows = [], []
    for name, path in paths.items():
        if "dpo" in parts:
            dpo_rows += list(_dpo_rows(args, work, name, path, on_gpu, shared))
        if "ppo" in parts:
            ppo_rows.append(_ppo_rows(args, work, name, path, on_gpu, shared))
    if dpo_rows or ppo_rows:
        md = []
        if dpo_rows:
            md += ["## DPO", "", common.markdown_table(dpo_rows, DPO_COLUMNS), ""]
        if ppo_rows:
            md += ["## PPO", "", common.markdown_table(ppo_rows, PPO_COLUMNS), ""]
        rows = [{"table": "dpo", **r} for r in dpo_rows] + [{"table": "ppo", **r} for r in ppo_rows]
        settings["wall_s"] = round(time.perf_counter() - tic, 1)
        notes = NOTES + busy_notes()
        json_path, md_path, text = common.write_results(
            "rlhf", rows, [("table", "table")], info, settings=settings, notes=notes,
            out_dir=args.out, extra={"data": shared["data"], "argv": sys.argv[1:]},
        )  # fmt: skip
        # Two tables: the markdown is rewritten with both (the JSON keeps every row).
        head = text.split("\n\n")[:3]  # title, machine line, settings
        text = "\n\n".join(head) + "\n\n" + "\n".join(md) + "\n"
        text += "".join(f"- {n}\n" for n in notes)
        md_path.write_text(text)
        print("\n" + text + f"\nwrote {json_path} and {md_path}")
    if "real" in parts:
        t0 = time.perf_counter()
        rows, notes, raw = _real(args, work, shared)
        cols = [("policy", "policy"), ("mean_score", "mean reward-model score"),
                ("positive", "fraction positive"), ("n", "completions")]  # fmt: skip
        settings = {"model": args.real_model, "dtype": shared["dtype"],
                    "wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
        _, md_path, text = common.write_results(
            "rlhf-real", rows, cols, info, settings=settings, notes=notes + busy_notes(),
            out_dir=args.out, extra={"raw": raw, "argv": sys.argv[1:]},
        )  # fmt: skip
        print("\n" + text + f"\nwrote {md_path}")
    print(f"total {time.perf_counter() - tic:.0f} s")
    if args.keep:
        print(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
