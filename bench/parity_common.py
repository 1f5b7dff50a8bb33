"""What every parity script shares: the committed tiny model, running *our* trainer with the
batches it consumed recorded, a PyTorch optimizer built to the same settings, and the curve
files that CI replays.

The method (docs/parity.md says it for a reader):

1. Our trainer runs exactly as a job runs it (its ``run(config, ctx)`` entry point), with
   ``steps_per_report = 1`` so every step's training loss is reported, and validation off.
   :func:`recording_batches` wraps the shared loop's batch hand-off, so the harness knows
   the exact tensors (token ids, masks, reference log-probs, ...) each optimizer step saw.
2. The reference (transformers + peft + torch.optim, TRL's loss code) starts from the same
   weights (``model.safetensors`` of the same directory; LoRA A matrices copied from ours,
   B = 0 on both sides), is fed those same tensors in the same order, with the same
   hyperparameters, and its per-step loss and final trainable parameters are recorded.
3. ``compare`` gives per-step |Δloss| (absolute and relative) and the final parameter gap.
4. For the tiny model on the CPU in fp32, the reference curve is written to
   ``tests/parity/curves/<name>.json`` with the command that made it. CI
   (tests/parity/test_parity_replay.py) replays our trainer from that file, without torch,
   and fails if any step drifts past the tolerance.

This module imports neither torch nor mlx at import time (only ``services``, which loads
OpenBLAS before anything imports ``mlx.core``): tests use the "ours" half without torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import services  # noqa: F401 - first: loads OpenBLAS before anything imports mlx.core

REPO = Path(__file__).resolve().parent.parent
PARITY = REPO / "tests" / "parity"
MODEL_DIR = PARITY / "model"  # the committed tiny llama the curves were made on
DATA_DIR = PARITY / "data"
CURVES = PARITY / "curves"
RESULTS = REPO / "bench" / "results"

# The targets of issue 10: relative |Δloss| at every step.
CPU_RTOL = 1e-3
GPU_RTOL = 2e-2


# ---------------------------------------------------------------- the model and the data


def model_dir() -> Path:
    """The committed tiny model (a 2-block llama, 512-token vocab, untied head), built once
    by ``python bench/parity.py --build-model``."""
    if not (MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"{MODEL_DIR} is missing: run bench/parity.py --build-model")
    return MODEL_DIR


def build_model(out: Path = MODEL_DIR, seed: int = 1234, **sizes: int) -> Path:
    """(Re)build the committed tiny model (another ``seed`` and dir: a second model, e.g. a
    KD teacher; ``sizes`` override num_layers / hidden_size / num_heads / num_kv_heads /
    intermediate_size for a differently shaped one, same tokenizer and vocabulary). Untied
    embeddings: a tied head would hide a mis-mapped ``lm_head`` in the comparison. Only for
    regenerating every curve."""
    from services.runtime.models import build_tiny_model

    shape = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2,
             "intermediate_size": 128}  # fmt: skip
    unknown = set(sizes) - set(shape)
    if unknown:
        raise TypeError(f"build_model: unknown size arguments {sorted(unknown)}")
    return build_tiny_model(
        out, **{**shape, **sizes}, vocab_size=512, tie_word_embeddings=False, seed=seed
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha(model: Path) -> str:
    return sha256_file(Path(model) / "model.safetensors")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- running ours


@dataclass
class OursRun:
    losses: list[float]  # the training loss of each optimizer step (before its update)
    metrics: list[dict[str, float]]  # every reported metric, per step
    batches: list[list[dict[str, Any]]]  # per step: its micro-batches as numpy arrays
    output_dir: Path
    initial: dict[str, Any] = field(default_factory=dict)  # trainable params before step 1
    final: Path | None = None  # the published checkpoint dir
    logs: list[str] = field(default_factory=list)


@contextlib.contextmanager
def recording_batches(initial: dict[str, Any] | None = None) -> Iterator[list[dict[str, Any]]]:
    """Record (as numpy) every micro-batch the shared loop hands to a compiled step, and
    (into ``initial``) the trainable parameters as the loop's step is built, i.e. after any
    random init (LoRA A, heads) and before the first update.

    The loop passes each batch through ``services.runtime.loop._arrays`` once, right before
    the step; evaluation also does, so runs that record keep validation off."""
    import numpy as np
    from mlx.utils import tree_flatten

    from services.runtime import loop

    seen: list[dict[str, Any]] = []
    original, step_cls = loop._arrays, loop._Step

    def spy(batch: dict) -> dict:
        arrays = original(batch)
        seen.append({k: np.array(v) for k, v in arrays.items()})
        return arrays

    class SpyStep(step_cls):  # type: ignore[misc, valid-type]
        def __init__(self, model, *args, **kwargs) -> None:
            if initial is not None and not initial:
                for k, v in tree_flatten(model.trainable_parameters()):
                    initial[k] = np.array(v.astype(mx.float32))
            super().__init__(model, *args, **kwargs)

    import mlx.core as mx

    loop._arrays, loop._Step = spy, SpyStep
    try:
        yield seen
    finally:
        loop._arrays, loop._Step = original, step_cls


def run_ours(
    trainer: Callable[[dict, Any], Any],
    config: dict,
    output_dir: Path,
    *,
    accum: int = 1,
    record: bool = True,
    loss_key: str = "train_loss",
) -> OursRun:
    """Run a trainer entry point (e.g. ``services.training.trainers.sft.run``) as a job
    would, one report per step (the config must set ``loop.steps_per_report = 1``).
    ``accum`` micro-batches make one optimizer step; ``loss_key`` names the reported metric
    that is the step's loss."""
    from services.runtime.contract import JobContext, Report

    reports: list[Report] = []
    logs: list[str] = []
    ctx = JobContext(
        job_id="parity",
        output_dir=Path(output_dir),
        report=reports.append,
        log=logs.append,
    )
    initial: dict[str, Any] = {}
    cm = recording_batches(initial) if record else contextlib.nullcontext([])
    with cm as seen:
        info = trainer(config, ctx)
    # Step 0 is the validation of the starting weights, before any step: no loss of a step.
    steps = sorted({r.step: r for r in reports if r.step > 0}.values(), key=lambda r: r.step)
    metrics = [dict(r.metrics) for r in steps]
    losses = [float(m[loss_key]) for m in metrics]
    grouped = [list(seen[i : i + accum]) for i in range(0, len(seen), accum)]
    final = Path(info.path) if info is not None and getattr(info, "path", None) else None
    return OursRun(losses, metrics, grouped, Path(output_dir), initial, final, logs)


def trainable_arrays(checkpoint: Path) -> dict[str, Any]:
    """The weights a checkpoint dir holds (adapters or the full model), as numpy float32."""
    import mlx.core as mx
    import numpy as np

    out: dict[str, Any] = {}
    for f in sorted(Path(checkpoint).glob("*.safetensors")):
        for k, v in mx.load(str(f)).items():
            out[k] = np.array(v.astype(mx.float32))
    return out


# ---------------------------------------------------------------- the reference side


def torch_optimizer(params: list, opt: dict, total_steps: int):
    """torch.optim + a transformers scheduler for our resolved ``optimizer`` dict.

    This is the reference definition our OptimizerSettings promise to match: AdamW/Adam
    (bias-corrected), SGD, and transformers' constant / cosine(_with_min_lr) / linear
    schedules with warmup."""
    import torch
    from transformers import get_scheduler

    name = opt.get("name", "adamw")
    lr = float(opt["learning_rate"])
    wd = float(opt.get("weight_decay") or 0.0)
    betas = (float(opt.get("beta1") or 0.9), float(opt.get("beta2") or 0.999))
    eps = float(opt.get("eps") or 1e-8)
    if name == "adamw":
        o = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    elif name == "adam":
        o = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)
    elif name == "sgd":
        o = torch.optim.SGD(params, lr=lr, momentum=float(opt.get("momentum") or 0.0),
                            weight_decay=wd)  # fmt: skip
    elif name == "adafactor":  # transformers' Adafactor with an external lr (as ours)
        from transformers.optimization import Adafactor

        o = Adafactor(params, lr=lr, weight_decay=wd, relative_step=False,
                      scale_parameter=False, warmup_init=False)  # fmt: skip
    else:
        raise ValueError(f"no torch reference for optimizer {name!r}")
    schedule = opt.get("schedule", "cosine")
    warmup = int(opt.get("warmup_steps") or 0)
    floor = float(opt.get("min_lr_ratio") or 0.0)
    if schedule == "constant":
        sched = get_scheduler("constant_with_warmup", o, num_warmup_steps=warmup)
    elif schedule == "cosine" and floor > 0:
        sched = get_scheduler(
            "cosine_with_min_lr", o, num_warmup_steps=warmup, num_training_steps=total_steps,
            scheduler_specific_kwargs={"min_lr_rate": floor},
        )  # fmt: skip
    elif schedule == "cosine":
        sched = get_scheduler("cosine", o, num_warmup_steps=warmup, num_training_steps=total_steps)
    elif schedule == "linear" and floor == 0:
        sched = get_scheduler("linear", o, num_warmup_steps=warmup, num_training_steps=total_steps)
    else:
        raise ValueError(f"no transformers scheduler for {schedule!r} with min_lr_ratio {floor}")
    return o, sched


def torch_step(loss, params: list, optimizer, scheduler, clip: float) -> float | None:
    """backward, clip_grad_norm_ (global L2), step, schedule; returns the pre-clip norm."""
    import torch

    loss.backward()
    norm = None
    if clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def hf_model(path: Path, dtype: str = "float32", device: str = "cpu"):
    """transformers' LlamaForCausalLM from the same mlx-lm directory (the same weight names)."""
    import torch
    from transformers import AutoModelForCausalLM

    td = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=td, attn_implementation="eager")
    return model.to(device)


def to_torch(x: Any, device: str = "cpu", dtype: Any = None):
    import numpy as np
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x))
    if dtype is not None:
        t = t.to(dtype)
    return t.to(device)


# ---------------------------------------------------------------- comparing and writing


def compare(ours: list[float], ref: list[float]) -> dict[str, Any]:
    n = min(len(ours), len(ref))
    abs_d = [abs(a - b) for a, b in zip(ours[:n], ref[:n], strict=True)]
    rel_d = [d / max(abs(b), 1e-8) for d, b in zip(abs_d, ref[:n], strict=True)]
    return {
        "steps": n,
        "max_abs_dloss": max(abs_d) if abs_d else math.nan,
        "max_rel_dloss": max(rel_d) if rel_d else math.nan,
        "worst_step": (rel_d.index(max(rel_d)) + 1) if rel_d else 0,
        "first_loss": [ours[0], ref[0]] if n else [],
        "last_loss": [ours[n - 1], ref[n - 1]] if n else [],
    }


def param_gap(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """Max |Δ| over every shared parameter, and ||Δ|| / ||ref|| over all of them."""
    import numpy as np

    keys = sorted(set(ours) & set(ref))
    missing = sorted(set(ours) ^ set(ref))
    if missing:
        raise KeyError(f"parameters on one side only: {missing[:4]}")
    diff2 = sum(float(np.sum((ours[k] - ref[k]) ** 2)) for k in keys)
    ref2 = sum(float(np.sum(ref[k] ** 2)) for k in keys)
    worst = max(float(np.max(np.abs(ours[k] - ref[k]))) for k in keys)
    return {"max_abs": worst, "rel_l2": math.sqrt(diff2 / max(ref2, 1e-30)), "tensors": len(keys)}


def environment() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "machine": platform.machine()}
    for pkg in ("mlx", "mlx-lm", "torch", "transformers", "peft", "trl"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def rel(path: Path) -> str:
    """A path as stored in a curve file: relative to the repo."""
    return str(Path(path).resolve().relative_to(REPO))


def write_curve(
    name: str,
    *,
    trainer: str,
    config: dict,
    reference: str,
    ref_losses: list[float],
    ours_losses: list[float],
    gap: dict[str, float] | None,
    rtol: float = CPU_RTOL,
    accum: int = 1,
    loss_key: str = "train_loss",
    notes: str = "",
) -> Path:
    """The committed reference curve CI replays (paths in ``config`` relative to the repo)."""
    CURVES.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name,
        "trainer": trainer,
        "reference": reference,
        "command": "uv run python "
        + " ".join(shlex.quote(a) for a in [rel(Path(sys.argv[0]))] + sys.argv[1:]),  # fmt: skip
        "model_sha256": weights_sha(model_dir()),
        "config": config,
        "accum": accum,
        "loss_key": loss_key,
        "rtol": rtol,
        "reference_losses": ref_losses,
        "ours_losses_when_made": ours_losses,
        "param_gap_when_made": gap,
        "environment": environment(),
        "notes": notes,
    }
    path = CURVES / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load_trainer(dotted: str) -> Callable[[dict, Any], Any]:
    import importlib

    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)


def resolve_paths(config: Any) -> Any:
    """Curve configs store repo-relative paths under keys named path/model/...: make them
    absolute for this checkout."""
    keys = {"path", "model", "valid_path", "adapter_path"}
    if isinstance(config, dict):
        out = {}
        for k, v in config.items():
            if k in keys and isinstance(v, str) and v and not v.startswith("/"):
                cand = REPO / v
                out[k] = str(cand) if cand.exists() else v
            else:
                out[k] = resolve_paths(v)
        return out
    if isinstance(config, list):
        return [resolve_paths(x) for x in config]
    return config


# ---------------------------------------------------------------- the scripts' shared CLI


def parse_args(description: str, argv: list[str] | None = None):
    """The flags every parity script takes; also picks the devices (MLX and torch)."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", nargs="*", default=[])
    ap.add_argument("--write-curves", action="store_true",
                    help="write tests/parity/curves/<case>.json (CPU float32 only)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--ours-optimizer", type=json.loads, default={},
                    help="JSON merged into OUR optimizer settings only, e.g. "
                    '\'{"bias_correction": false}\' (what MLX\'s default does)')  # fmt: skip
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.torch_device = "cpu" if args.device == "cpu" else "cuda"
    import mlx.core as mx

    mx.set_default_device(mx.cpu if args.device == "cpu" else mx.gpu)
    if args.device == "cpu":
        import torch

        torch.set_num_threads(1)  # tiny matmuls: torch's thread pool was ~15x slower on 2 cores
    return args


def summary_line(r: dict[str, Any]) -> str:
    gap = r.get("param_gap") or {}
    ok = "ok " if r["within_target"] else "OFF"
    return (
        f"{ok} {r['name']:<24} {r['device']}/{r['dtype']:<8} steps {r['steps']:>3}  "
        f"max|dloss| {r['max_abs_dloss']:.2e} (rel {r['max_rel_dloss']:.2e} at step "
        f"{r['worst_step']})  loss {r['first_loss'][0]:.4f}->{r['last_loss'][0]:.4f} "
        f"(ref {r['first_loss'][1]:.4f}->{r['last_loss'][1]:.4f})  "
        f"param gap max {gap.get('max_abs', math.nan):.1e} rel {gap.get('rel_l2', math.nan):.1e}"
    )


def save_results(family: str, results: list[dict[str, Any]], args) -> Path:
    import datetime as dt
    import socket

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    host = "h200" if args.device == "gpu" else "vm"
    stamp = dt.date.today().isoformat()
    path = out / f"{family}-{host}-{args.dtype}-{stamp}.json"
    doc = {"family": family, "host": socket.gethostname(), "date": stamp,
           "environment": environment(), "results": results}  # fmt: skip
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def run_cases(family: str, cases: dict, args, detail=None) -> int:
    """Run a family's selected cases, print one line each (plus ``detail(r)`` if given), save
    the results; exit status 1 if any case is off its target."""
    results = []
    for name, fn in cases.items():
        if args.only and name not in args.only:
            continue
        r = fn(args)
        results.append(r)
        print(summary_line(r) + (detail(r) if detail else ""), flush=True)
    save_results(family, results, args)
    return 0 if all(r["within_target"] for r in results) else 1
