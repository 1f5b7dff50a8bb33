"""Print docs/methods.md's table of training methods from services.registry.

    uv run python scripts/methods_table.py      # paste between the markers in docs/methods.md

tests/unit/test_registry.py fails when the committed table and the registry disagree.
"""

from __future__ import annotations

from services import registry


def table() -> str:
    rows = [
        "| method | service / RPC | spec | trainer | datasets | result | default lr "
        "(full / adapters) | `mlxu train` |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in registry.METHODS:
        lr = " / ".join(f"{x:.0e}".replace("e-0", "e-") for x in m.lr) if m.lr else "—"
        cli = f"`{m.cli}`" if m.cli else "—"
        rows.append(
            f"| `{m.name}` | {m.service} / `{m.rpc}` | `{m.spec.DESCRIPTOR.name}` | "
            f"`{m.trainer}` | {', '.join(m.formats) or '—'} | {m.produces} | {lr} | {cli} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(table(), end="")
