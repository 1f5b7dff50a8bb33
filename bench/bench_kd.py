"""Knowledge distillation speed and memory, and KD vs plain SFT at equal steps.

    uv run python bench/bench_kd.py                          # CPU defaults: both parts
    uv run python bench/bench_kd.py --parts speed --models tiny --steps 20
    uv run python bench/bench_kd.py --parts compare --seeds 0,1,2 --compare-steps 60
    python3 bench/bench_kd.py --parts compare --out DIR        # GPU: 3 seeds, ~4 min
    (CPU, idle 2 cores: ~4.5 min for the speed part, ~4.5 min per seed of a 40-step comparison)

Part "speed": services.distillation.trainers.kd.run, called directly with a JobContext, for
logit KD with one teacher, logit KD with two teachers (a mixture), and feature KD (one
teacher, cosine, uniform layer map), each with and without the teacher top-k cache
(features + cache is refused by validation: its row says so), plus plain SFT
(services.training.trainers.sft) of the same student on the same data as the baseline. The
student is ``student_init`` at half the teacher's depth, trained in full. Models:

- tiny: teacher = build_tiny_model 4 layers x hidden 128 (MLP 256, vocab 512); the second
  teacher 4 layers x hidden 96, same tokenizer; student 2 of the teacher's 4 blocks;
- smollm2: teacher = SmolLM2-135M-Instruct (30 layers); the second teacher a second copy of
  it (``--teacher2-bits 8`` quantizes that copy: very slow on a CPU, see the notes); student
  15 of its 30 blocks.

Part "compare" (the distillation issue's real check, kd_compare.py): teacher SmolLM2-135M,
student its half-depth copy; for each of ``--seeds`` (default 0,1,2: the trainers' loop seed,
i.e. the row order), KD and plain SFT train the same student from the same init on the same
rows (one epoch) for the same steps (AdamW, constant lr, float32), and both report the
student's cross entropy on held-out text every ``--eval-every`` steps (and at step 0); the
table gives mean and spread over the seeds. The text is the repository's own markdown
(README.md, docs/**.md; or --text-source): the last ``--compare-valid-rows`` chunks of it are
held out, the rows before them train.

Every run is its own process (clean peak memory). tokens/s counts the tokens that carry loss
(every position of these fixed-length text rows but the last); steps 1..warmup are not
timed. Peak memory: mx.get_peak_memory over the timed steps ("train"; the teachers are
unloaded when the cache replaces them) and over the whole process ("all": model loads and
the cache build included), and max RSS. Results: bench/results/kd-<host>-<date>.{json,md}
and kd-vs-sft-<host>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import kd_compare

import services  # noqa: F401 - first: loads OpenBLAS before anything imports mlx.core

HERE = Path(__file__).resolve().parent
# build_tiny_model arguments of the tiny teachers (same vocabulary, hence same tokenizer).
TINY_TEACHERS = (
    {"num_layers": 4, "hidden_size": 128, "num_heads": 4, "num_kv_heads": 2,
     "intermediate_size": 256, "tie_word_embeddings": False, "seed": 1},
    {"num_layers": 4, "hidden_size": 96, "num_heads": 4, "num_kv_heads": 2,
     "intermediate_size": 192, "tie_word_embeddings": False, "seed": 2},
)  # fmt: skip
SMOLLM2 = "smollm2-135m-instruct"
# (batch, seq_len, warmup, steps) by model when not given on the command line.
CPU_DEFAULTS = {"tiny": (4, 128, 2, 10), "smollm2": (2, 128, 1, 4)}
GPU_DEFAULTS = (8, 512, 3, 20)
KINDS = ("sft", "logit-1t", "logit-2t", "feature-1t")
COLUMNS = [
    ("model", "model"), ("kind", "kind"), ("cache", "teacher cache"), ("steps", "steps"),
    ("batch", "batch"), ("seq_len", "seq len"), ("target_tps", "tok/s"),
    ("step_ms", "ms/step"), ("median_ms", "median ms/step"), ("cpu_ms", "CPU ms/step"),
    ("vs_sft", "tok/s vs SFT"), ("peak_train_gb", "peak GB (train)"),
    ("peak_all_gb", "peak GB (all)"), ("rss_gb", "max RSS GB"),
    ("cache_s", "cache build s"), ("loss", "loss first→last"), ("note", "note"),
]  # fmt: skip


# ---------------------------------------------------------------- child: measurement


class Probe:
    """Per-step marks from a trainer's report callback (steps_per_report = 1): time, the
    report's cumulative token count, metrics, CPU time and peak memory."""

    def __init__(self, warmup: int, total: int) -> None:
        import mlx.core as mx

        self.mx, self.warmup, self.total = mx, warmup, total
        self.clock = common.StepClock(warmup)
        self.tokens: dict[int, float] = {}
        self.metrics: dict[int, dict[str, float]] = {}
        self.cpu: dict[int, float] = {}
        self.excluded = 0.0  # seconds spent in the callback itself (held-out evals)
        self.peak_before = self.peak_train = 0.0

    def report(self, r) -> None:
        self.clock.mark(r.step)
        self.cpu[r.step] = time.process_time()
        self.tokens[r.step] = float(r.tokens)
        self.metrics[r.step] = dict(r.metrics)
        if r.step == self.warmup:
            self.peak_before = self.mx.get_peak_memory() / 1e9
            self.mx.reset_peak_memory()
        if r.step == self.total:
            self.peak_train = self.mx.get_peak_memory() / 1e9

    def result(self, loss_key: str = "train_loss") -> dict[str, Any]:
        w, n = self.warmup, self.total
        timing = self.clock.summary()
        secs = (timing["seconds"] - self.excluded) or float("nan")
        target = self.tokens.get(n, 0.0) - self.tokens.get(w, 0.0)
        first, last = self.metrics.get(1, {}), self.metrics.get(n, {})
        return {
            **timing,
            "target_tokens": target,
            "target_tps": target / secs,
            "cpu_s_per_step": (self.cpu.get(n, 0.0) - self.cpu.get(w, 0.0)) / max(n - w, 1),
            "loss_first": first.get(loss_key),
            "loss_last": last.get(loss_key),
            "peak_train_gb": self.peak_train,
            "peak_all_gb": max(self.peak_before, self.peak_train),
            "last_metrics": last,
        }


def _loop(job: dict, total: int, eval_every: int = -1) -> dict:
    return {"batch_size": job["batch"], "max_steps": total, "max_seq_length": job["seq_len"],
            "steps_per_report": 1, "steps_per_eval": eval_every, "steps_per_checkpoint": -1,
            "keep_last_checkpoints": 1, "dtype": job["dtype"],
            "seed": job.get("seed", 0)}  # fmt: skip


def _optimizer(job: dict) -> dict:
    return {"name": "adamw", "learning_rate": job["lr"], "schedule": "constant",
            "weight_decay": 0.0}  # fmt: skip


def kd_config(job: dict, total: int) -> dict:
    """The distillation spec of one run (``job``: what the parent decided)."""
    teachers = [{"model": {"model": t["model"]}, **t.get("extra", {})} for t in job["teachers"]]
    cfg = {
        "teachers": teachers,
        "dataset": {"path": job["dataset"]},
        "method": "full",
        "alpha": job["alpha"],
        "temperature": {"initial": job["temperature"]},
        "divergence": "forward_kl",
        "optimizer": _optimizer(job),
        "loop": _loop(job, total),
    }
    if job.get("student"):
        cfg["student"] = {"model": job["student"]}
    else:
        cfg["student_init"] = {"num_layers": job["student_layers"]}
    if job.get("features"):
        cfg["features"] = {"enabled": True, "loss": "cosine"}
    if job.get("cache"):
        cfg["teacher_cache"] = {"enabled": True, "top_k": job["top_k"]}
    return cfg


def sft_config(job: dict, total: int) -> dict:
    return {"model": {"model": job["student"]}, "dataset": {"path": job["dataset"]},
            "method": "full", "optimizer": _optimizer(job), "loop": _loop(job, total)}  # fmt: skip


def _timed_cache_build(timings: dict) -> None:
    """Time TeacherCache.open_or_build (the teacher pass over every row), once per split."""
    from services.distillation.trainers import teachers

    build = teachers.TeacherCache.open_or_build  # bound to the class

    def timed(*args, **kwargs):
        tic = time.perf_counter()
        try:
            return build(*args, **kwargs)
        finally:
            timings["cache_s"] = timings.get("cache_s", 0.0) + time.perf_counter() - tic

    teachers.TeacherCache.open_or_build = staticmethod(timed)


def _ctx(job: dict, report):
    from services.runtime.contract import JobContext

    out = Path(job["workdir"]) / f"out-{job['stem']}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if job.get("student_init_dir"):  # built once by the parent with the trainer's own init
        (out / "student_init").symlink_to(job["student_init_dir"], target_is_directory=True)
    return JobContext(job_id="bench", output_dir=out, report=report, log=print), out


def _speed(job: dict) -> dict[str, Any]:
    from services.distillation.trainers import kd
    from services.training.trainers import sft

    total = job["warmup"] + job["steps"]
    probe = Probe(job["warmup"], total)
    timings: dict[str, float] = {}
    _timed_cache_build(timings)
    ctx, out = _ctx(job, probe.report)
    if job["kind"] == "sft":
        sft.run(sft_config(job, total), ctx)
    else:
        kd.run(kd_config(job, total), ctx)
    shutil.rmtree(out, ignore_errors=True)
    res = probe.result()
    res["ce_last"] = res["last_metrics"].get("train_ce_loss")
    return {**res, **timings}


def heldout_batches(model_path: str, dataset: str, seq_len: int, batch: int) -> list[dict]:
    """The held-out rows (valid.jsonl), tokenized and batched as the trainers do."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from services.runtime import datasets

    tok = load_tokenizer(Path(model_path))
    data = datasets.prepare(
        {"path": dataset}, tok, allowed_formats=("text",), max_seq_length=seq_len,
        mask_prompt=None, seed=0,
    )  # fmt: skip
    return list(data.batches("valid", batch, seed=0, shuffle=False))


def heldout_ce(model, batches: list[dict]) -> float:
    """Mean next-token cross entropy of ``model`` over the counted held-out tokens."""
    import mlx.core as mx
    import mlx.nn as nn

    total = count = 0.0
    for b in batches:
        logits = model(b["inputs"]).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, b["targets"], reduction="none")
        s, n = (ce * b["loss_mask"]).sum(), b["loss_mask"].sum()
        mx.eval(s, n)
        total, count = total + s.item(), count + n.item()
    return total / max(count, 1.0)


def _curve(job: dict) -> dict[str, Any]:
    """One trainer (KD or SFT) with the student's held-out CE every ``eval_every`` steps."""
    from services.distillation.trainers import kd
    from services.runtime.models import load_model
    from services.training.trainers import sft

    module = kd if job["kind"] == "kd" else sft
    total = job["steps"]
    held = heldout_batches(job["student"], job["dataset"], job["seq_len"], job["eval_batch"])
    probe = Probe(1, total)
    curve: list[dict[str, float]] = []
    seen: dict[str, Any] = {}

    def measure(step: int) -> None:
        tic = time.perf_counter()
        curve.append({"step": step, "ce": heldout_ce(seen["model"], held)})
        if 1 <= step < total:  # between two timed marks: not training time
            probe.excluded += time.perf_counter() - tic

    real_train = module.train

    def train(model, *args, **kwargs):  # the trainer's call into the shared loop
        seen["model"] = model
        measure(0)
        return real_train(model, *args, **kwargs)

    module.train = train

    def report(r) -> None:
        probe.report(r)
        if r.step % job["eval_every"] == 0 or r.step == total:
            measure(r.step)

    ctx, out = _ctx(job, report)
    cfg = kd_config(job, total) if job["kind"] == "kd" else sft_config(job, total)
    tic = time.perf_counter()
    module.run(cfg, ctx)
    wall = time.perf_counter() - tic
    shutil.rmtree(out, ignore_errors=True)
    res = probe.result()
    train_ce = {s: m.get("train_ce_loss", m.get("train_loss")) for s, m in probe.metrics.items()}
    result = {**res, "curve": curve, "train_ce": train_ce, "run_s": wall}
    if job["kind"] == "sft":  # the teacher's own held-out CE: where the student could get to
        teacher, _ = load_model(job["teacher_path"])
        result["teacher_ce"] = heldout_ce(teacher, held)
    return result


def child(job_file: Path) -> int:
    job = json.loads(job_file.read_text())
    out: dict[str, Any] = {"kind": job["kind"]}
    try:
        import mlx.core as mx

        out.update(_curve(job) if job["part"] == "compare" else _speed(job))
        out["device"] = str(mx.default_device())
    except Exception as exc:  # noqa: BLE001 - the parent reports it in the table
        import traceback

        traceback.print_exc()
        out["error"] = f"{type(exc).__name__}: {exc}"
    libs = common.blas_in_process()
    out.update(blas=common.describe_blas(libs), rss_gb=common.max_rss_gb())
    Path(job["result"]).write_text(json.dumps(out, indent=2, default=str))
    return 0


# ---------------------------------------------------------------- parent: models and data


def _teachers(name: str, home: Path, bits: int = 0) -> tuple[list[dict], int]:
    """([{model, extra}] for teachers 1 and 2, teacher layers) of a model set; ``bits``
    quantizes the second copy of a real model."""
    from services.runtime.models import build_tiny_model, resolve_model

    if name == "tiny":
        paths = []
        for cfg in TINY_TEACHERS:
            tag = f"bench-kd-l{cfg['num_layers']}-h{cfg['hidden_size']}-s{cfg['seed']}"
            paths.append(str(build_tiny_model(home / "models" / tag, **cfg)))
        return [{"model": p} for p in paths], TINY_TEACHERS[0]["num_layers"]
    path = common.local_model(name) or resolve_model(
        SMOLLM2 if name == "smollm2" else name, home, (home, Path.cwd())
    )
    layers = json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"]
    second = {"model": path, "extra": {"quantize_bits": bits} if bits else {}}
    return [{"model": path}, second], layers


def clean_text(sources: list[Path]) -> str:
    text = " ".join(p.read_text(errors="replace") for p in sources if p.is_file())
    return re.sub(r"\s+", " ", text).strip()


def text_split(out: Path, sources: list[Path], n_chars: int, train: int, valid: int) -> Path:
    """train.jsonl / valid.jsonl of ``n_chars``-character text rows; the valid rows are the
    last ``valid * n_chars`` characters, cut end to end, and no train row reaches them."""
    text = clean_text(sources)
    cut = len(text) - valid * n_chars
    if cut < 2 * n_chars:
        raise SystemExit(f"the text sources hold only {len(text)} characters")
    head, tail = text[:cut], text[cut:]
    stride = max(1, (len(head) - n_chars) // max(train - 1, 1))
    last = len(head) - n_chars
    rows = [head[min(i * stride, last) :][:n_chars] for i in range(train)]
    held = [tail[i * n_chars : (i + 1) * n_chars] for i in range(valid)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    (out / "valid.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in held))
    return out


def _lengths(model_path: str, dataset: Path, seq_len: int) -> dict[str, Any]:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from services.runtime import datasets

    tok = load_tokenizer(Path(model_path))
    data = datasets.prepare(
        {"path": str(dataset)}, tok, allowed_formats=("text",), max_seq_length=seq_len,
        mask_prompt=None, seed=0,
    )  # fmt: skip
    lens = [len(t.tokens) for t in data.train + data.valid]
    return {"rows": data.stats.rows, "valid_rows": data.stats.valid_rows, "min_len": min(lens),
            "max_len": max(lens), "target_tokens": data.stats.target_tokens}  # fmt: skip


def fixed_length_text(work: Path, tag: str, model: str, sources, seq_len, train, valid):
    """A text dataset whose every row is cut to exactly ``seq_len`` tokens (no padding, one
    shape): rows of 4 characters per token, doubled until the shortest row is long enough."""
    cpt = 4
    while True:
        ds = text_split(work / f"text-{tag}-L{seq_len}-c{cpt}", sources, seq_len * cpt, train,
                        valid)  # fmt: skip
        info = _lengths(model, ds, seq_len)
        if info["min_len"] == seq_len or cpt > 64:
            return ds, {**info, "chars_per_row": seq_len * cpt}
        cpt *= 2


# ---------------------------------------------------------------- parent: the runs


def _measure(args, work: Path, job: dict) -> common.ChildResult:
    stem = job["stem"]
    job = {**job, "result": str(work / f"{stem}.result.json"), "workdir": str(work)}
    job_file = work / f"{stem}.job.json"
    job_file.write_text(json.dumps(job))
    return common.run_child(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(job_file)],
        Path(job["result"]),
        timeout=args.timeout,
        log_file=work / f"{stem}.log",
    )


def _settings(args, model: str, on_gpu: bool) -> tuple[int, int, int, int]:
    base = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS.get(model, CPU_DEFAULTS["smollm2"])
    given = (args.batch_size, args.seq_len, args.warmup, args.steps)
    out = tuple(g if g is not None else b for g, b in zip(given, base, strict=True))
    if out[2] < 1 or out[3] < 1:
        raise SystemExit("--warmup and --steps must be >= 1")
    return out


def _refused(job: dict) -> str:
    """Validation's answer to a combination (features + cache), or '' when it is accepted."""
    from services.distillation import validate
    from services.runtime.errors import InvalidArgument

    try:
        validate.parse(kd_config(job, 1))
    except InvalidArgument as e:
        return "; ".join(f"{v.field}: {v.description}" for v in e.violations)
    return ""


def _speed_rows(args, work: Path, name: str, on_gpu: bool, shared: dict):
    from services.distillation.trainers import student

    batch, seq_len, warmup, steps = _settings(args, name, on_gpu)
    teachers, t_layers = _teachers(name, args.home, args.teacher2_bits)
    half = max(1, t_layers // 2)
    tag = common.slug(name)
    init_dir, _ = student.init_student(teachers[0]["model"], work / f"student-{tag}",
                                       num_layers=half)  # fmt: skip
    rows_needed = max(batch * (warmup + steps), 8)
    sources = args.text_source or common.default_text_sources()
    ds, info = fixed_length_text(work, tag, teachers[0]["model"], sources, seq_len,
                                 rows_needed, 8)  # fmt: skip
    shared["data"][name] = info
    print(f"[{name}] teacher layers {t_layers}, student {half}; data {json.dumps(info)}")
    base = {"part": "speed", "teachers": teachers[:1], "dataset": str(ds), "batch": batch,
            "seq_len": seq_len, "warmup": warmup, "steps": steps, "dtype": shared["dtype"],
            "lr": args.lr, "alpha": args.alpha, "temperature": args.temperature,
            "top_k": args.top_k, "student_layers": half, "student_init_dir": str(init_dir),
            "student": ""}  # fmt: skip
    rows, sft_tps = [], None
    for kind in _list(args.kinds):
        for cache in [False] if kind == "sft" else [False, True]:
            stem = f"{common.slug(name)}-{kind}-c{int(cache)}"
            job = {**base, "kind": kind, "cache": cache, "stem": stem}
            if kind == "sft":
                job.update(student=str(init_dir), student_init_dir="")
            if kind == "logit-2t":
                job["teachers"] = teachers
            job["features"] = kind.startswith("feature")
            row = {"model": name, "kind": kind, "cache": "on" if cache else "off",
                   "batch": batch, "seq_len": seq_len}  # fmt: skip
            if kind == "sft":
                row["cache"] = "n/a (no teacher)"
            refused = _refused(job) if kind != "sft" else ""
            if refused:
                rows.append({**row, "cache": "n/a", "note": f"refused by validation: {refused}"})
                print(f"  {name} {kind} cache={cache}: refused ({refused})", flush=True)
                continue
            runs = [_measure(args, work, job) for _ in range(args.repeat)]
            res = common.best(runs, "target_tps")
            r = res.result
            if not res.ok:
                rows.append({**row, "loss": "FAILED", "note": res.error[-400:]})
                print(f"  {name} {kind} cache={cache}: FAILED {res.error[-400:]}", flush=True)
                continue
            lf, ll = r.get("loss_first"), r.get("loss_last")
            row.update(
                steps=r["timed_steps"], target_tps=r["target_tps"], step_ms=1000 * r["step_s_mean"],
                median_ms=1000 * r["step_s_median"], cpu_ms=1000 * r["cpu_s_per_step"],
                peak_train_gb=r["peak_train_gb"], peak_all_gb=r["peak_all_gb"],
                rss_gb=r["rss_gb"], cache_s=r.get("cache_s"),
                loss=f"{lf:.3f}→{ll:.3f}" if lf is not None and ll is not None else "",
                child_seconds=round(res.seconds, 1), detail=r,
                all_tps=[x.result.get("target_tps") for x in runs if x.ok],
            )  # fmt: skip
            if kind == "logit-2t":
                bits = args.teacher2_bits
                row["note"] = "teacher 2: " + (
                    "tiny 4 x 96, seed 2" if name == "tiny"
                    else f"a second copy, quantized to {bits} bits" if bits
                    else "a second copy of the same model"
                )  # fmt: skip
            if kind == "sft":
                sft_tps = r["target_tps"]
            if sft_tps:
                row["vs_sft"] = r["target_tps"] / sft_tps
            rows.append(row)
            print(
                f"  {name} {kind} cache={cache}: {r['target_tps']:.1f} tok/s, "
                f"peak {r['peak_train_gb']:.2f} GB ({res.seconds:.0f} s)",
                flush=True,
            )
    return rows


def _list(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--parts", default="speed,compare", help="speed, compare, or both (default)")
    add("--models", default="tiny,smollm2", help="tiny, smollm2, or a teacher model directory")
    add("--kinds", default=",".join(KINDS), help="of " + ", ".join(KINDS))
    add("--steps", type=int, help="timed steps (after --warmup); default by model")
    add("--warmup", type=int, help="untimed steps first (>= 1)")
    add("--batch-size", type=int)
    add("--seq-len", type=int, help="tokens per row (every row is cut to exactly this)")
    add("--lr", type=float, default=1e-5, help="speed runs (AdamW, constant)")
    add("--alpha", type=float, default=0.5, help="KD weight (1 - alpha on the data CE)")
    add("--temperature", type=float, default=2.0)
    add("--top-k", type=int, default=32, help="teacher cache top-k")
    add("--teacher2-bits", type=int, default=0, choices=[0, 4, 8],
        help="quantize the second copy of a real teacher (MLX's quantized matmul is ~50x "
             "slower than fp32 + OpenBLAS on this CPU)")  # fmt: skip
    kd_compare.add_args(add)
    add("--text-source", action="append", type=Path,
        help="text file(s) for the rows (default: the repo's *.md files)")  # fmt: skip
    add("--repeat", type=int, default=1, help="speed runs: N runs each, the best is kept")
    add("--dtype", default="auto", help="auto = float32 on CPU, bfloat16 on GPU")
    add("--home", type=Path, default=Path(os.environ.get("MLXU_HOME", "~/.mlxu")).expanduser())
    add("--out", type=Path, default=common.RESULTS)
    add("--timeout", type=float, default=1800, help="seconds per child process")
    add("--keep", action="store_true", help="keep the work dir (job files, logs, data)")
    add("--child", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


NOTES = [
    "tok/s: tokens that carry loss per second (rows are cut to exactly seq len tokens: every "
    "position but the last), from the trainer's own per-step reports; timed from the end of "
    "the last warmup step to the end of the last step. tok/s vs SFT: over plain SFT of the "
    "same student on the same rows.",
    "peak GB (train): mx.get_peak_memory over the timed steps; (all): the whole process, "
    "model loads and the cache build included. With the cache the teachers are unloaded "
    "before training. max RSS: ru_maxrss of the process.",
    "cache build s: TeacherCache.open_or_build (one teacher pass over every train and "
    "validation row), before step 1, not in tok/s.",
    "Student: student_init at half the teacher's depth (evenly spaced blocks, first and last "
    "kept), full fine-tuning, AdamW constant lr; the copy is built once per model by the "
    "trainer's own init_student and linked into each run's output dir.",
    "KD: forward KL, alpha and temperature as in the settings; features: cosine, uniform "
    "layer map, weight 1.",
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
    work = Path(tempfile.mkdtemp(prefix="bench-kd-"))
    shared = {"data": {}, "dtype": compute_dtype() if args.dtype == "auto" else args.dtype}
    info = common.machine({"device": str(mx.default_device()),
                           "blas": common.describe_blas(common.blas_in_process()),
                           "blas_path": blas.loaded or blas.reason})  # fmt: skip
    parts = _list(args.parts)
    if "speed" in parts:
        rows = [r for name in _list(args.models) for r in _speed_rows(args, work, name, on_gpu,
                                                                     shared)]  # fmt: skip
        settings = {"dtype": shared["dtype"], "lr": args.lr, "alpha": args.alpha,
                    "temperature": args.temperature, "top_k": args.top_k, "repeat": args.repeat,
                    "wall_s": round(time.perf_counter() - tic, 1)}  # fmt: skip
        notes = NOTES + busy_notes()
        _, md_path, text = common.write_results(
            "kd", rows, COLUMNS, info, settings=settings, notes=notes, out_dir=args.out,
            extra={"data": shared["data"], "argv": sys.argv[1:]},
        )  # fmt: skip
        print("\n" + text + f"\nwrote {md_path}")
    if "compare" in parts:
        t0 = time.perf_counter()
        dtype = shared["dtype"] if args.compare_dtype == "auto" else args.compare_dtype
        rows, summary = kd_compare.run(args, work, dtype, on_gpu, _measure)
        settings = {"dtype": dtype, "seeds": args.seeds, "steps": args.compare_steps,
                    "batch": args.compare_batch, "seq_len": args.compare_seq_len,
                    "lr": args.compare_lr, "eval_every": args.eval_every,
                    "wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
        json_path, md_path, text = common.write_results(
            "kd-vs-sft", rows, kd_compare.COLUMNS, info, settings=settings,
            notes=kd_compare.notes(args, summary) + busy_notes(), out_dir=args.out,
            extra={"summary": summary, "argv": sys.argv[1:]},
        )  # fmt: skip
        print("\n" + text + f"\nwrote {json_path} and {md_path}")
    print(f"total {time.perf_counter() - tic:.0f} s")
    if args.keep:
        print(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def busy_notes() -> list[str]:
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        return [f"the machine was busy (load average {load:.1f} on {os.cpu_count()} cores): "
                "CPU timings are noisy"]  # fmt: skip
    return []


if __name__ == "__main__":
    raise SystemExit(main())
