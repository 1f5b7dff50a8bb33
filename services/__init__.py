"""MLX Unified Training services.

Importing this package loads an optimised BLAS before anything imports ``mlx.core``:
on Linux the ``mlx-cpu`` wheel would otherwise run on the reference BLAS (~25x slower).
"""

from services.runtime import blas as _blas

_blas.load()
