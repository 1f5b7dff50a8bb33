"""Validation of RLHF job configs (the spec dicts of rlhf.proto) before a job exists.

``check(kind, config)`` raises one InvalidArgument carrying every problem found: the field
rules of the trainer's own config dataclass (the same code the worker runs, so the service
and the trainer can never disagree), the reward source (neither or both given; a reward
checkpoint without a value head), and the dataset rows, named by row number (a row missing
'chosen' or 'rejected', 'chosen' identical to 'rejected', a non-numeric margin, a prompt
row without 'prompt').

Config dicts follow services.runtime.specs.to_dict: unset proto fields are absent. Model
and dataset references are expected already resolved to local paths. The only I/O is
reading the files the config names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services import registry
from services.runtime.errors import InvalidArgument, Violation

KINDS = registry.names("rlhf")


def _config_class(kind: str) -> Any:
    return registry.get(kind).config_class()


def _row_format(kind: str, dataset: dict) -> str:
    """The row check of ``kind``: rollout methods take any row's prompt ("prompt"); others
    the dataset's resolved format where the method trains on it, else its first."""
    method = registry.get(kind)
    if method.rollouts:
        return "prompt"
    fmt = (dataset or {}).get("format")
    return fmt if fmt in method.formats else method.formats[0]


def row_violations(dataset: dict, fmt: str, field: str = "spec.dataset.path") -> list[Violation]:
    """Problems of the dataset's rows ("row 3: 'chosen' and 'rejected' are identical")."""
    from services.runtime.datasets import load_dir, load_rows, validate_rows

    raw = (dataset or {}).get("path") or ""
    if not raw:
        return [Violation(field, "is required")]
    path = Path(raw)
    if not path.exists():
        return [Violation(field, f"not found: {raw}")]
    try:
        if path.is_dir():
            parts = load_dir(path, field)
            for name, rows in parts.items():
                _rows(rows, fmt, field, f"{name}.jsonl: ", validate_rows)
        else:
            _rows(load_rows(path, field), fmt, field, "", validate_rows)
        valid = (dataset or {}).get("valid_path")
        if valid and fmt == "preference":
            vf = "spec.dataset.valid_path"
            _rows(load_rows(Path(valid), vf), fmt, vf, "", validate_rows)
    except InvalidArgument as e:
        return list(e.violations)
    return []


def _rows(rows: list[dict], fmt: str, field: str, source: str, validate_rows) -> None:
    if fmt == "prompt":
        # Rollouts take the prompt of any row that has one (preference rows included).
        for i, row in enumerate(rows, 1):
            if "prompt" not in row:
                raise InvalidArgument.one(field, f"{source}row {i}: missing 'prompt'")
        rows = [{"prompt": r["prompt"]} for r in rows]
    validate_rows(rows, fmt, field, source=source)


def check(kind: str, config: dict, *, rows: bool = True) -> Any:
    """Validate the config of a job of ``kind`` (one of ``KINDS``) and return it built (the
    one validation of the request: the caller stores its ``to_dict()``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown RLHF job kind {kind!r}; expected one of {KINDS}")
    found: list[Violation] = []
    built = None
    try:
        built = _config_class(kind).from_dict(config, prefix="spec")
    except InvalidArgument as e:
        found.extend(e.violations)
    if rows and not any(v.field.startswith("spec.dataset") for v in found):
        dataset = config.get("dataset") or {}
        found.extend(row_violations(dataset, _row_format(kind, dataset)))
    if found:
        raise InvalidArgument(found)
    return built


def check_score(reward_model: dict, field: str = "reward_model.model") -> None:
    """The Score RPC's checkpoint must be a reward checkpoint (it has a value head)."""
    from services.rlhf.trainers.heads import HEAD_FILE, head_metadata

    raw = (reward_model or {}).get("model") or ""
    if not raw:
        raise InvalidArgument.one(field, "is required")
    if not Path(raw).exists():
        raise InvalidArgument.one(field, f"not found: {raw}")
    if head_metadata(Path(raw)) is None:
        raise InvalidArgument.one(
            field, f"{raw} is not a reward checkpoint: it has no value head ({HEAD_FILE})"
        )
