"""MLX Unified Training services.

Importing this package loads an optimised BLAS before anything imports ``mlx.core``:
on Linux the ``mlx-cpu`` wheel would otherwise run on the reference BLAS (~25x slower).
It also keeps mlx-lm's unused logger imports (wandb, swanlab) off every process's start.
"""

from services.runtime import blas as _blas
from services.runtime import lean_imports as _lean_imports

_blas.load()
_lean_imports.install()
