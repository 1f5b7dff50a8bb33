"""The positive-review RLHF experiment of bench_rlhf.py (``--parts real``), on real text.

Data: Pang & Lee's sentence polarity sentences (the 100 positive + 100 negative movie-review
snippets that gensim ships as test data, ``pang_lee_polarity.cor``: one
``__label__pos|__label__neg <lower-cased, tokenized sentence>`` per line), lightly
detokenized. Every fifth sentence of each class is held out (20 + 20); the other 80 + 80
train. Prompts: 8 templates x 8 subjects train (64), 4 other templates x 6 other subjects
are held out (24).

(a) A reward model (the policy model + LoRA + scalar head) trains on random
(training prompt, positive, negative) triples of training sentences; held-out pairwise
accuracy = the fraction of the 400 held-out (positive, negative) pairs it orders right,
under each of 4 held-out prompts (mean), and the trainer's own val_accuracy.
(b) DPO (LoRA, precomputed reference) on triples of the same kind.
(c) PPO (LoRA policy + value head, frozen reference) on the 64 training prompts with the
reward model of (a) as the reward.
Each policy (start, DPO, PPO) then completes the held-out prompts (same seed), the reward
model scores the completions, and KL(trained || start) is measured on the trained policy's
own completions (see ``kl_from_start``).
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORPUS = "pang_lee_polarity.cor"
TRAIN_TEMPLATES = [
    "Write a one-sentence review of {}.",
    "What did you think of {}?",
    "Give a short review of {}.",
    "In one sentence, how was {}?",
    "Describe {} in one sentence.",
    "Share your opinion of {} in a sentence.",
    "Tell me briefly what you thought of {}.",
    "Review {} in one line.",
]
TRAIN_SUBJECTS = [
    "the movie you saw last night", "the new thriller", "the romantic comedy",
    "the animated film", "the documentary", "the sequel", "the war drama", "the horror film",
]  # fmt: skip
TEST_TEMPLATES = [
    "How would you sum up {} in one sentence?",
    "Give your honest one-line review of {}.",
    "What is your verdict on {}, in one sentence?",
    "Write a single-sentence critique of {}.",
]
TEST_SUBJECTS = [
    "the film 'The Long Summer'", "the movie 'Harbor Lights'", "the ocean documentary",
    "the comedy you watched this weekend", "the new biopic", "the space adventure",
]  # fmt: skip

# Sizes when not given: (GPU, CPU); the CPU ones take well over 30 minutes on 2 cores.
# Seen on an H200 (bf16, cold): the reward model at 80 x 16 reached 0.856 held-out pairwise
# accuracy in 157 s (kernel compilation included), DPO 60 x 8 took 48 s, and PPO at 32
# prompts x 4 epochs x 4 minibatches ran ~8-10 s per step, its KL at 9.4 nats per completion
# by step 20 with lr 5e-5: hence 16 prompts x 2 x 2 (4 updates per step) at lr 1e-4.
DEFAULTS = {
    "rm_steps": (80, 24), "rm_batch": (16, 8), "rm_lr": (5e-4, 5e-4),
    "dpo_steps": (60, 24), "dpo_batch": (8, 4), "dpo_lr": (2e-4, 2e-4),
    "ppo_steps": (20, 6), "ppo_prompts": (16, 8), "ppo_minibatch": (8, 4),
    "ppo_epochs": (2, 2), "ppo_lr": (1e-4, 1e-4), "samples": (4, 1),
}  # fmt: skip


def add_args(add) -> None:
    """The real experiment's flags (``add`` = ArgumentParser.add_argument)."""
    add("--real-model", default="smollm2", help="real: the policy / reward model base")
    add("--corpus", type=Path, help=f"real: {CORPUS} (default: bench/data/, else gensim's)")
    add("--real-parts", default="rm,dpo,ppo", help="real: rm (always), dpo, ppo")
    for key, (gpu, cpu) in DEFAULTS.items():
        if key == "ppo_epochs":  # bench_rlhf's own flag, shared with the PPO speed part
            continue
        kind = float if isinstance(gpu, float) else int
        add("--" + key.replace("_", "-"), type=kind, help=f"real; default {gpu} (GPU) / {cpu}")
    add("--lora-rank-real", type=int, default=16, help="real: LoRA rank (TRL's default)")
    add("--lora-alpha-real", type=float, default=32.0, help="real: peft lora_alpha (TRL's)")
    add("--beta", type=float, default=0.1, help="real: DPO beta")
    add("--kl-coef", type=float, default=0.05, help="real: PPO init_kl_coef (fixed)")
    add("--temperature", type=float, default=0.7, help="real: PPO rollouts and evaluation")
    add("--real-max-tokens", type=int, default=40)
    add("--show", type=int, default=6, help="real: samples shown per policy")
    add("--val-pairs", type=int, default=80,
        help="real: held-out pairs in the trainers' own validation (RM, DPO); the pairwise "
             "accuracy always uses all of them")  # fmt: skip


def fill_defaults(args, on_gpu: bool) -> None:
    for key, (gpu, cpu) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu if on_gpu else cpu)


# ---------------------------------------------------------------- data


def corpus_path(given: Path | None) -> Path:
    """The polarity file: ``given``, else bench/data/ (travels with the repo), else the one in
    the installed gensim wheel (located without importing gensim)."""
    candidates = [given] if given else [HERE / "data" / CORPUS]
    if not given:
        spec = importlib.util.find_spec("gensim")
        for loc in (spec.submodule_search_locations or []) if spec else []:
            candidates.append(Path(loc) / "test" / "test_data" / CORPUS)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise SystemExit(f"{CORPUS} not found (looked at {', '.join(map(str, candidates))})")


def detok(s: str) -> str:
    """Undo the corpus's tokenization: 'it's a film , and a good one .' -> 'It's a film, ...'."""
    s = re.sub(r" ([,.;:!?)])", r"\1", s.strip())
    s = re.sub(r"\( ", "(", s)
    s = re.sub(r'" (.*?) "', r'"\1"', s)
    s = re.sub(r"\.(\s?\.)+", "...", s)
    s = re.sub(r"\bi\b", "I", s)
    return s[:1].upper() + s[1:]


def load_corpus(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"pos": [], "neg": []}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        label, _, text = line.strip().partition(" ")
        if label in ("__label__pos", "__label__neg") and text.strip():
            out[label.removeprefix("__label__")].append(detok(text))
    if not out["pos"] or not out["neg"]:
        raise SystemExit(f"{path}: no __label__pos / __label__neg lines")
    return out


def split(corpus: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
    """{"train": {"pos", "neg"}, "held": {"pos", "neg"}}: every fifth of each class held."""
    out: dict[str, dict[str, list[str]]] = {"train": {}, "held": {}}
    for label, xs in corpus.items():
        out["train"][label] = [x for i, x in enumerate(xs) if i % 5 != 4]
        out["held"][label] = [x for i, x in enumerate(xs) if i % 5 == 4]
    return out


def prompts() -> tuple[list[str], list[str]]:
    train = [t.format(s) for t in TRAIN_TEMPLATES for s in TRAIN_SUBJECTS]
    test = [t.format(s) for t in TEST_TEMPLATES for s in TEST_SUBJECTS]
    return train, test


def triples(pos: list[str], neg: list[str], ps: list[str], n: int, seed: int) -> list[dict]:
    """``n`` preference rows (prompt, chosen = a positive, rejected = a negative)."""
    rng = random.Random(seed)
    return [{"prompt": rng.choice(ps), "chosen": rng.choice(pos), "rejected": rng.choice(neg)}
            for _ in range(n)]  # fmt: skip


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- child


def sample(model, tok, ps: list[str], n: int, max_tokens: int, temp: float, seed: int):
    """``n`` completions per prompt: (prompts, prompt ids, completion ids, texts)."""
    import mlx.core as mx

    from services.rlhf.trainers import eos_ids, pad_id
    from services.rlhf.trainers.rollout import RolloutSampling, generate, strip_eos
    from services.runtime.datasets import tokenize_rows

    rows = [p for p in ps for _ in range(n)]
    items = tokenize_rows([{"prompt": p} for p in rows], "prompt", tok, max_seq_length=512,
                          mask_prompt=False)  # fmt: skip
    eos = eos_ids(tok)
    s = RolloutSampling(temperature=temp, max_tokens=max_tokens)
    out = generate(model, [list(it.tokens) for it in items], s, mx.random.key(seed),
                   eos_ids=eos, pad_id=pad_id(tok))  # fmt: skip
    texts = [tok.decode(strip_eos(c, eos)).strip() for c in out.completion_ids]
    return rows, out.prompt_ids, out.completion_ids, texts


def kl_from_start(model, start, prompt_ids, completion_ids, pad: int, temp: float) -> dict:
    """KL(trained || start) on the trained policy's own completions, both distributions at
    the sampling temperature (the ones PPO's penalty compares): per completion token, the
    exact sum over the vocabulary, and the sampled estimate log p(y) - log p0(y)."""
    import mlx.core as mx

    from services.rlhf.trainers.rollout import completion_logits, pack

    exact = k1 = tokens = 0.0
    for i in range(0, len(prompt_ids), 16):
        b = pack(prompt_ids[i : i + 16], completion_ids[i : i + 16], pad)
        lp = completion_logits(model(b["inputs"]), b, temp).astype(mx.float32)
        lq = completion_logits(start(b["inputs"]), b, temp).astype(mx.float32)
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        lq = lq - mx.logsumexp(lq, axis=-1, keepdims=True)
        m = b["mask"]
        ex = ((mx.exp(lp) * (lp - lq)).sum(-1) * m).sum()
        idx = b["tokens"][..., None]
        d = mx.take_along_axis(lp, idx, -1) - mx.take_along_axis(lq, idx, -1)
        kk = (d.squeeze(-1) * m).sum()
        mx.eval(ex, kk)
        exact, k1, tokens = exact + ex.item(), k1 + kk.item(), tokens + m.sum().item()
    n = max(len(prompt_ids), 1)
    return {"kl_token": exact / max(tokens, 1), "kl_seq": exact / n,
            "logp_diff_token": k1 / max(tokens, 1), "completion_tokens": tokens / n}  # fmt: skip


def _lora(job: dict) -> dict:
    return {"rank": job["lora_rank"], "alpha": job["lora_alpha"], "num_layers": -1}


def _optimizer(lr: float, warmup: int) -> dict:
    return {"name": "adamw", "learning_rate": lr, "schedule": "constant",
            "warmup_steps": warmup, "weight_decay": 0.0}  # fmt: skip


def _loop(job: dict, batch: int, steps: int) -> dict:
    # steps_per_eval past the end: no eval during training, the trainer's final one only.
    return {"batch_size": batch, "max_steps": steps, "max_seq_length": 192,
            "steps_per_report": 1, "steps_per_eval": steps + 1, "val_batches": -1,
            "steps_per_checkpoint": -1, "keep_last_checkpoints": 1, "dtype": job["dtype"],
            "seed": job.get("seed", 0)}  # fmt: skip


def real_child(job: dict) -> dict[str, Any]:
    import mlx.core as mx
    import numpy as np

    from services.rlhf.trainers import dpo, ppo, reward_model
    from services.rlhf.trainers.rewards import RewardModelScorer
    from services.runtime.contract import JobContext

    work = Path(job["workdir"])
    data = split(load_corpus(Path(job["corpus"])))
    (tp, tn), (hp, hn) = (data["train"]["pos"], data["train"]["neg"]), (
        data["held"]["pos"], data["held"]["neg"])  # fmt: skip
    train_ps, test_ps = prompts()
    held = [{"prompt": test_ps[(i * len(hn) + j) % len(test_ps)], "chosen": a, "rejected": b}
            for i, a in enumerate(hp) for j, b in enumerate(hn)]  # fmt: skip
    # The trainers' own validation (run twice at the end: the loop's last step, then the
    # trainer's metrics pass) scores 2 sequences per pair: a spread-out subset of the pairs.
    val = held[:: max(1, len(held) // job["val_pairs"])][: job["val_pairs"]]
    reports: list = []
    out: dict[str, Any] = {"timings": {}}

    t0 = time.perf_counter()

    def log(msg: str) -> None:  # the child's stdout is a file: unflushed lines show nothing
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    def report(r) -> None:
        reports.append(r)
        if r.step % 10 == 0 or r.step == r.total_steps:
            log(
                f"  step {r.step}/{r.total_steps} "
                + " ".join(f"{k} {v:.4g}" for k, v in r.metrics.items())
            )

    def ctx(name: str) -> JobContext:
        d = work / name
        shutil.rmtree(d, ignore_errors=True)
        reports.clear()
        return JobContext(job_id="bench", output_dir=d, report=report, log=log)

    def curve(keys: tuple[str, ...]) -> list[dict]:
        return [{"step": r.step, **{k: r.metrics.get(k) for k in keys}} for r in reports]

    # (a) the reward model
    rm_data = work / "rm-data"
    jsonl(rm_data / "train.jsonl", triples(tp, tn, train_ps, job["rm_steps"] * job["rm_batch"], 1))
    jsonl(rm_data / "valid.jsonl", val)
    tic = time.perf_counter()
    rm_info = reward_model.run({
        "model": {"model": job["model"]}, "dataset": {"path": str(rm_data)}, "method": "lora",
        "lora": _lora(job), "center_rewards_coef": 0.01,
        "optimizer": _optimizer(job["rm_lr"], max(1, job["rm_steps"] // 20)),
        "loop": _loop(job, job["rm_batch"], job["rm_steps"])}, ctx("rm-out"))  # fmt: skip
    out["timings"]["rm_s"] = time.perf_counter() - tic
    out["rm_metrics"], out["rm_curve"] = rm_info.metrics, curve(("train_loss", "train_accuracy"))
    scorer = RewardModelScorer.load(rm_info.path, dtype=job["dtype"])
    accs, pos_scores, neg_scores = [], [], []
    for p in test_ps[:4]:  # every held-out pair under one prompt, for 4 prompts
        sp, sn = scorer.score([p] * len(hp), hp), scorer.score([p] * len(hn), hn)
        accs.append(float(np.mean([a > b for a in sp for b in sn])))
        pos_scores, neg_scores = pos_scores + sp, neg_scores + sn
    out["heldout_pair_acc"], out["heldout_pair_acc_by_prompt"] = float(np.mean(accs)), accs
    # 'Positive' completion = above the median score of the (balanced) held-out sentences.
    out["threshold"] = float(np.median(pos_scores + neg_scores))
    out["heldout_scores"] = {"pos_mean": float(np.mean(pos_scores)),
                             "neg_mean": float(np.mean(neg_scores))}  # fmt: skip
    log(f"reward model: held-out pairwise accuracy {out['heldout_pair_acc']:.3f} "
        f"({out['timings']['rm_s']:.0f} s)")  # fmt: skip

    adapters: dict[str, str | None] = {"start": None}
    parts = job["real_parts"]
    if "dpo" in parts:  # (b)
        d = work / "dpo-data"
        jsonl(d / "train.jsonl", triples(tp, tn, train_ps, job["dpo_steps"] * job["dpo_batch"], 2))
        jsonl(d / "valid.jsonl", val)
        tic = time.perf_counter()
        info = dpo.run({
            "policy": {"model": job["model"]}, "dataset": {"path": str(d)}, "method": "lora",
            "lora": _lora(job), "beta": job["beta"],
            "optimizer": _optimizer(job["dpo_lr"], max(1, job["dpo_steps"] // 20)),
            "loop": _loop(job, job["dpo_batch"], job["dpo_steps"])}, ctx("dpo-out"))  # fmt: skip
        out["timings"]["dpo_s"] = time.perf_counter() - tic
        out["dpo_metrics"], adapters["dpo"] = info.metrics, str(info.path)
        out["dpo_curve"] = curve(("train_loss", "train_accuracies", "train_margins"))
        log(f"dpo: {out['timings']['dpo_s']:.0f} s")
    if "ppo" in parts:  # (c)
        ds = jsonl(work / "ppo-prompts.jsonl", [{"prompt": p} for p in train_ps])
        if job["ppo_prompts"] > len(train_ps):
            raise ValueError(f"--ppo-prompts {job['ppo_prompts']} > {len(train_ps)} prompts")
        tic = time.perf_counter()
        info = ppo.run({
            "policy": {"model": job["model"]}, "dataset": {"path": str(ds)},
            "reward": {"reward_model": {"model": str(rm_info.path)}}, "method": "lora",
            "lora": _lora(job),
            "rollout": {"batch_size": job["ppo_prompts"],
                        "sampling": {"max_tokens": job["max_tokens"],
                                     "temperature": job["temperature"]}},
            "ppo_epochs": job["ppo_epochs"], "minibatch_size": job["ppo_minibatch"],
            "init_kl_coef": job["kl_coef"],
            "optimizer": _optimizer(job["ppo_lr"], 0),
            "loop": {**_loop(job, job["ppo_prompts"], job["ppo_steps"]),
                     "max_seq_length": 512}}, ctx("ppo-out"))  # fmt: skip
        out["timings"]["ppo_s"] = time.perf_counter() - tic
        adapters["ppo"] = str(info.path)
        out["ppo_curve"] = curve(("reward_mean", "kl", "loss", "completion_length", "entropy"))
        log(f"ppo: {out['timings']['ppo_s']:.0f} s")
    del scorer
    mx.clear_cache()

    tic = time.perf_counter()
    out["policies"] = evaluate(job, str(rm_info.path), adapters, test_ps, out["threshold"])
    out["timings"]["eval_s"] = time.perf_counter() - tic
    return out


def evaluate(job: dict, rm: str, adapters: dict, ps: list[str], threshold: float) -> dict:
    """Every policy (adapter None = the start) on the prompts ``ps``, the same sampling seed:
    reward-model scores, the fraction above ``threshold``, KL from the start, the samples."""
    import mlx.core as mx
    import numpy as np

    from services.rlhf.trainers import pad_id
    from services.rlhf.trainers.rewards import RewardModelScorer
    from services.runtime.models import load_model

    scorer = RewardModelScorer.load(rm, dtype=job["dtype"])
    start, tok = load_model(job["model"], dtype=job["dtype"])
    out = {}
    for name, adapter in adapters.items():
        model = start if adapter is None else load_model(job["model"], adapter,
                                                         dtype=job["dtype"])[0]  # fmt: skip
        rows, pids, cids, texts = sample(model, tok, ps, job["samples"], job["max_tokens"],
                                         job["temperature"], seed=7)  # fmt: skip
        scores = scorer.score(rows, texts)
        kl = kl_from_start(model, start, pids, cids, pad_id(tok), job["temperature"])
        out[name] = {
            "mean_score": float(np.mean(scores)),
            "positive": float(np.mean([s > threshold for s in scores])),
            "n": len(scores), **kl,
            "samples": [{"prompt": p, "completion": t, "score": s}
                        for p, t, s in zip(rows, texts, scores, strict=True)],
        }  # fmt: skip
        print(f"{name}: mean score {out[name]['mean_score']:.3f}, KL/token "
              f"{kl['kl_token']:.4f}", flush=True)  # fmt: skip
        if model is not start:
            del model
        mx.clear_cache()
    return out


# ---------------------------------------------------------------- parent


def make_job(args, model: str, dtype: str) -> dict:
    keys = list(DEFAULTS) + ["ppo_epochs", "beta", "kl_coef", "temperature", "val_pairs"]
    job = {k: getattr(args, k) for k in keys}
    job.update(part="real", model=model, dtype=dtype, stem="real",
               corpus=str(corpus_path(args.corpus)), max_tokens=args.real_max_tokens,
               lora_rank=args.lora_rank_real, lora_alpha=args.lora_alpha_real,
               real_parts=[x for x in args.real_parts.split(",") if x])  # fmt: skip
    return job


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(args, job: dict, r: dict) -> tuple[list[dict], list[str]]:
    """Table rows (one per policy) and the notes of the result markdown."""
    names = {"start": f"{args.real_model} (start)", "dpo": "after DPO", "ppo": "after PPO"}
    rows = [{"policy": names[k], **{c: v for c, v in p.items() if c != "samples"}}
            for k, p in r["policies"].items()]  # fmt: skip
    for row in rows:  # KLs are small: 4 decimals in the table (the JSON keeps the floats)
        row.update({f"{c}_s": f"{row[c]:.4f}" for c in ("kl_token", "kl_seq", "logp_diff_token")})
    rm, t = r["rm_metrics"], r["timings"]
    acc = r["heldout_pair_acc"]
    lora = f"LoRA rank {job['lora_rank']}, alpha {job['lora_alpha']:g} (every block)"
    data = split(load_corpus(Path(job["corpus"])))
    n = {f"{s}_{lab}": len(data[s][lab]) for s in data for lab in data[s]}
    notes = [
        f"DATA: Pang & Lee sentence polarity sentences ({job['corpus']}: gensim's test copy, "
        f"{n['train_pos'] + n['held_pos']} positive + {n['train_neg'] + n['held_neg']} "
        "negative, lower-cased and tokenized; detokenized here). Every fifth sentence of each "
        f"class is held out: {n['train_pos']} + {n['train_neg']} train, {n['held_pos']} + "
        f"{n['held_neg']} held out. Prompts: {len(TRAIN_TEMPLATES) * len(TRAIN_SUBJECTS)} "
        f"training, {len(TEST_TEMPLATES) * len(TEST_SUBJECTS)} held-out (other templates and "
        "subjects).",
        f"(a) Reward model: {args.real_model} + {lora} + scalar head, {job['rm_steps']} steps "
        f"x {job['rm_batch']} random (training prompt, positive, negative) triples, AdamW "
        f"(bias-corrected) lr {job['rm_lr']:g} constant after a short warmup, "
        f"center_rewards_coef 0.01; {t['rm_s']:.0f} s. Held-out pairwise accuracy "
        f"{acc:.3f} (target > 0.80: {'met' if acc > 0.8 else 'NOT met'}) = the fraction of "
        f"the {n['held_pos'] * n['held_neg']} held-out (positive, negative) pairs ordered "
        "right, under each of 4 held-out prompts (by prompt: "
        f"{', '.join(f'{a:.3f}' for a in r['heldout_pair_acc_by_prompt'])}); the trainer's "
        f"val_accuracy over {job['val_pairs']} of these pairs (one held-out prompt each) "
        f"{rm.get('val_accuracy', float('nan')):.3f}, val_margin "
        f"{rm.get('val_margin', float('nan')):.2f}. Mean held-out scores: positive "
        f"{r['heldout_scores']['pos_mean']:.2f}, negative {r['heldout_scores']['neg_mean']:.2f}.",
    ]
    if "dpo_metrics" in r:
        dm = r["dpo_metrics"]
        notes.append(
            f"(b) DPO: {lora}, sigmoid loss, beta {job['beta']}, {job['dpo_steps']} steps x "
            f"{job['dpo_batch']} triples of training sentences, lr {job['dpo_lr']:g}, "
            f"precomputed reference; {t['dpo_s']:.0f} s; held-out val_accuracies "
            f"{dm.get('val_accuracies', float('nan')):.3f}, val_margins "
            f"{dm.get('val_margins', float('nan')):.2f}."
        )
    if "ppo_curve" in r:
        c = r["ppo_curve"]
        k = max(1, min(3, len(c) // 3))
        first = _mean([x["reward_mean"] for x in c[:k]])
        last = _mean([x["reward_mean"] for x in c[-k:]])
        kl_last = _mean([x["kl"] for x in c[-k:]])
        notes.append(
            f"(c) PPO: {lora} on the policy + value head, reward = the reward model of (a), "
            f"{job['ppo_steps']} steps x {job['ppo_prompts']} training prompts (one completion "
            f"each, temperature {job['temperature']}, ≤ {job['max_tokens']} tokens), "
            f"{job['ppo_epochs']} epochs of minibatches of {job['ppo_minibatch']}, fixed KL "
            f"coefficient {job['kl_coef']}, lr {job['ppo_lr']:g}; {t['ppo_s']:.0f} s. Trainer's "
            f"rollout reward (mean of {k} steps) {first:.2f} → {last:.2f}; its KL (summed "
            f"per completion, rollout batch mean) over the last {k} steps {kl_last:.3f}."
        )
    notes += [
        f"Evaluation: each policy completes the {len(TEST_TEMPLATES) * len(TEST_SUBJECTS)} "
        f"held-out prompts x {job['samples']} (temperature {job['temperature']}, ≤ "
        f"{job['max_tokens']} tokens, the same seed for every policy); the reward model of (a) "
        "scores them. 'fraction positive' = above the median score of the held-out sentences "
        f"({r['threshold']:.2f}).",
        "KL: KL(trained ‖ start) measured on the trained policy's own held-out completions, "
        "both distributions at the sampling temperature (what PPO's penalty compares): "
        "'KL/token' = the exact sum over the vocabulary at each completion token, averaged "
        "over tokens; 'KL/completion' = its sum per completion; 'log-ratio/token' = the "
        "sampled estimate log p(y) − log p0(y) per token. The start row is 0 by definition.",
    ]
    for key, p in r["policies"].items():
        for s in p["samples"][: args.show]:
            text = s["completion"].replace("\n", " ").replace("|", "/")[:200]
            notes.append(f"{names[key]}: [{s['score']:+.2f}] {s['prompt']} → {text}")
    return rows, notes


COLUMNS = [
    ("policy", "policy"), ("mean_score", "mean reward-model score"),
    ("positive", "fraction positive"), ("kl_token_s", "KL/token"), ("kl_seq_s", "KL/completion"),
    ("logp_diff_token_s", "log-ratio/token"), ("completion_tokens", "mean tokens"),
    ("n", "completions"),
]  # fmt: skip
