"""Adversarial paths against the confinement functions every service and worker calls.

Paths are built from hostile parts (traversal, symlinks out and in, loops, a FIFO, /proc and
/dev, 256-byte components, NUL, '~'). For every one: the answer is InvalidArgument or a path
(and, when a file is opened, an open descriptor) whose real location is inside the roots -
never another exception, never a hang, never an outside file's content."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.runtime import datasets, errors, models, paths
from tests.fuzz.conftest import PATH_EXAMPLES

PARTS = [
    "..", ".", "", "data", "file.jsonl", "link-out", "link-in", "link-dir-out", "loop",
    "fifo", "deep", "nope", "a" * 256, "x\x00y", "~", "~root", "proc", "self", "fd", "0",
    "etc", "passwd", "dev", "zero", "train.jsonl", "hard.jsonl", "model",
]  # fmt: skip


@pytest.fixture(scope="module")
def tree():
    """root/ (allowed) with files, symlinks out and in, a loop, a FIFO; out/ outside."""
    base = Path(tempfile.mkdtemp(prefix="mlxu-paths-")).resolve()
    root, out = base / "root", base / "out"
    (root / "data" / "deep").mkdir(parents=True)
    out.mkdir()
    secret = out / "secret.jsonl"
    secret.write_text('{"text": "SECRET"}\n')
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text("{}")
    for d in (root, root / "data"):
        (d / "file.jsonl").write_text('{"text": "inside"}\n')
        (d / "train.jsonl").write_text('{"text": "inside"}\n')
        (d / "link-out").symlink_to(secret)
        (d / "link-in").symlink_to(root / "data" / "file.jsonl")
        (d / "link-dir-out").symlink_to(out)
        (d / "loop").symlink_to(d / "loop")
        (d / "proc").symlink_to("/proc")
        (d / "etc").symlink_to("/etc")
        (d / "dev").symlink_to("/dev")
        (d / "model").symlink_to(out / "model")
    os.mkfifo(root / "fifo")
    os.link(secret, root / "hard.jsonl")  # documented: inside by path
    yield root, out
    shutil.rmtree(base, ignore_errors=True)


def raw_paths(root: Path) -> st.SearchStrategy[str]:
    rel = st.lists(st.sampled_from(PARTS), min_size=1, max_size=6).map("/".join)
    return st.one_of(
        rel.map(lambda r: f"{root}/{r}"),
        rel,
        rel.map(lambda r: "/" + r),
        st.sampled_from(["/etc/passwd", "/proc/self/environ", "/dev/zero", "~", str(root)]),
        st.text(max_size=40),
    )


SETTINGS = settings(
    max_examples=PATH_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


def test_confine_and_open(tree):
    root, out = tree
    roots = (root,)

    @SETTINGS
    @given(raw=raw_paths(root))
    def check(raw: str) -> None:
        try:
            p = paths.confine(raw, roots, "f")
        except errors.InvalidArgument:
            pass
        else:
            assert paths.inside(p, roots), (raw, p)
        try:
            fh = paths.open_confined(raw, roots, "f")
        except errors.InvalidArgument as e:
            assert "SECRET" not in str(e) and str(out) not in str(e), str(e)
            return
        with fh:
            real = paths.fd_path(fh.fileno())
            assert real is not None and paths.inside(real, roots), (raw, real)
            if not raw.endswith("hard.jsonl"):  # the hard link: inside by path (documented)
                assert b"SECRET" not in fh.read()

    check()


def test_dataset_and_model_resolution(tree, tmp_path_factory):
    root, out = tree
    roots = (root,)
    home = tmp_path_factory.mktemp("paths-home")

    @SETTINGS
    @given(raw=raw_paths(root))
    def check(raw: str) -> None:
        try:
            rows = datasets.load_rows(Path(raw), "f", roots) if raw else []
        except errors.InvalidArgument:
            rows = []
        except (IsADirectoryError, NotADirectoryError) as e:  # pragma: no cover - a bug
            raise AssertionError(f"{raw!r}: {e!r}") from e
        if not raw.endswith("hard.jsonl"):
            assert all("SECRET" not in str(r) for r in rows), raw
        try:
            got = models.resolve_model(raw, home, roots, "m", offline=True)
        except errors.InvalidArgument:
            return
        assert paths.inside(got, roots) or str(got).startswith(str(home)), (raw, got)

    check()
