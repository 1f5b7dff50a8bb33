"""Every parity family in one run: SFT, preference (reward model, DPO), RL (GRPO, PPO) and
knowledge distillation, each against its reference; writes the table docs/parity.md shows.

    uv run python bench/parity.py                  # CPU fp32 (torch etc.: the parity group)
    uv run python bench/parity.py --write-curves   # + refresh tests/parity/curves
    python3 bench/parity.py --device gpu --dtype bfloat16 --out $OUT   # the GPU machine

Results: <out>/parity-<vm|h200>-<dtype>-<date>.{json,md}. Exit status 1 if a case is off
its target (CPU fp32: relative |dloss| <= 1e-3 at every step; GPU bf16: <= 2%).
"""

from __future__ import annotations

import importlib
import json
import time
import traceback
from typing import Any

import parity_common as pc

FAMILIES = ("parity_sft", "parity_pref", "parity_rl", "parity_kd", "parity_align")


def markdown(results: list[dict[str, Any]], args) -> str:
    env = pc.environment()
    lines = [
        f"# Parity ({args.device}, {args.dtype}, {time.strftime('%Y-%m-%d')})",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
        "| case | reference | steps | max abs Δloss | max rel Δloss | param gap (rel L2) "
        "| target | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r.get('reference', '')} | - | - | - | - | - | "
                         f"error: {r['error'][:80]} |")  # fmt: skip
            continue
        gap = (r.get("param_gap") or {}).get("rel_l2", float("nan"))
        lines.append(
            f"| {r['name']} | {r['reference']} | {r['steps']} | {r['max_abs_dloss']:.1e} | "
            f"{r['max_rel_dloss']:.1e} | {gap:.1e} | {r['target_rtol']:g} | "
            f"{'yes' if r['within_target'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = pc.parse_args("every parity family against its reference", argv)
    results: list[dict[str, Any]] = []
    for family in FAMILIES:
        try:
            module = importlib.import_module(family)
        except ImportError as e:
            print(f"skip {family}: {e}", flush=True)
            continue
        for name, fn in module.CASES.items():
            if args.only and name not in args.only:
                continue
            tic = time.perf_counter()
            try:
                r = fn(args)
            except Exception as e:  # noqa: BLE001 - one broken case must not hide the rest
                traceback.print_exc()
                r = {"name": name, "family": family, "error": f"{type(e).__name__}: {e}",
                     "within_target": False}  # fmt: skip
            r["family"], r["seconds"] = family, round(time.perf_counter() - tic, 1)
            results.append(r)
            print(pc.summary_line(r) if "error" not in r else f"ERR {name}: {r['error']}",
                  flush=True)  # fmt: skip
            path = pc.save_results("parity", results, args)  # after every case: a time limit
            path.with_suffix(".md").write_text(markdown(results, args))  # keeps what ran
    path = pc.save_results("parity", results, args)
    path.with_suffix(".md").write_text(markdown(results, args))
    print(f"wrote {path} and {path.with_suffix('.md').name}")
    ok = all(r.get("within_target") for r in results)
    print(json.dumps({"cases": len(results), "all_within_target": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
