"""Confine every path a client sends to the configured roots."""

from __future__ import annotations

import re
from pathlib import Path

from services.runtime.errors import InvalidArgument

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def confine(raw: str, roots: tuple[Path, ...], field: str) -> Path:
    """Resolve ``raw`` (following symlinks) and require it to lie under one of ``roots``."""
    if not raw:
        raise InvalidArgument.one(field, "is required")
    if "\x00" in raw:
        raise InvalidArgument.one(field, "contains a NUL byte")
    path = Path(raw).expanduser().resolve()
    for root in roots:
        if path == root or root in path.parents:
            return path
    allowed = ", ".join(str(r) for r in roots)
    raise InvalidArgument.one(field, f"path {raw!r} is outside the allowed roots ({allowed})")


def looks_like_path(raw: str) -> bool:
    return raw.startswith(("/", ".", "~")) or Path(raw).exists()


def check_name(raw: str, field: str) -> str:
    """An output name: one path component, no traversal."""
    if not _NAME.match(raw) or raw in (".", ".."):
        raise InvalidArgument.one(
            field, f"{raw!r} must be 1-128 chars of letters, digits, '.', '_' or '-'"
        )
    return raw
