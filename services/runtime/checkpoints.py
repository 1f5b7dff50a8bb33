"""Atomic, verifiable checkpoint directories.

Layout of a job's output dir::

    <output_dir>/
      checkpoints/step_0000100/          one per saved step, newest ``keep_last`` kept
        adapters.safetensors             adapter checkpoints (mlx-lm format) ...
        adapter_config.json              ... naming "base_model"
        model.safetensors, config.json,  ... or a full mlx-lm model dir with tokenizer files
        tokenizer.json, ...
        trainer_state/                   exact-resume state (services.runtime.trainer_state)
          optimizer.safetensors
          state.json
        manifest.json                    written last: a dir without it is incomplete
      final/                             the job's result, same rules, no trainer_state

Every directory is written into a temp dir beside its destination and renamed into place,
so readers only ever see complete checkpoints. ``manifest.json`` holds the sha256 of every
weight file, the producing job, step, kind, base model, resolved config and metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.runtime.contract import CheckpointInfo
from services.runtime.errors import FailedPrecondition

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state"
CHECKPOINTS = "checkpoints"
FINAL = "final"
FORMAT = "mlxu-checkpoint/1"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _digest(files: dict[str, str]) -> str:
    """One digest over the per-file digests (what CheckpointInfo.sha256 carries)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}:{files[name]}\n".encode())
    return h.hexdigest()


def _weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("*.safetensors") if p.is_file())


def weights_sha256(path: Path) -> str:
    """The checkpoint digest (as a manifest's "sha256") of a directory's weight files, for
    an mlx-lm directory written without a manifest; empty when it has none."""
    files = {p.name: _sha256(p) for p in _weight_files(Path(path))}
    return _digest(files) if files else ""


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _info(path: Path, manifest: dict) -> CheckpointInfo:
    return CheckpointInfo(
        path=path,
        kind=manifest.get("kind", "full"),
        step=int(manifest.get("step", 0)),
        base_model=manifest.get("base_model", ""),
        sha256=manifest.get("sha256", ""),
        metrics={k: float(v) for k, v in (manifest.get("metrics") or {}).items()},
    )


def write_atomic(
    dst: Path, write: Callable[[Path], None], manifest: dict[str, Any], step: int
) -> CheckpointInfo:
    """Run ``write(tmp)`` in a temp dir beside ``dst``, add manifest.json, rename to ``dst``.

    A failing ``write`` leaves nothing behind. An existing ``dst`` (the same step saved again
    by a resumed attempt) is replaced.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dst.name}-", dir=dst.parent))
    try:
        write(tmp)
        files = {p.name: _sha256(p) for p in _weight_files(tmp)}
        if not files:
            raise RuntimeError(f"checkpoint writer produced no weight files in {dst.name}")
        full = {
            "format": FORMAT,
            **manifest,
            "step": step,
            "files": files,
            "sha256": _digest(files),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "trainer_state": (tmp / TRAINER_STATE).is_dir(),
        }
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
        _fsync_tree(tmp)
        if dst.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".old-{dst.name}-", dir=dst.parent))
            os.replace(dst, trash / dst.name)
            os.replace(tmp, dst)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _info(dst, full)


def save(
    dir_root: Path,
    step: int,
    write: Callable[[Path], None],
    manifest: dict[str, Any],
    keep_last: int,
) -> CheckpointInfo:
    """Save ``dir_root/step_{step:07d}`` atomically, then keep only the newest ``keep_last``
    complete checkpoints (``keep_last <= 0`` keeps all)."""
    dir_root.mkdir(parents=True, exist_ok=True)
    for stale in dir_root.glob(".tmp-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    info = write_atomic(step_dir(dir_root, step), write, manifest, step)
    prune(dir_root, keep_last)
    return info


def save_final(
    output_dir: Path, write: Callable[[Path], None], manifest: dict[str, Any], step: int = 0
) -> CheckpointInfo:
    """The job's result at ``output_dir/final`` (same atomic rule)."""
    return write_atomic(output_dir / FINAL, write, manifest, step)


def publish(src: Path, output_dir: Path, metrics: dict[str, float]) -> CheckpointInfo:
    """Make ``output_dir/final`` from checkpoint ``src`` without trainer state: files are
    hard-linked (copied across filesystems), the manifest gets the final ``metrics``."""
    manifest = read_manifest(src)

    def write(tmp: Path) -> None:
        for p in src.iterdir():
            if p.name in (MANIFEST, TRAINER_STATE) or not p.is_file():
                continue
            try:
                os.link(p, tmp / p.name)
            except OSError:
                shutil.copy2(p, tmp / p.name)

    keep = {k: v for k, v in manifest.items() if k not in ("files", "sha256", "created_at")}
    keep["metrics"] = {**manifest.get("metrics", {}), **metrics}
    keep["source_checkpoint"] = str(src)
    return save_final(output_dir, write, keep, step=int(manifest.get("step", 0)))


def _steps(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / MANIFEST).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (a job output dir or its checkpoints/), oldest first."""
    if (root / CHECKPOINTS).is_dir():
        root = root / CHECKPOINTS
    return [p for _, p in _steps(root)]


def latest(root: Path) -> Path | None:
    """Newest complete checkpoint (only dirs with a manifest.json count), or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, keep_last: int) -> list[Path]:
    if keep_last <= 0:
        return []
    steps = _steps(root)
    doomed = [p for _, p in steps[:-keep_last]]
    for p in doomed:
        # Rename first so a crash mid-delete never leaves a half dir that looks complete.
        trash = p.with_name(f".tmp-del-{p.name}")
        os.replace(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise FailedPrecondition(f"{path} is not a complete checkpoint (no {MANIFEST})") from exc
    except json.JSONDecodeError as exc:
        raise FailedPrecondition(f"{path}/{MANIFEST} is corrupt: {exc}") from exc


def verify(path: Path) -> CheckpointInfo:
    """Check every weight file against the manifest; raises FailedPrecondition on mismatch."""
    path = Path(path)
    manifest = read_manifest(path)
    files = manifest.get("files") or {}
    if not files:
        raise FailedPrecondition(f"{path}: manifest lists no weight files")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise FailedPrecondition(f"{path}: weight file {name} is missing")
        if _sha256(f) != digest:
            raise FailedPrecondition(f"{path}: weight file {name} does not match its sha256")
    extra = {p.name for p in _weight_files(path)} - set(files)
    if extra:
        raise FailedPrecondition(f"{path}: weight files not in the manifest: {sorted(extra)}")
    return _info(path, manifest)


def info(path: Path) -> CheckpointInfo:
    """CheckpointInfo from a checkpoint's manifest (no hashing)."""
    return _info(Path(path), read_manifest(path))
