"""SFT speed and memory: our trainer (services.training.trainers.sft) beside mlx-lm's own
trainer (mlx_lm.tuner.trainer.train), LoRA and full, on the same data, model, batch size,
sequence length, LoRA settings, optimizer (AdamW, constant lr) and number of steps.

    uv run python bench/bench_sft.py                    # CPU defaults: < 10 minutes on 2 cores
    uv run python bench/bench_sft.py --models smollm2 --methods full --steps 10 --warmup 2
    uv run python bench/bench_sft.py --peer torch       # + PyTorch eager / torch.compile (GPU)

Each (model, method, data, side) runs in its own process (clean peak memory). Both MLX sides
``import services`` before mlx.core, so both run on the same OpenBLAS; each row says which BLAS
its process had mapped. Steps 1..warmup are not timed; the clock runs from the end of step
``warmup`` to the end of the last step, measured by each loop's per-step report callback.

tokens/s: "target" counts the tokens that carry loss (counted the same way for every side);
"total" counts every position of the padded input batches (B x L, padding included). Peak
memory: mx.get_peak_memory over the timed steps ("train"), over the whole process ("all"),
and the process's max RSS. Results: bench/results/sft-<host>-<date>.json and .md.
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

import services  # noqa: F401 - first: loads OpenBLAS before anything imports mlx.core

HERE = Path(__file__).resolve().parent
TINY_CONFIGS = {  # name -> build_tiny_model arguments
    "tiny": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2,
             "intermediate_size": 128},
    "tiny256": {"num_layers": 4, "hidden_size": 256, "num_heads": 8, "num_kv_heads": 4,
                "intermediate_size": 768},
    # Random-weight models of real shapes (GPU runs): SmolLM2-135M and Llama-3.2-1B.
    "smol135": {"num_layers": 30, "hidden_size": 576, "num_heads": 9, "num_kv_heads": 3,
                "intermediate_size": 1536, "vocab_size": 49152},
    "llama1b": {"num_layers": 16, "hidden_size": 2048, "num_heads": 32, "num_kv_heads": 8,
                "intermediate_size": 8192, "vocab_size": 128256},
}  # fmt: skip
MODEL_ALIASES = {"smollm2": "smollm2-135m-instruct"}
# (batch, seq_len, warmup, steps) when not given: the CPU set keeps the default run < 10 min.
CPU_DEFAULTS = {"tiny": (4, 256, 3, 20), "tiny256": (4, 256, 3, 15), "smollm2": (2, 128, 2, 4)}
GPU_DEFAULTS = (8, 1024, 5, 30)
# mlxu-logits: our trainer with the head-fused loss off (services.runtime.linear_ce).
# mlxu-dense: the fused head at every position, not only at the counted targets
# (services.runtime.data_batches.with_target_index).
MLX_SIDES = ("mlxu", "mlx-lm")
EXTRA_SIDES = ("mlxu-logits", "mlxu-dense")
TORCH_SIDES = ("torch-eager", "torch-compile")
COLUMNS = [
    ("model", "model"), ("method", "method"), ("data", "data"), ("side", "side"),
    ("steps", "steps"), ("batch", "batch"), ("seq_len", "seq len"), ("dtype", "dtype"),
    ("target_tps", "target tok/s"), ("total_tps", "total tok/s"), ("step_ms", "ms/step"),
    ("median_ms", "median ms/step"), ("cpu_ms", "CPU ms/step"),
    ("peak_train_gb", "peak GB (train)"), ("peak_all_gb", "peak GB (all)"),
    ("rss_gb", "max RSS GB"), ("loss", "loss first→last"), ("ratio", "mlxu/peer tok/s"),
    ("mem_ratio", "mlxu/peer peak"), ("blas", "BLAS"),
]  # fmt: skip


# ---------------------------------------------------------------- child: one measurement


class _Probe:
    """Per-step marks from a loop's report callback: time, tokens, peak memory."""

    def __init__(self, warmup: int, total: int) -> None:
        import mlx.core as mx

        self.mx, self.warmup, self.total = mx, warmup, total
        self.clock = common.StepClock(warmup)
        self.tokens: dict[int, float] = {}
        self.losses: dict[int, float] = {}
        self.cpu: dict[int, float] = {}
        self.peak_before = self.peak_train = 0.0

    def step(self, step: int, tokens: float, loss: float) -> None:
        self.clock.mark(step)
        self.cpu[step] = time.process_time()
        self.tokens[step], self.losses[step] = tokens, loss
        if step == self.warmup:
            self.peak_before = self.mx.get_peak_memory() / 1e9
            self.mx.reset_peak_memory()
        if step == self.total:
            self.peak_train = self.mx.get_peak_memory() / 1e9

    def result(self, batches: list[tuple[int, int, int]]) -> dict[str, Any]:
        """``batches``: (rows, width, target tokens) of each training batch, in order."""
        w, n = self.warmup, self.total
        timing = self.clock.summary()
        secs = timing["seconds"] or float("nan")
        target = sum(t for _, _, t in batches[w:n])
        total = sum(b * length for b, length, _ in batches[w:n])
        return {
            **timing,
            "target_tokens": target,
            "reported_target_tokens": self.tokens.get(n, 0.0) - self.tokens.get(w, 0.0),
            "total_tokens": total,
            "target_tps": target / secs,
            "total_tps": total / secs,
            "cpu_s_per_step": (self.cpu[n] - self.cpu[w]) / max(n - w, 1),
            "shapes": sorted({f"{b}x{length}" for b, length, _ in batches[w:n]}),
            "loss_first": self.losses.get(1),
            "loss_last": self.losses.get(n),
            "peak_train_gb": self.peak_train,
            "peak_all_gb": max(self.peak_before, self.peak_train),
        }


def _record_batches() -> list[tuple[int, int, int]]:
    """(rows, width, target tokens) of the training batches our Batches hand out."""
    from services.runtime import data_batches

    seen: list[tuple[int, int, int]] = []
    collate = data_batches.Batches._collate

    def recording(self, idx):
        batch = collate(self, idx)
        if self.shuffle:
            seen.append((*batch["inputs"].shape, batch["ntokens"]))
        return batch

    data_batches.Batches._collate = recording
    return seen


def _run_mlxu(job: dict, probe: _Probe) -> list[tuple[int, int, int]]:
    from services.runtime.contract import JobContext, Report
    from services.training.trainers import sft

    seen = _record_batches()
    config = {
        "model": {"model": job["model"]},
        "dataset": job["dataset"],
        "method": job["method"],
        "lora": job["lora"],
        "optimizer": {"name": "adamw", "learning_rate": job["lr"], "schedule": "constant",
                      "weight_decay": job["weight_decay"]},
        "loop": {"batch_size": job["batch"], "max_steps": job["warmup"] + job["steps"],
                 "max_seq_length": job["seq_len"], "steps_per_report": 1,
                 "steps_per_eval": -1, "steps_per_checkpoint": -1, "keep_last_checkpoints": 1,
                 "dtype": job["dtype"], "seed": job["seed"]},
    }  # fmt: skip

    def report(r: Report) -> None:
        probe.step(r.step, float(r.tokens), float(r.metrics.get("train_loss", float("nan"))))

    out = Path(job["workdir"]) / "mlxu-out"
    shutil.rmtree(out, ignore_errors=True)
    ctx = JobContext(job_id="bench", output_dir=out, report=report, log=print)
    sft.run(config, ctx)
    shutil.rmtree(out, ignore_errors=True)
    return seen


def _in_order(dataset: list, order: list[list[int]], max_seq_length: int):
    """mlx-lm's batches (its padding, to 1 + a multiple of 32, capped at max_seq_length, and
    its (offset, length) pairs) with the rows of each batch taken from ``order``."""
    import mlx.core as mx
    import numpy as np

    for rows in order:
        seqs = [dataset[i] for i in rows]
        lengths = [min(len(t), max_seq_length) for t, _ in seqs]
        width = min(1 + 32 * ((max(lengths) + 31) // 32), max_seq_length)
        arr = np.zeros((len(rows), width), np.int32)
        for j, (t, _) in enumerate(seqs):
            arr[j, : lengths[j]] = t[: lengths[j]]
        yield mx.array(arr), mx.array([[p, n] for (_, p), n in zip(seqs, lengths, strict=True)])


def _run_mlx_lm(job: dict, probe: _Probe) -> list[tuple[int, int, int]]:
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    mx.random.seed(job["seed"])
    np.random.seed(job["seed"])
    model, _ = load(job["model"])
    model.set_dtype(getattr(mx, job["dtype"]))  # as our loader: weights in the training dtype
    mx.eval(model.parameters())
    model.freeze()
    if job["method"] == "full":
        model.unfreeze()  # every parameter, as our full SFT (mlx-lm's CLI: the last N blocks)
    else:
        lora = job["lora"]
        params = {"rank": lora["rank"], "scale": lora["scale"], "dropout": lora["dropout"]}
        if lora.get("keys"):
            params["keys"] = lora["keys"]
        n = len(model.layers) if lora["num_layers"] == -1 else lora["num_layers"]
        linear_to_lora_layers(model, min(n, len(model.layers)), params)
    saved = json.loads(Path(job["items"]).read_text())
    dataset = [(t, p) for t, p in saved["items"]]
    order = saved["order"] if job.get("order") == "ours" else None
    seen: list[tuple[int, int, int]] = []

    def batches(*args, **kwargs):
        source = _in_order(dataset, order, job["seq_len"]) if order else None
        for batch, lengths in source or iterate_batches(*args, **kwargs):
            # Targets counted as ours: tokens[max(offset, 1):length]. mlx-lm's own count
            # (its mask: steps <= length) takes one more, a pad target, per row that is
            # shorter than the batch; that one lands in reported_target_tokens.
            targets = sum(max(0, n - max(off, 1)) for off, n in lengths.tolist())
            seen.append((batch.shape[0], batch.shape[1] - 1, targets))
            yield batch, lengths

    class Callback(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            probe.step(info["iteration"], float(info["trained_tokens"]), info["train_loss"])

    total = job["warmup"] + job["steps"]
    args = TrainingArgs(
        batch_size=job["batch"],
        iters=total,
        steps_per_report=1,
        steps_per_eval=total + 1,
        steps_per_save=total + 1,
        max_seq_length=job["seq_len"],
        adapter_file=str(Path(job["workdir"]) / "mlx-lm-adapters.safetensors"),
    )
    opt = optim.AdamW(learning_rate=job["lr"], weight_decay=job["weight_decay"])
    train(model, opt, dataset, None, args, iterate_batches=batches, training_callback=Callback())
    return seen


def child(job_file: Path) -> int:
    job = json.loads(job_file.read_text())
    out: dict[str, Any] = {"side": job["side"]}
    try:
        import mlx.core as mx

        from services.runtime import blas

        out["blas_loaded"] = blas.loaded or blas.reason
        probe = _Probe(job["warmup"], job["warmup"] + job["steps"])
        load0 = os.getloadavg()[0]
        if job["side"] == "mlxu-logits":
            from services.runtime import linear_ce

            linear_ce.ENABLED = False
        if job["side"] == "mlxu-dense":
            from services.runtime import data_batches

            data_batches.TARGET_INDEX = False
        runner = _run_mlx_lm if job["side"] == "mlx-lm" else _run_mlxu
        out.update(probe.result(runner(job, probe)))
        out["device"] = str(mx.default_device())
        out["loadavg"] = [load0, os.getloadavg()[0]]
    except Exception as exc:  # noqa: BLE001 - the parent reports it in the table
        import traceback

        traceback.print_exc()
        out["error"] = f"{type(exc).__name__}: {exc}"
    libs = common.blas_in_process()
    out.update(blas_libs=libs, blas=common.describe_blas(libs), rss_gb=common.max_rss_gb())
    out["matmul_gflops"] = common.mlx_cpu_matmul_gflops()
    Path(job["result"]).write_text(json.dumps(out, indent=2, default=str))
    return 0


# ---------------------------------------------------------------- parent: models and data


def _resolve_models(names: list[str], home: Path) -> dict[str, str]:
    from services.runtime.models import build_tiny_model, resolve_model

    out = {}
    for name in names:
        if name in TINY_CONFIGS:
            cfg = TINY_CONFIGS[name]
            shape = f"l{cfg['num_layers']}-h{cfg['hidden_size']}-v{cfg.get('vocab_size', 512)}"
            tag = f"bench-tiny-{shape}"
            out[name] = str(build_tiny_model(home / "models" / tag, **cfg))
        else:  # a model directory given by path is used as it is, wherever it lies
            out[name] = common.local_model(name) or resolve_model(
                MODEL_ALIASES.get(name, name), home, (home, Path.cwd())
            )
    return out


def _our_order(data, batch: int, steps: int, seed: int) -> list[list[int]] | None:
    """The rows of each of our trainer's first ``steps`` batches (as sft.run batches them),
    or None when the batching internals moved and the peers must use their own order."""
    from services.training.trainers.sft import SORT_CHUNK

    try:
        sched = data.batches("train", batch, seed=seed, sort_chunk=SORT_CHUNK)._sched
        order: list[list[int]] = []
        epoch = 0
        while len(order) < steps:
            order += [list(g) for g in sched.order(epoch)]
            epoch += 1
        return order[:steps]
    except Exception as exc:  # noqa: BLE001 - a private detail of data_batches
        print(f"cannot replay our batch order ({exc}); the peers use their own", flush=True)
        return None


def _items(model_path: str, ds: dict, seq_len: int, batch: int, steps: int, dst: Path) -> dict:
    """Tokenize as our trainer does (same function, seed and split) and write the training
    sequences for the peers, which then see exactly our token sequences, and the rows of
    each of our batches, so that they can also take them in our order."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from services.runtime import datasets

    tok = load_tokenizer(Path(model_path))
    data = datasets.prepare(
        ds, tok, allowed_formats=("text", "chat", "completion"),
        max_seq_length=seq_len, mask_prompt=None, seed=0,
    )  # fmt: skip
    items = [[t.tokens, t.prompt_len] for t in data.train]
    dst.write_text(json.dumps({"items": items, "order": _our_order(data, batch, steps, 0)}))
    lengths = [len(t) for t, _ in items]
    return {"format": data.format, "rows": len(items), "min_len": min(lengths),
            "max_len": max(lengths), "mean_len": sum(lengths) / len(lengths),
            "tokens": data.stats.tokens, "target_tokens": data.stats.target_tokens}  # fmt: skip


# ---------------------------------------------------------------- parent: the runs


def _settings(args, model: str, on_gpu: bool) -> tuple[int, int, int, int]:
    base = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS.get(model, CPU_DEFAULTS["smollm2"])
    given = (args.batch_size, args.seq_len, args.warmup, args.steps)
    out = tuple(g if g is not None else b for g, b in zip(given, base, strict=True))
    if out[2] < 1 or out[3] < 1:
        raise SystemExit("--warmup and --steps must be >= 1")
    return out


def _dataset(args, work: Path, name: str, model_path: str, data: str, sizes: tuple):
    """(dataset ref for our trainer, items file for the peers, stats)."""
    batch, seq_len, warmup, steps = sizes
    items = work / f"items-{common.slug(name)}-{common.slug(data)}.json"
    prep = (seq_len, batch, warmup + steps, items)
    if data != "text":
        ds = {"path": str(Path(args.data if data == "faq" else data).resolve())}
        return ds, items, _items(model_path, ds, *prep)
    sources = args.text_source or common.default_text_sources()
    cpt = 8  # characters per token: every row must reach seq_len tokens, so none is padded
    while True:
        out = work / f"text-L{seq_len}-c{cpt}"
        ds = {"path": str(common.text_dataset(out, sources, seq_len * cpt, args.text_rows))}
        info = _items(model_path, ds, *prep)
        if info["min_len"] == seq_len or cpt > 64:
            return ds, items, info
        cpt *= 2


def _measure(args, work: Path, job: dict, stem: str) -> common.ChildResult:
    job_file = work / f"{stem}.job.json"
    job = {**job, "result": str(work / f"{stem}.result.json")}
    job_file.write_text(json.dumps(job))
    torch = job["side"] in TORCH_SIDES
    script = HERE / ("bench_sft_torch.py" if torch else "bench_sft.py")
    python = args.torch_python if torch else sys.executable
    return common.run_child(
        [python, str(script), "--child", str(job_file)],
        Path(job["result"]),
        timeout=args.timeout,
        log_file=work / f"{stem}.log",
    )


def _row(job: dict, res: common.ChildResult, data: str, model: str) -> dict[str, Any]:
    r = res.result
    row = {"model": model, "method": job["method"], "data": data, "side": job["side"],
           "batch": job["batch"], "seq_len": job["seq_len"], "dtype": job["dtype"],
           "blas": r.get("blas", ""), "rss_gb": r.get("rss_gb")}  # fmt: skip
    if not res.ok:
        return {**row, "error": res.error[-600:], "loss": "FAILED"}
    lf, ll = r.get("loss_first"), r.get("loss_last")
    row.update(
        steps=r["timed_steps"],
        target_tps=r["target_tps"],
        total_tps=r["total_tps"],
        step_ms=1000 * r["step_s_mean"],
        median_ms=1000 * r["step_s_median"],
        cpu_ms=1000 * r["cpu_s_per_step"],
        peak_train_gb=r.get("peak_train_gb"),
        peak_all_gb=r.get("peak_all_gb"),
        loss=f"{lf:.3f}→{ll:.3f}" if lf is not None and ll is not None else "",
        detail={k: v for k, v in r.items() if k not in row},
        child_seconds=round(res.seconds, 1),
    )
    return row


def _ratios(rows: list[dict]) -> None:
    """On each peer row: our target tokens/s and peak memory over the peer's."""
    ours = {(r["model"], r["method"], r["data"]): r for r in rows if r["side"] == "mlxu"}
    for r in rows:
        me = ours.get((r["model"], r["method"], r["data"]))
        if r["side"] == "mlxu" or not me or not me.get("target_tps") or not r.get("target_tps"):
            continue
        r["ratio"] = me["target_tps"] / r["target_tps"]
        if me.get("peak_train_gb") and r.get("peak_train_gb"):
            r["mem_ratio"] = me["peak_train_gb"] / r["peak_train_gb"]


def _bench(args, work: Path, name: str, path: str, data: str, on_gpu: bool, shared: dict):
    """Every method and side for one (model, data); yields table rows."""
    batch, seq_len, warmup, steps = sizes = _settings(args, name, on_gpu)
    ds, items, info = _dataset(args, work, name, path, data, sizes)
    shared["data"][f"{name}/{data}"] = info
    print(f"[{name} / {data}] {json.dumps(info)}", flush=True)
    for method in _list(args.methods):
        runs: dict[str, list[common.ChildResult]] = {s: [] for s in shared["sides"]}
        job = {"model": path, "method": method, "dataset": ds, "items": str(items),
               "batch": batch, "seq_len": seq_len, "warmup": warmup, "steps": steps,
               "lr": args.lr, "weight_decay": args.weight_decay, "lora": shared["lora"],
               "dtype": shared["dtype"], "seed": 0, "workdir": str(work),
               "order": args.order}  # fmt: skip
        for rep in range(args.repeat):  # sides alternate, so a busy spell hits both
            for side in shared["sides"]:
                # A model or dataset given as a path must not put '/' into a file name.
                stem = f"{common.slug(name)}-{common.slug(data)}-{method}-{side}-{rep}"
                res = _measure(args, work, {**job, "side": side}, stem)
                runs[side].append(res)
                got = (f"{res.result['target_tps']:.1f} target tok/s" if res.ok
                       else f"FAILED: {res.error[-300:]}")  # fmt: skip
                print(f"  {name} {method} {data} {side}: {got} ({res.seconds:.0f} s)", flush=True)
        for side, results in runs.items():
            row = _row({**job, "side": side}, common.best(results, "target_tps"), data, name)
            if args.repeat > 1:
                row["all_target_tps"] = [r.result.get("target_tps") for r in results if r.ok]
            yield row


def _list(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--models", default="tiny,tiny256,smollm2",
        help="tiny (2 layers, hidden 64), tiny256 (4 layers, hidden 256), smollm2, or a model "
             "directory / registered name")  # fmt: skip
    add("--methods", default="lora,full")
    add(
        "--datasets",
        default="faq,text",
        help="faq = --data; text = fixed-length rows of real text; or a dataset path",
    )
    add("--data", default=str(common.REPO / "examples/data/mlxu_faq"), help="the 'faq' data")
    add(
        "--text-source",
        action="append",
        type=Path,
        help="text file(s) cut into the 'text' rows (default: the repo's *.md files)",
    )
    add("--text-rows", type=int, default=64)
    add("--sides", default=",".join(MLX_SIDES))
    add(
        "--order",
        choices=["ours", "own"],
        default="ours",
        help="ours: the peers take the rows of each batch in our trainer's order (same "
        "target tokens every step; each side still pads its own way); own: their own",
    )
    add("--peer", choices=["torch"], help="also PyTorch eager + torch.compile")
    add("--torch-python", default=sys.executable, help="interpreter for the torch sides")
    add("--steps", type=int, help="timed steps (after --warmup); default by model and device")
    add("--warmup", type=int, help="untimed steps first (>= 1)")
    add("--batch-size", type=int)
    add("--seq-len", type=int, help="max_seq_length (the text rows are this long)")
    add("--lr", type=float, default=1e-5)
    add("--weight-decay", type=float, default=0.01)
    add("--lora-rank", type=int, default=8)
    add("--lora-scale", type=float, default=20.0)
    add("--lora-layers", type=int, default=16)
    add("--lora-keys", default="", help="comma-separated; empty = mlx-lm's default (all linear)")
    add("--dtype", default="auto", help="auto = float32 on CPU, bfloat16 on GPU")
    add("--repeat", type=int, default=1, help="run the sides N times (alternating), keep best")
    add("--home", type=Path, default=Path(os.environ.get("MLXU_HOME", "~/.mlxu")).expanduser())
    add("--out", type=Path, default=common.RESULTS)
    add("--timeout", type=float, default=1800, help="seconds per child process")
    add("--keep", action="store_true", help="keep the work dir (job files, logs, data)")
    add("--child", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


NOTES = [
    "target tok/s: tokens that carry loss, per second; total tok/s: every B x L position of "
    "the padded inputs. Timed from the end of the last warmup step to the end of the last "
    "step as each loop reports it (data loading and per-step bookkeeping included).",
    "Every side trains the same token sequences (tokenized once by services.runtime.datasets) "
    "with the same model, dtype, LoRA layers, AdamW (constant lr) and steps, and (--order "
    "ours, the default) the same rows in each step, in our trainer's order; each pads its own "
    "way (ours: multiples of 32 up to 512, then 128, then 512; mlx-lm: multiples of 32; torch: "
    "one fixed width).",
    "full = every parameter trains on all sides (mlx-lm's CLI would unfreeze only the last "
    "num_layers blocks).",
    "peak GB (train): mx.get_peak_memory over the timed steps (reset after warmup); (all): "
    "the whole process incl. model load; torch rows: torch.cuda.max_memory_allocated.",
    "BLAS: what each process had mapped; 'openblas-pthread' = Debian's OpenBLAS loaded "
    "globally by `import services` (both MLX sides), which shadows the reference BLAS that "
    "the mlx-cpu wheel bundles; matmul_gflops in the JSON confirms it per process.",
    "CPU ms/step: the process's CPU time (all threads) per timed step; it moves less than "
    "wall time when other processes compete for the cores.",
]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        return child(args.child)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import mlx.core as mx

    from services.runtime import blas
    from services.runtime.models import compute_dtype

    tic = time.perf_counter()
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    lora = {"rank": args.lora_rank, "scale": args.lora_scale, "dropout": 0.0,
            "num_layers": args.lora_layers, "keys": _list(args.lora_keys)}  # fmt: skip
    sides = _list(args.sides) + (list(TORCH_SIDES) if args.peer == "torch" else [])
    shared = {"sides": sides, "lora": lora, "data": {},
              "dtype": compute_dtype() if args.dtype == "auto" else args.dtype}  # fmt: skip
    names = _list(args.models)
    paths = _resolve_models(names, args.home.resolve())
    rows = [
        row
        for name in names
        for data in _list(args.datasets)
        for row in _bench(args, work, name, paths[name], data, on_gpu, shared)
    ]
    _ratios(rows)

    info = common.machine({"device": str(mx.default_device()),
                           "device_name": mx.device_info().get("device_name", ""),
                           "blas": common.describe_blas(common.blas_in_process()),
                           "blas_path": blas.loaded or blas.reason})  # fmt: skip
    settings = {"dtype": shared["dtype"], "lr": args.lr, "weight_decay": args.weight_decay,
                "optimizer": "adamw, constant lr", "lora": lora, "repeat": args.repeat,
                "wall_s": round(time.perf_counter() - tic, 1)}  # fmt: skip
    notes = list(NOTES)
    load = os.getloadavg()[0]
    if not on_gpu and load > (os.cpu_count() or 1):
        notes.append(f"the machine was busy (load average {load:.1f} on {os.cpu_count()} "
                     "cores): CPU timings are noisy; --repeat helps")  # fmt: skip
    json_path, md_path, text = common.write_results(
        "sft",
        rows,
        COLUMNS,
        info,
        settings=settings,
        notes=notes,
        out_dir=args.out,
        extra={"data": shared["data"], "argv": sys.argv[1:]},
    )
    print("\n" + text)
    for r in rows:
        if r.get("error"):
            print(f"{r['model']} {r['method']} {r['data']} {r['side']}: {r['error']}")
    print(f"wrote {json_path} and {md_path}")
    if args.keep:
        print(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
