"""RLHF speed and memory (DPO, PPO), and the real-text RLHF experiment (reward model, DPO, PPO).

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

Part "real": the RLHF issue's positive-review experiment on real text (rlhf_real.py): the
Pang & Lee polarity sentences (bench/data/pang_lee_polarity.cor, gensim's test copy;
--corpus), 4/5 train, 1/5 held out. (a) A reward model (SmolLM2-135M + LoRA + scalar head)
on (prompt, positive, negative) triples, its held-out pairwise accuracy; (b) DPO and (c) PPO
with that reward model as the reward, each scored on held-out review prompts (reward-model
score, fraction positive, KL from the start policy, samples). One command on a GPU:

    python3 bench/bench_rlhf.py --parts real --out DIR     # GPU ~6 min; rlhf_real.DEFAULTS

Models: tiny = build_tiny_model 4 layers x hidden 128 (random weights), smollm2 =
SmolLM2-135M-Instruct. Each run is its own process. Results:
bench/results/rlhf-<host>-<date>.{json,md} (the DPO and PPO tables) and
rlhf-real-<host>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import rlhf_real
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


def child(job_file: Path) -> int:
    job = json.loads(job_file.read_text())
    out: dict[str, Any] = {"part": job["part"]}
    try:
        import mlx.core as mx

        run = {"dpo": dpo_child, "ppo": ppo_child, "real": rlhf_real.real_child}[job["part"]]
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
    if local := common.local_model(name):
        return local
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
        out = rlhf_real.jsonl(work / f"prefs-L{seq_len}-c{cpt}" / "train.jsonl", pairs).parent
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
               "stem": f"dpo-{common.slug(name)}-p{int(precompute)}"}  # fmt: skip
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
    # At least one rollout batch of distinct rows (the 88 review prompts, cycled if fewer).
    pool = [p for ps in rlhf_real.prompts() for p in ps]
    rows = [{"prompt": pool[i % len(pool)]} for i in range(max(prompts, len(pool)))]
    ds = rlhf_real.jsonl(work / "ppo-prompts.jsonl", rows)
    job = {"part": "ppo", "model": path, "dataset": str(ds), "prompts": prompts,
           "max_tokens": max_tokens, "warmup": warmup, "steps": steps, "lr": args.lr,
           "ppo_epochs": args.ppo_epochs or 2, "reward": args.ppo_reward,
           "lora_rank": args.lora_rank, "lora_layers": args.lora_layers,
           "dtype": shared["dtype"], "stem": f"ppo-{common.slug(name)}"}  # fmt: skip
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
        note=f"ppo_epochs {args.ppo_epochs or 2}, minibatch {max(1, prompts // 2)}",
    )  # fmt: skip
    print(f"  ppo {name}: rollout {r['gen_tps']:.1f} tok/s, step {r['step_s_mean']:.2f} s "
          f"({res.seconds:.0f} s)", flush=True)  # fmt: skip
    return row


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
    add("--ppo-epochs", type=int, help="PPO epochs per step (default 2; real: see below)")
    add("--ppo-reward", default="model", help="model (random-head reward checkpoint) or a "
        "reward function (length, token_count:X, contains:X)")  # fmt: skip
    add("--lr", type=float, default=1e-5)
    add("--lora-rank", type=int, default=8)
    add("--lora-layers", type=int, default=16)
    rlhf_real.add_args(add)
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
        rlhf_real.fill_defaults(args, on_gpu)
        job = rlhf_real.make_job(args, model_path(args.real_model, args.home), shared["dtype"])
        print(f"[real] {json.dumps({k: v for k, v in job.items() if k != 'part'})}", flush=True)
        res = measure(args, work, job)
        if not res.ok:
            raise SystemExit(f"real experiment failed: {res.error}")
        rows, notes = rlhf_real.summarize(args, job, res.result)
        settings = {"model": args.real_model, "dtype": shared["dtype"],
                    "wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
        json_path, md_path, text = common.write_results(
            "rlhf-real", rows, rlhf_real.COLUMNS, info, settings=settings,
            notes=notes + busy_notes(), out_dir=args.out,
            extra={"job": job, "raw": res.result, "argv": sys.argv[1:]},
        )  # fmt: skip
        print("\n" + text + f"\nwrote {json_path} and {md_path}")
    print(f"total {time.perf_counter() - tic:.0f} s")
    if args.keep:
        print(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
