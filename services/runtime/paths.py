"""Confine every path a client sends, and every file actually opened, to the configured roots.

Rules (docs/operations.md, "Path confinement"):

- A path is judged by its resolved real path (every symlink followed), never by its text.
- A directory (a model, an adapter, a dataset directory) is judged by the real path of every
  entry in it as well, so a symlink inside an allowed directory cannot point outside.
- A file that is read is opened first and then checked by the real path of the open file
  descriptor (/proc/self/fd on Linux, F_GETPATH on macOS), so swapping a symlink between a
  check and the open (TOCTOU) cannot make us read an outside file. Only regular files are
  read (no FIFOs, devices or sockets).
- A path outside the roots is refused before anything about its target is probed, so the
  error never tells what sits outside.
- Hard links are not detected: a hard link inside a root *is* a name inside that root.
  Making one needs write access to the root (and, with Linux's default
  fs.protected_hardlinks=1, to own or be able to write the target): keep roots unwritable by
  untrusted users.
- Lengths: at most 255 bytes per path component and 4096 bytes in all (UTF-8).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any, BinaryIO

from services.runtime.errors import InvalidArgument, shown

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096
MAX_TREE_ENTRIES = 10_000  # entries of a model / adapter / dataset directory we check
ROOTS_ENV = "MLXU_ALLOWED_ROOTS"


def check_text(raw: str, field: str) -> None:
    """The path text itself: no NUL, bounded length (before touching the file system)."""
    if not raw:
        raise InvalidArgument.one(field, "is required")
    if "\x00" in raw:
        raise InvalidArgument.one(field, "contains a NUL byte")
    data = raw.encode("utf-8", "surrogatepass")
    if len(data) > MAX_PATH_BYTES:
        raise InvalidArgument.one(field, f"is {len(data)} bytes long; at most {MAX_PATH_BYTES}")
    longest = max((len(c) for c in data.split(b"/")), default=0)
    if longest > MAX_COMPONENT_BYTES:
        raise InvalidArgument.one(
            field, f"has a path component of {longest} bytes; at most {MAX_COMPONENT_BYTES}"
        )


def inside(path: Path | str, roots: tuple[Path, ...]) -> bool:
    p = Path(path)
    return any(p == r or r in p.parents for r in roots)


def _outside(raw: str, roots: tuple[Path, ...], field: str, what: str = "") -> InvalidArgument:
    allowed = ", ".join(str(r) for r in roots)
    where = f"{what} " if what else ""
    return InvalidArgument.one(
        field, f"path {shown(raw)} {where}resolves outside the allowed roots ({allowed})"
    )


def _resolve(raw: str, field: str) -> Path:
    try:
        return Path(raw).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as e:  # loops, ENAMETOOLONG, bad ~user
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise InvalidArgument.one(
            field, f"path {shown(raw)} cannot be resolved ({reason})"
        ) from None


def confine(raw: str, roots: tuple[Path, ...], field: str) -> Path:
    """Resolve ``raw`` (following symlinks) and require it to lie under one of ``roots``."""
    check_text(raw, field)
    path = _resolve(raw, field)
    if not inside(path, roots):
        raise _outside(raw, roots, field)
    return path


def confine_tree(path: Path, roots: tuple[Path, ...], field: str, raw: str = "") -> None:
    """Every entry under the directory ``path`` (recursively; symlinked directories are
    judged by their target, not entered) must resolve inside ``roots``."""
    raw = raw or str(path)
    count = 0
    for top, dirs, files in os.walk(path, followlinks=False):
        for name in (*dirs, *files):
            count += 1
            if count > MAX_TREE_ENTRIES:
                raise InvalidArgument.one(
                    field, f"{shown(raw)} holds more than {MAX_TREE_ENTRIES} files"
                )
            entry = os.path.join(top, name)
            if os.path.islink(entry) and not inside(os.path.realpath(entry), roots):
                rel = os.path.relpath(entry, path)
                raise _outside(raw, roots, field, f"(its member {shown(rel, 64)})")


def fd_path(fd: int) -> str | None:
    """The real path of an open file descriptor, or None where the platform cannot say."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            return os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")
    getpath = getattr(fcntl, "F_GETPATH", None)  # macOS
    if getpath is not None:
        with contextlib.suppress(OSError):
            out = fcntl.fcntl(fd, getpath, bytes(1024))
            return out.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    return None


def open_confined(path: Path | str, roots: tuple[Path, ...] | None, field: str) -> BinaryIO:
    """Open a regular file for reading, checked by the real path of the opened descriptor.

    ``roots`` None means no confinement (a process that was given none, e.g. a unit test);
    the file must still be a regular file."""
    raw = str(path)
    check_text(raw, field)
    name = shown(Path(raw).name, 64)
    if roots is not None and not inside(os.path.realpath(raw), roots):
        raise _outside(raw, roots, field)  # before open: nothing about the target leaks
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        # O_NONBLOCK: opening a FIFO must not hang the service; cleared once it is a file.
        fd = os.open(raw, flags | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InvalidArgument.one(field, f"file not found: {name}") from None
    except OSError as e:
        raise InvalidArgument.one(field, f"cannot open {name}: {e.strerror}") from None
    try:
        real = fd_path(fd)
        st = os.fstat(fd)
        if roots is not None:
            if real is None:  # no fd path on this platform: the inode must be the path's
                with contextlib.suppress(OSError):
                    again = os.stat(os.path.realpath(raw))
                    real = os.path.realpath(raw) if again.st_ino == st.st_ino else None
            if real is None or not inside(real, roots):
                raise _outside(raw, roots, field)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument.one(field, f"{name} is not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(
    path: Path | str, roots: tuple[Path, ...] | None, field: str, max_bytes: int
) -> bytes:
    with open_confined(path, roots, field) as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InvalidArgument.one(
            field, f"{shown(Path(str(path)).name, 64)} is larger than {max_bytes} bytes"
        )
    return data


def read_json(path: Path | str, roots: tuple[Path, ...] | None, field: str) -> Any:
    """A small JSON file (hostfile, config), confined; errors name the field."""
    data = read_bytes(path, roots, field, 1 << 20)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidArgument.one(
            field, f"{shown(Path(str(path)).name, 64)} is not valid JSON"
        ) from None


def process_roots() -> tuple[Path, ...] | None:
    """The roots a worker process was started with (the runner passes MLXU_ALLOWED_ROOTS,
    which include MLXU_HOME); None when there are none (no confinement configured)."""
    raw = os.environ.get(ROOTS_ENV)
    if not raw:
        return None
    roots = [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p]
    if home := os.environ.get("MLXU_HOME"):
        roots.append(Path(home).expanduser().resolve())
    return tuple(r for r in roots if r != Path("/")) or None


def check_output_dir(output_dir: Path, base: Path, field: str) -> None:
    """A job's output dir (``base``/name) and anything already in it must resolve inside
    ``base`` (the checkpoints dir), so a planted symlink cannot make us write elsewhere."""
    real_base = Path(os.path.realpath(base))
    if not os.path.lexists(output_dir):
        return
    if not inside(os.path.realpath(output_dir), (real_base,)):
        raise InvalidArgument.one(
            field, f"{shown(output_dir.name, 64)}: its directory leads outside {base}"
        )
    if output_dir.is_dir():
        try:
            confine_tree(output_dir, (real_base,), field, raw=output_dir.name)
        except InvalidArgument:
            raise InvalidArgument.one(
                field, f"{shown(output_dir.name, 64)} holds a link leading outside {base}"
            ) from None


def looks_like_path(raw: str) -> bool:
    if raw.startswith(("/", ".", "~")):
        return True
    try:
        return Path(raw).exists()
    except (OSError, ValueError):
        return False


def check_name(raw: str, field: str) -> str:
    """An output name: one path component, no traversal."""
    if not _NAME.fullmatch(raw) or raw in (".", ".."):
        raise InvalidArgument.one(
            field, f"{shown(raw)} must be 1-128 chars of letters, digits, '.', '_' or '-'"
        )
    return raw
