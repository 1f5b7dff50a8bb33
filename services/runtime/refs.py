"""Resolve the model and dataset references of any request: confined paths, registered
names, every dataset row read and checked once, before a job exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlx_unified.v1 import common_pb2
from services.runtime.datasets import (
    detect_format,
    load_dir,
    load_rows,
    normalize_format,
    validate_rows,
)
from services.runtime.errors import InvalidArgument, shown
from services.runtime.models import resolve_model
from services.runtime.paths import confine, confine_tree
from services.runtime.settings import Settings


def resolve_model_ref(ref: common_pb2.ModelRef, settings: Settings, field: str) -> dict[str, str]:
    """A ModelRef -> {"model": local dir or hub id, "adapter_path": confined dir or ""}."""
    if not ref.model:
        raise InvalidArgument.one(f"{field}.model", "is required")
    model = resolve_model(
        ref.model,
        settings.home,
        settings.allowed_roots,
        f"{field}.model",
        offline=settings.offline,
    )
    out = {"model": str(model), "adapter_path": ""}
    if ref.adapter_path:
        out["adapter_path"] = str(resolve_adapter(ref.adapter_path, settings, f"{field}"))
    return out


def resolve_adapter(raw: str, settings: Settings, field: str) -> Path:
    """An adapter directory: confined by its real path and every file's in it."""
    f = f"{field}.adapter_path"
    adapter = confine(raw, settings.allowed_roots, f)
    if not adapter.is_dir():
        raise InvalidArgument.one(f, f"{shown(raw)} is not a directory")
    confine_tree(adapter, settings.allowed_roots, f, raw=raw)
    if not (adapter / "adapter_config.json").is_file():
        raise InvalidArgument.one(f, f"{shown(raw)} has no adapter_config.json")
    return adapter


def resolve_dataset(
    ref: common_pb2.DatasetRef,
    settings: Settings,
    field: str,
    allowed: tuple[str, ...],
    counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Confine the dataset paths, read every row once and check the format fits the method.
    ``counts``, when given, receives the number of training rows as "rows"."""
    if not ref.path:
        raise InvalidArgument.one(f"{field}.path", "is required")
    roots = settings.allowed_roots
    path = confine(ref.path, roots, f"{field}.path")
    if not path.exists():
        raise InvalidArgument.one(f"{field}.path", f"{shown(ref.path)} does not exist")
    if path.is_dir():
        rows = load_dir(path, f"{field}.path", roots)["train"]
    else:
        rows = load_rows(path, f"{field}.path", roots)
    known = ref.format in common_pb2.DatasetFormat.values()
    name = common_pb2.DatasetFormat.Name(ref.format) if known else str(ref.format)
    fmt = normalize_format(name if ref.format else "", f"{field}.format")
    detected = detect_format(rows, f"{field}.path")
    if fmt and fmt != detected:
        raise InvalidArgument.one(
            f"{field}.format", f"dataset rows are {detected!r} but format says {fmt!r}"
        )
    if detected not in allowed:
        raise InvalidArgument.one(
            f"{field}.path",
            f"{detected!r} rows cannot train this method (expected {' or '.join(allowed)})",
        )
    validate_rows(rows, detected, f"{field}.path")
    if counts is not None:
        counts["rows"] = len(rows)
    out: dict[str, Any] = {"path": str(path), "format": detected}
    if ref.valid_path:
        vpath = confine(ref.valid_path, roots, f"{field}.valid_path")
        vrows = load_rows(vpath, f"{field}.valid_path", roots)
        validate_rows(vrows, detected, f"{field}.valid_path")
        out["valid_path"] = str(vpath)
    if ref.HasField("valid_fraction"):
        if not 0 <= ref.valid_fraction < 0.5:
            raise InvalidArgument.one(f"{field}.valid_fraction", "must be in [0, 0.5)")
        out["valid_fraction"] = ref.valid_fraction
    return out
