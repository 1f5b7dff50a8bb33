"""Dataset rows: read JSONL / JSON files and mlx-lm directories, detect and check formats.

Split from datasets.py so the part that only reads and checks rows (no tokenizer, no mlx) can
be read on its own; validators and the orchestrator use it before any model is loaded.
datasets.py re-exports every name here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.runtime import paths
from services.runtime.errors import InvalidArgument

FORMATS = ("text", "chat", "completion", "preference", "prompt", "unpaired_preference")
_REQUIRED = {
    "text": ("text",),
    "chat": ("messages",),
    "completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
    "unpaired_preference": ("prompt", "completion", "label"),
}


# ---------------------------------------------------------------- loading


def _fail(field_name: str, description: str) -> InvalidArgument:
    return InvalidArgument.one(field_name, description)


def _json_error(line: int, e: json.JSONDecodeError) -> str:
    return f"line {line}: invalid JSON ({e.msg}: column {e.colno})"


def load_rows(
    path: Path, field: str, roots: tuple[Path, ...] | None = None
) -> list[dict[str, Any]]:
    """Rows of a JSONL file, a JSON list, or a JSON object {"examples": [...]}.

    The file is opened confined to ``roots`` (default: the roots this process was started
    with, see paths.process_roots) and checked by the real path of the open descriptor."""
    path = Path(path)
    roots = roots if roots is not None else paths.process_roots()
    with paths.open_confined(path, roots, field) as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _fail(field, f"{path.name} is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise _fail(field, f"{path.name} is empty")
    lines = text.splitlines()
    first = next(ln for ln in lines if ln.strip())
    if first.lstrip().startswith("{") and _parses(first):
        rows = _jsonl(lines, field)
        if len(rows) == 1 and isinstance(rows[0].get("examples"), list):
            rows = rows[0]["examples"]
        return _listed(rows, path, field)
    # A JSON document spread over lines: errors point into it.
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(field, _json_error(e.lineno, e)) from None
    except RecursionError:
        raise _fail(field, f"{path.name}: JSON nested too deeply") from None
    if isinstance(whole, dict):
        whole = whole.get("examples", [whole])
        if not isinstance(whole, list):
            raise _fail(field, '"examples" must be a list of rows')
    if not isinstance(whole, list):
        raise _fail(field, 'expected JSON lines, a JSON list or {"examples": [...]}')
    return _listed(whole, path, field)


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def _jsonl(lines: list[str], field: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(field, _json_error(n, e)) from None
        except RecursionError:
            raise _fail(field, f"line {n}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise _fail(field, f"line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _listed(rows: list[Any], path: Path, field: str) -> list[dict[str, Any]]:
    if not rows:
        raise _fail(field, f"{path.name} has no rows")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise _fail(field, f"row {i}: expected a JSON object, got {type(row).__name__}")
    return rows


def load_dir(
    path: Path, field: str, roots: tuple[Path, ...] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """{"train": rows, "valid"?: rows, "test"?: rows} from a directory, as mlx-lm lays it out.
    Each member file is confined by its own real path (see load_rows)."""
    path = Path(path)
    if not os.path.lexists(path / "train.jsonl"):
        raise _fail(field, f"directory {path} has no train.jsonl")
    out = {}
    for name in ("train", "valid", "test"):
        f = path / f"{name}.jsonl"
        if os.path.lexists(f):
            try:
                out[name] = load_rows(f, field, roots)
            except InvalidArgument as e:
                v = e.violations[0]
                raise _fail(field, f"{f.name}: {v.description}") from None
    return out


# ---------------------------------------------------------------- formats


def _row_format(row: dict[str, Any]) -> str | None:
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "label" in row and "completion" in row:
        return "unpaired_preference"
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "completion"
    if "text" in row:
        return "text"
    if "prompt" in row:
        return "prompt"
    return None


def normalize_format(raw: str, field: str) -> str:
    """ "" (detect) or a format name; accepts the proto's DATASET_FORMAT_* names too."""
    fmt = (raw or "").strip().lower().removeprefix("dataset_format_")
    if fmt in ("", "unspecified"):
        return ""
    if fmt not in FORMATS:
        raise _fail(field, f"unknown format {raw!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def detect_format(rows: Sequence[dict[str, Any]], field: str) -> str:
    """The format of row 1; every other row must have the same keys (else which row is off)."""
    if not rows:
        raise _fail(field, "the dataset has no rows")
    fmt = _row_format(rows[0])
    if fmt is None:
        keys = ", ".join(sorted(rows[0])) or "none"
        raise _fail(
            field,
            "row 1: unknown format (keys: "
            f"{keys}); expected 'text', 'messages', 'prompt'+'completion', "
            "'prompt'+'chosen'+'rejected', 'prompt'+'completion'+'label' or 'prompt'",
        )
    for i, row in enumerate(rows[1:], 2):
        other = _row_format(row)
        if other == fmt:
            continue
        missing = [k for k in _REQUIRED[fmt] if k not in row]
        what = f"missing {missing[0]!r}" if missing else "mixed formats"
        raise _fail(field, f"row {i}: {what} (row 1 is {fmt!r} data, row {i} looks like {other!r})")
    return fmt


def _messages_problem(v: Any) -> str | None:
    if not isinstance(v, list) or not v:
        return "it is empty" if isinstance(v, list) else f"got {type(v).__name__}"
    for j, m in enumerate(v, 1):
        if not isinstance(m, dict):
            return f"message {j} is a {type(m).__name__}"
        if not isinstance(m.get("role"), str) or not m["role"]:
            return f"message {j} has no 'role'"
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            return f"message {j} has no 'content'"
        if content is not None and not isinstance(content, str | list):
            return f"message {j}: 'content' must be a string"
    return None


def _check_turns(row: dict[str, Any], key: str) -> str | None:
    """A string or a message list, non-empty."""
    v = row.get(key)
    if isinstance(v, str):
        return None if v.strip() else f"{key!r} is empty"
    problem = _messages_problem(v)
    if problem:
        return f"{key!r} must be a string or a list of {{role, content}} ({problem})"
    return None


def validate_rows(
    rows: Sequence[dict[str, Any]], fmt: str, field: str, *, source: str = ""
) -> None:
    """Every row has the keys and value types of ``fmt``; errors name the 1-based row."""
    if not rows:
        raise _fail(field, f"{source}the dataset has no rows")
    for i, row in enumerate(rows, 1):
        missing = [k for k in _REQUIRED[fmt] if k not in row]
        if missing:
            raise _fail(field, f"{source}row {i}: missing {missing[0]!r}")
        problem = _row_problem(row, fmt)
        if problem:
            raise _fail(field, f"{source}row {i}: {problem}")


def _row_problem(row: dict[str, Any], fmt: str) -> str | None:
    if fmt == "text":
        t = row["text"]
        return None if isinstance(t, str) and t.strip() else "'text' must be a non-empty string"
    if "tools" in row and row["tools"] is not None and not isinstance(row["tools"], list):
        return "'tools' must be a list"
    if fmt == "chat":
        problem = _messages_problem(row["messages"])
        return f"'messages' must be a list of {{role, content}} ({problem})" if problem else None
    keys = {
        "completion": ("prompt", "completion"),
        "prompt": ("prompt",),
        "unpaired_preference": ("prompt", "completion"),
    }.get(fmt, ("prompt", "chosen", "rejected"))
    for key in keys:
        problem = _check_turns(row, key)
        if problem:
            return problem
    if fmt == "unpaired_preference":
        if not isinstance(row["label"], bool):
            return f"'label' must be true (desirable) or false, got {json.dumps(row['label'])}"
        if row.get("system") is not None and not isinstance(row["system"], str):
            return "'system' must be a string"
        return None
    if fmt != "preference":
        return None
    if row["chosen"] == row["rejected"]:
        return "'chosen' and 'rejected' are identical"
    if row.get("system") is not None and not isinstance(row["system"], str):
        return "'system' must be a string"
    m = row.get("margin")
    if m is not None and (isinstance(m, bool) or not isinstance(m, int | float)):
        return "'margin' must be a number"
    if m is not None and not np.isfinite(m):
        return "'margin' must be finite"
    return None
