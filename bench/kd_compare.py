"""KD vs same-budget SFT over several seeds: the parent side of ``bench_kd.py --parts compare``.

For each seed, KD (``services.distillation.trainers.kd``) and plain SFT
(``services.training.trainers.sft``) train the same student (the teacher's half-depth
``student_init`` copy, built once: the same initial weights for every run) on the same rows
for the same steps; the seed is the trainers' ``loop.seed`` (the order of the rows). Each
run reports the student's held-out cross entropy every ``--eval-every`` steps (and at step
0); the table gives, per step, the mean and the spread (min..max, std) over the seeds of
KD's and SFT's held-out CE and of the per-seed difference KD - SFT.

    python3 bench/bench_kd.py --parts compare --seeds 0,1,2 --out DIR
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import common

COLUMNS = [  # the *_s keys: the figures with 3 decimals (the JSON keeps the floats)
    ("step", "step"), ("kd_s", "KD held-out CE, mean ± std"), ("kd_range", "KD min–max"),
    ("sft_s", "SFT held-out CE, mean ± std"), ("sft_range", "SFT min–max"),
    ("diff_s", "KD − SFT, mean ± std"), ("diff_range", "KD − SFT min–max"),
    ("kd_better", "seeds KD < SFT"),
]  # fmt: skip
# Sizes when not given: (GPU, CPU). The CPU ones are the committed 2026-11-24 run's.
DEFAULTS = {"compare_steps": (60, 40), "compare_batch": (2, 2), "compare_seq_len": (128, 128)}


def add_args(add) -> None:
    add("--compare-teacher", default="smollm2")
    add("--seeds", default="0,1,2", help="compare: loop seeds (row order), one KD + SFT each")
    for key, (gpu, cpu) in DEFAULTS.items():
        add("--" + key.replace("_", "-"), type=int, help=f"compare; default {gpu} GPU / {cpu}")
    # AdamW is bias-corrected now (as torch.optim): the first updates are 3-6x smaller than
    # the uncorrected ones that the old 5e-5 was chosen with, hence 2e-4.
    add("--compare-lr", type=float, default=2e-4, help="compare: AdamW lr, constant")
    # bf16 full fine-tuning rounds small AdamW updates away: float32 unless told otherwise.
    add("--compare-dtype", default="float32", help="compare: float32 (default) or auto")
    add("--compare-valid-rows", type=int, default=8)
    add("--eval-every", type=int, default=10)


def _stats(xs: list[float]) -> tuple[float, float, float, float]:
    return (statistics.fmean(xs), min(xs), max(xs),
            statistics.stdev(xs) if len(xs) > 1 else 0.0)  # fmt: skip


def aggregate(got: dict[int, dict[str, dict]]) -> list[dict[str, Any]]:
    """Per step: mean / min / max / std over seeds of KD, SFT and the paired difference."""
    curves = {
        s: {k: {p["step"]: p["ce"] for p in r[k]["curve"]} for k in r} for s, r in got.items()
    }
    steps = sorted(set.intersection(*(set(c["kd"]) & set(c["sft"]) for c in curves.values())))
    rows = []
    for step in steps:
        kd = [c["kd"][step] for c in curves.values()]
        sft = [c["sft"][step] for c in curves.values()]
        diff = [a - b for a, b in zip(kd, sft, strict=True)]
        (km, klo, khi, ksd), (sm, slo, shi, ssd), (dm, dlo, dhi, dsd) = map(_stats, (kd, sft, diff))
        rows.append({
            "step": step, "kd_mean": km, "kd_min": klo, "kd_max": khi, "kd_std": ksd,
            "sft_mean": sm, "sft_min": slo, "sft_max": shi, "sft_std": ssd,
            "diff_mean": dm, "diff_min": dlo, "diff_max": dhi, "diff_std": dsd,
            "kd_s": f"{km:.3f} ± {ksd:.3f}", "sft_s": f"{sm:.3f} ± {ssd:.3f}",
            "diff_s": f"{dm:+.3f} ± {dsd:.3f}",
            "kd_range": f"{klo:.3f}–{khi:.3f}", "sft_range": f"{slo:.3f}–{shi:.3f}",
            "diff_range": f"{dlo:+.3f}–{dhi:+.3f}",
            "kd_better": f"{sum(d < 0 for d in diff)}/{len(diff)}",
            "per_seed": {str(s): {"kd": c["kd"][step], "sft": c["sft"][step]}
                         for s, c in curves.items()},
        })  # fmt: skip
    return rows


def run(args, work: Path, dtype: str, on_gpu: bool, measure) -> tuple[list[dict], dict]:
    """Every (seed, KD / SFT) run, each in its own process (``measure``); (rows, summary)."""
    from bench_kd import _teachers, fixed_length_text

    from services.distillation.trainers import student

    for key, (gpu, cpu) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu if on_gpu else cpu)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    teachers, t_layers = _teachers(args.compare_teacher, args.home)
    teacher = teachers[0]["model"]
    half = max(1, t_layers // 2)
    init_dir, kept = student.init_student(teacher, work / "compare-student", num_layers=half)
    seq_len, batch, steps = args.compare_seq_len, args.compare_batch, args.compare_steps
    sources = args.text_source or common.default_text_sources()
    ds, info = fixed_length_text(work, "compare", teacher, sources, seq_len, batch * steps,
                                 args.compare_valid_rows)  # fmt: skip
    print(f"[compare] teacher {teacher} ({t_layers} layers), student blocks {kept}, seeds "
          f"{seeds}; data {json.dumps(info)}", flush=True)  # fmt: skip
    base = {"part": "compare", "teachers": teachers[:1], "teacher_path": teacher,
            "student": str(init_dir), "dataset": str(ds), "batch": batch, "seq_len": seq_len,
            "steps": steps, "warmup": 1, "eval_every": args.eval_every, "eval_batch": 4,
            "dtype": dtype, "lr": args.compare_lr, "alpha": args.alpha,
            "temperature": args.temperature, "top_k": args.top_k}  # fmt: skip
    got: dict[int, dict[str, dict]] = {}
    for seed in seeds:
        got[seed] = {}
        for kind in ("kd", "sft"):
            job = {**base, "kind": kind, "seed": seed, "stem": f"compare-{kind}-s{seed}"}
            res = measure(args, work, job)
            if not res.ok:
                raise SystemExit(f"compare {kind} seed {seed} failed: {res.error}")
            got[seed][kind] = res.result
            c = res.result["curve"]
            print(f"  compare seed {seed} {kind}: held-out CE {c[0]['ce']:.3f} → "
                  f"{c[-1]['ce']:.3f} ({res.seconds:.0f} s)", flush=True)  # fmt: skip
    rows = aggregate(got)

    def mean_of(kind: str, key: str) -> float:
        return statistics.fmean(got[s][kind][key] for s in seeds)

    summary = {
        "teacher": teacher, "teacher_heldout_ce": got[seeds[0]]["sft"].get("teacher_ce"),
        "student_blocks": kept, "data": info, "seeds": seeds, "dtype": dtype,
        "kd_step_s": mean_of("kd", "step_s_mean"), "sft_step_s": mean_of("sft", "step_s_mean"),
        "kd_tps": mean_of("kd", "target_tps"), "sft_tps": mean_of("sft", "target_tps"),
        "kd_run_s": mean_of("kd", "run_s"), "sft_run_s": mean_of("sft", "run_s"),
        "final": {k: v for k, v in rows[-1].items() if not k.endswith(("_range", "_s"))},
        "train_ce": {str(s): {k: got[s][k]["train_ce"] for k in got[s]} for s in seeds},
    }  # fmt: skip
    return rows, summary


def notes(args, summary: dict) -> list[str]:
    src = ", ".join(str(p.relative_to(common.REPO)) if p.is_relative_to(common.REPO) else str(p)
                    for p in (args.text_source or common.default_text_sources()))  # fmt: skip
    f = summary["final"]
    tce = summary["teacher_heldout_ce"]
    return [
        f"Result at step {f['step']}: KD {f['kd_mean']:.3f} ± {f['kd_std']:.3f} "
        f"(min {f['kd_min']:.3f}, max {f['kd_max']:.3f}), SFT {f['sft_mean']:.3f} ± "
        f"{f['sft_std']:.3f} (min {f['sft_min']:.3f}, max {f['sft_max']:.3f}) held-out CE "
        f"(mean ± std over {len(summary['seeds'])} seeds); per-seed KD − SFT "
        f"{f['diff_mean']:+.3f} (min {f['diff_min']:+.3f}, max {f['diff_max']:+.3f}); KD "
        f"lower in {f['kd_better']} seeds.",
        f"Teacher {args.compare_teacher} ({summary['teacher']}); held-out CE of the teacher "
        f"itself: {tce:.3f}. Student: its blocks {summary['student_blocks']} (student_init, "
        "evenly spaced), the same initial weights for every run.",
        f"Data: the repository's own text ({src}), whitespace collapsed, cut into rows of "
        f"exactly {args.compare_seq_len} tokens; the last {args.compare_valid_rows} rows' worth "
        f"of text is held out (no training row overlaps it); {json.dumps(summary['data'])}.",
        f"Both: full fine-tuning in {summary['dtype']}, AdamW (bias-corrected) lr "
        f"{args.compare_lr:g} constant, batch {args.compare_batch}, {args.compare_steps} steps "
        "over the same training rows. Seeds "
        f"{', '.join(map(str, summary['seeds']))}: the trainers' loop.seed, i.e. the order "
        "of the rows (the student's init and the data are the same for every seed). KD: "
        f"forward KL, alpha {args.alpha}, T {args.temperature}, live teacher (no cache).",
        "Held-out CE: the student's plain next-token cross entropy (nats/token) on the "
        "held-out rows; step 0 = before training. min–max and std are over the seeds; "
        "'KD − SFT' pairs the KD and SFT runs of the same seed.",
        f"Cost (mean over seeds): KD {summary['kd_step_s']:.3f} s/step "
        f"({summary['kd_tps']:.0f} tok/s), SFT {summary['sft_step_s']:.3f} s/step "
        f"({summary['sft_tps']:.0f} tok/s), held-out evals excluded.",
    ]
