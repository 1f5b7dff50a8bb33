"""Load an optimised BLAS into the process before ``mlx.core`` is imported.

The Linux ``mlx-cpu`` wheel links the reference (netlib) BLAS. Loading a library that
exports the standard BLAS/LAPACK symbols with RTLD_GLOBAL first makes MLX bind to it
(a 1024^3 fp32 matmul drops from ~0.6 s to ~0.03 s). ``MLXU_BLAS`` names a library
explicitly; ``MLXU_BLAS=none`` disables this. macOS uses Accelerate/Metal: nothing to do.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import warnings

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded: str | None = None
reason: str = ""


def _find() -> str | None:
    explicit = os.environ.get("MLXU_BLAS", "")
    if explicit:
        return explicit
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    hits = sorted(glob.glob("/usr/lib/*/openblas*/libopenblas*.so*"))
    return hits[0] if hits else None


def load() -> str | None:
    """Load the BLAS once; returns its path, or None (with ``reason`` set)."""
    global loaded, reason
    if loaded or reason or not sys.platform.startswith("linux"):
        return loaded
    if os.environ.get("MLXU_BLAS", "").lower() == "none":
        reason = "disabled by MLXU_BLAS=none"
        return None
    if "mlx.core" in sys.modules:
        reason = "mlx.core was imported before services; BLAS not replaced"
        warnings.warn(f"mlxu: {reason}", RuntimeWarning, stacklevel=2)
        return None
    path = _find()
    if path is None:
        reason = (
            "no optimised BLAS found (install Debian's libopenblas0-pthread); "
            "MLX runs on the reference BLAS, training is ~15x slower"
        )
        warnings.warn(f"mlxu: {reason}", RuntimeWarning, stacklevel=2)
        return None
    try:
        # Keep OpenBLAS from oversubscribing next to MLX's own thread pool.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(os.cpu_count() or 1))
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        reason = f"could not load {path}: {exc}"
        warnings.warn(f"mlxu: {reason}", RuntimeWarning, stacklevel=2)
        return None
    loaded = path
    return loaded
