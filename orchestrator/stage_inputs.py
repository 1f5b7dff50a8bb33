"""What a stage is sent, and the key its result is cached under.

``handoff`` binds a stage's inputs to its source stages' result checkpoints; ``cache_key``
hashes what determines the result (kind, spec, inputs, local file fingerprints), and
``runtime_fields`` then adds what must not count (the run's output name and provenance
labels). Pure functions of the plan, the spec and the filesystem's metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message

from mlx_unified.v1 import common_pb2 as cpb
from orchestrator import pipeline

__all__ = ["cache_key", "handoff", "runtime_fields", "stat_fingerprint"]


def stat_fingerprint(path: str) -> str:
    """Cheap content fingerprint of a local file or directory ("" for non-paths)."""
    if not path or not os.path.exists(path):
        return ""
    if os.path.isfile(path):
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    h, seen = hashlib.sha256(), 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        seen += len(files)
        if seen > 10_000:  # not a model or dataset directory: don't walk a whole tree
            return "large-dir"
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            h.update(f"{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:".encode())
            h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()[:32]


def cache_key(
    sp: pipeline.StagePlan,
    spec: Message,
    inputs: dict[str, Any],
    fingerprint: Callable[[str], str] = stat_fingerprint,
) -> str:
    """The stage's cache key: kind, spec, bound inputs, and a fingerprint of every local
    path the spec names (so an edited dataset is a miss even at the same path)."""
    body = pipeline.to_json(spec)
    local = sorted({s for s in _strings(body) if os.path.isabs(s) or s.startswith(".")})
    payload = {
        "kind": sp.info.name,
        "spec": body,
        "inputs": {k: [v["path"], v["sha256"]] for k, v in sorted(inputs.items())},
        "content": {p: fingerprint(p) for p in local},
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def handoff(sp: pipeline.StagePlan, results: dict[str, cpb.Checkpoint]) -> tuple[Message, dict]:
    """The stage spec with each bound input set to its source stage's result checkpoint."""
    spec = sp.message()
    inputs: dict[str, Any] = {}
    for b in sp.bindings:
        ckpt = results[b.from_stage]
        pipeline.ref_at(spec, b.target, create=True).CopyFrom(pipeline.ref_for(ckpt))
        inputs[b.input] = {"from_stage": b.from_stage, "path": ckpt.path, "sha256": ckpt.sha256}
    return spec, inputs


def runtime_fields(spec: Any, run_id: str, sp: pipeline.StagePlan, inputs: dict) -> None:
    """Per-run fields, outside the cache key: output directory and provenance labels."""
    if not spec.output_name:
        spec.output_name = f"{run_id}-{sp.name}"
    spec.labels["mlxu.run_id"] = run_id
    spec.labels["mlxu.stage"] = sp.name
    for name, inp in inputs.items():
        spec.labels[f"mlxu.input.{name}.path"] = inp["path"]
        spec.labels[f"mlxu.input.{name}.sha256"] = inp["sha256"]


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []
