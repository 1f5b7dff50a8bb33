"""Generate the Python stubs (+ .pyi) for protos/mlx_unified/v1 with grpcio-tools.

uv run python scripts/gen_protos.py          # regenerate in place
uv run python scripts/gen_protos.py --check  # exit 1 if the committed stubs drifted
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent / "protos"
PKG = ROOT / "mlx_unified" / "v1"


def generate(out: Path) -> None:
    include = str(resources.files("grpc_tools") / "_proto")
    protos = sorted(str(p.relative_to(ROOT)) for p in PKG.glob("*.proto"))
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}"]
    args += [f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("*_pb2*.py*"))


def main() -> int:
    check = "--check" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "mlx_unified" / "v1"
        if check:
            names = {p.name for p in generated(fresh)} | {p.name for p in generated(PKG)}
            drift = [
                n
                for n in sorted(names)
                if not (PKG / n).exists()
                or not (fresh / n).exists()
                or not filecmp.cmp(PKG / n, fresh / n, shallow=False)
            ]
            if drift:
                print("generated stubs drifted from protos (run scripts/gen_protos.py):", *drift)
                return 1
            print(f"stubs up to date ({len(names)} files)")
            return 0
        for p in generated(PKG):
            p.unlink()
        for p in generated(fresh):
            shutil.copy2(p, PKG / p.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
