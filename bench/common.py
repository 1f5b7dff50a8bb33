"""Helpers shared by the benchmarks: machine description, BLAS in use, memory, step timing,
child processes and result files. Benchmarks are scripts (``uv run python bench/NAME.py``);
this module sits beside them and is imported as ``common``. Nothing here imports ``mlx``
at module level, so a benchmark can still ``import services`` (which loads OpenBLAS) before
anything touches ``mlx.core``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 0.0


def gpu_names() -> list[str]:
    """NVIDIA GPUs by name (empty when there is no nvidia-smi)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def blas_in_process() -> list[str]:
    """BLAS libraries mapped into this process (Linux: from /proc/self/maps).

    This is what the process really runs on, whatever it meant to load: the mlx-cpu wheel
    bundles a reference BLAS, and only a library loaded globally before ``mlx.core``
    (``import services``) replaces it."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ["unknown (no /proc/self/maps)" if sys.platform != "darwin" else "Accelerate"]
    libs = set()
    for line in maps.splitlines():
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        name = os.path.basename(path)
        if re.search(r"(blas|mkl_rt|mkl_core|blis|accelerate)", name, re.IGNORECASE):
            libs.add(path)
    return sorted(libs)


def describe_blas(libs: Sequence[str]) -> str:
    """A short label for what ``blas_in_process`` found, e.g. 'openblas-pthread (over the
    bundled reference)'. numpy's own OpenBLAS (scipy_openblas, prefixed symbols) serves numpy
    alone and is left out."""
    libs = [p for p in libs if "scipy_openblas" not in os.path.basename(p)]
    fast, reference = [], []
    for p in libs:
        base = os.path.basename(p).lower()
        if "openblas" in base:
            fast.append("openblas" + ("-pthread" if "pthread" in p else ""))
        elif "mkl" in base or "blis" in base:
            fast.append(base.split(".")[0])
        else:
            reference.append(base)
    if not fast:
        return "reference BLAS (" + ", ".join(reference) + ")" if reference else "none mapped"
    label = ", ".join(sorted(set(fast)))
    return label + (" (over the bundled reference)" if reference else "")


def machine(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ran the benchmark, for the result files (no mlx import needed)."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 0,
        "memory_gb": round(total_memory_gb(), 1),
        "gpus": gpu_names(),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS", ""),
    }
    for dist in ("torch", "transformers", "peft"):
        if v := version(dist):
            info[dist] = v
    info.update(extra or {})
    return info


def machine_line(info: dict[str, Any]) -> str:
    parts = [f"{info.get('cpu', '?')} ({info.get('cores', '?')} cores)"]
    if info.get("gpus"):
        parts.append("GPU " + "; ".join(info["gpus"]))
    if info.get("device"):
        parts.append(f"mlx device {info['device']}")
    parts.append(f"mlx {info.get('mlx', '?')}, mlx-lm {info.get('mlx_lm', '?')}")
    if info.get("blas"):
        parts.append(f"BLAS {info['blas']}")
    for dist in ("torch", "transformers", "peft"):
        if info.get(dist):
            parts.append(f"{dist} {info[dist]}")
    parts.append(f"host {info.get('host', '?')}")
    return " | ".join(parts)


# ---------------------------------------------------------------- memory and time


def max_rss_gb() -> float:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


@dataclass
class StepClock:
    """Timestamps of finished steps, taken when each step's results are known (after its
    eval), so that the time between two marks is everything the loop does per step.

    Steps 1..warmup are excluded: timing starts at the mark of step ``warmup`` (compile and
    the first allocations happen before it) and ends at the mark of the last step."""

    warmup: int
    marks: list[tuple[int, float]] = field(default_factory=list)

    def mark(self, step: int) -> None:
        self.marks.append((step, time.perf_counter()))

    def timed(self) -> list[tuple[int, float]]:
        return [(s, t) for s, t in self.marks if s >= self.warmup]

    def summary(self) -> dict[str, float]:
        m = self.timed()
        if len(m) < 2:
            return {"timed_steps": 0, "seconds": 0.0, "step_s_median": 0.0, "step_s_mean": 0.0}
        deltas = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(m, m[1:], strict=False)]
        return {
            "step_s": [round(d, 4) for d in deltas],
            "timed_steps": m[-1][0] - m[0][0],
            "seconds": m[-1][1] - m[0][1],
            "step_s_median": statistics.median(deltas),
            "step_s_mean": (m[-1][1] - m[0][1]) / (m[-1][0] - m[0][0]),
        }


def mlx_cpu_matmul_gflops(n: int = 512, reps: int = 5) -> float:
    """fp32 matmul speed on MLX's CPU stream: ~100 GFLOP/s or more with OpenBLAS on 2 cores,
    a few with the reference BLAS, so it shows which one the process really calls."""
    import mlx.core as mx

    a = mx.random.normal((n, n), stream=mx.cpu)
    mx.eval(mx.matmul(a, a, stream=mx.cpu))
    tic = time.perf_counter()
    for _ in range(reps):
        mx.eval(mx.matmul(a, a, stream=mx.cpu))
    return 2 * n**3 * reps / (time.perf_counter() - tic) / 1e9


# ---------------------------------------------------------------- data


def default_text_sources() -> list[Path]:
    """Real English text that ships with the repo: its markdown files."""
    return sorted(REPO.glob("*.md")) + sorted((REPO / "docs").rglob("*.md"))


def text_dataset(out: Path, sources: Sequence[Path], n_chars: int, rows: int) -> Path:
    """A text dataset dir (train.jsonl: ``rows`` rows, valid.jsonl: 8) of ``{"text": ...}``
    rows of ``n_chars`` characters each, cut from the sources at spread-out offsets
    (whitespace collapsed; the text repeats when it is shorter than needed)."""
    text = " ".join(p.read_text(errors="replace") for p in sources if p.is_file())
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) < 1000:
        raise SystemExit(f"the text sources hold only {len(text)} characters")
    text = text * (1 + n_chars // len(text))
    stride = max(1, (len(text) - n_chars) // (rows + 8))
    lines = [json.dumps({"text": text[i * stride : i * stride + n_chars]}) for i in range(rows + 8)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("\n".join(lines[:rows]) + "\n")
    (out / "valid.jsonl").write_text("\n".join(lines[rows:]) + "\n")
    return out


# ---------------------------------------------------------------- child processes


@dataclass
class ChildResult:
    ok: bool
    result: dict[str, Any]
    seconds: float
    error: str = ""


def run_child(
    argv: Sequence[str],
    result_file: Path,
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    log_file: Path | None = None,
) -> ChildResult:
    """Run one measurement in its own process (clean peak memory, no shared caches).

    The child writes its JSON result to ``result_file``; its output goes to ``log_file``."""
    result_file.unlink(missing_ok=True)
    tic = time.perf_counter()
    log = open(log_file, "w") if log_file else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.run(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            timeout=timeout,
            cwd=REPO,
            check=False,
        )
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = -1
    finally:
        if log_file:
            log.close()
    seconds = time.perf_counter() - tic
    if result_file.exists():
        res = json.loads(result_file.read_text())
        if res.get("error"):
            return ChildResult(False, res, seconds, res["error"])
        return ChildResult(True, res, seconds)
    why = "timed out" if rc == -1 else f"exit code {rc}"
    tail = log_file.read_text()[-1500:] if log_file and log_file.exists() else ""
    return ChildResult(False, {}, seconds, f"{why}: {tail.strip()}")


def best(results: Sequence[ChildResult], key: str) -> ChildResult:
    """The successful result with the highest ``key`` (best of N repeats: the run that a
    busy machine disturbed least), else the last failure."""
    ok = [r for r in results if r.ok]
    return max(ok, key=lambda r: r.result[key]) if ok else results[-1]


# ---------------------------------------------------------------- result files


def fmt(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        if value >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """``columns``: (key, header) pairs; floats are shown with 2 decimals (or as integers
    with thousands separators from 1000 up)."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def slug(name: str, limit: int = 48) -> str:
    """``name`` (a model name or path, a dataset path) as one safe file-name component:
    '/abs/path/to/model' -> 'abs_path_to_model'; long ones keep their tail and a short hash."""
    import hashlib

    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "x"
    if len(s) > limit:
        s = s[-(limit - 9) :].lstrip("._") + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return s


def local_model(ref: str) -> str | None:
    """An existing mlx-lm model directory given by path (benchmarks run where the user
    points them, so no root confinement), else None: let ``resolve_model`` decide."""
    p = Path(ref).expanduser()
    return str(p.resolve()) if (p / "config.json").is_file() else None


def result_stem(name: str, host: str | None = None) -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", host or socket.gethostname())
    return f"{name}-{host}-{_dt.date.today().isoformat()}"


def write_results(
    name: str,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[tuple[str, str]],
    info: dict[str, Any],
    *,
    settings: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
    out_dir: Path = RESULTS,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path, str]:
    """Write ``<out_dir>/<name>-<host>-<date>.json`` and ``.md``; returns both paths and the
    markdown text. ``extra``: more top-level JSON keys (not shown in the markdown)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / result_stem(name, info.get("host"))
    now = _dt.datetime.now().isoformat(timespec="seconds")
    doc = {
        "benchmark": name,
        "date": now,
        "machine": info,
        "settings": settings or {},
        "rows": list(rows),
        "notes": list(notes),
        **(extra or {}),
    }
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = [f"# {name} ({now})", "", machine_line(info), ""]
    if settings:
        md += ["Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    md += [markdown_table(rows, columns), ""]
    md += [f"- {n}" for n in notes]
    text = "\n".join(md).rstrip() + "\n"
    md_path = stem.with_suffix(".md")
    md_path.write_text(text)
    return json_path, md_path, text
