"""Hypothesis strategies for any request message, built from its proto descriptor.

Each field is set or not; a set value is drawn from a mix of ordinary values (so deep
validation code runs: real model dirs, datasets, job ids) and hostile ones: unknown enum
numbers, NaN/Inf, int extremes, 10k-character and 300-byte-component strings, NUL bytes,
traversal and symlinks leading outside the roots, huge lists and maps, deep Structs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
FLOATS = st.sampled_from(
    [0.0, -0.0, 1.0, -1.0, 0.5, 0.1, 1e-3, 2.0, 10.0, 1e9, 1e308, -1e308, 5e-324,
     math.inf, -math.inf, math.nan]
)  # fmt: skip
HOSTILE_TEXT = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "x" * 10_000,
    "é" * 300,
    "\u202e\u0000\ud7ff",
    "../../../../etc/passwd",
    "/etc/passwd",
    "/etc/shadow",
    "/dev/zero",
    "/proc/self/environ",
    "~root/.ssh/id_rsa",
    "etc/passwd",
    "org/name",
    "a" * 300,
    "/" + "b" * 300,
    "/".join(["c"] * 2100),
    "//",
    ".",
    "..",
    "${stages.x.result}",
    "%s%n%x",
    "'; DROP TABLE jobs; --",
]


@dataclass
class Pools:
    """Real values of the environment under test, mixed into the draws."""

    paths: list[str] = field(default_factory=list)  # models, datasets, adapters, links
    models: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # job / run / pipeline ids seen
    names: list[str] = field(default_factory=lambda: ["tiny-llama", "chatbot", "sft", "dpo"])
    named: dict[str, str] = field(default_factory=dict)  # "model", "chat", ... -> path


_CACHE: dict[tuple[int, str, int], st.SearchStrategy] = {}
PATHISH = {"path", "valid_path", "adapter_path", "hostfile", "model", "endpoint"}
TEXT = {"prompt", "content", "completion", "text", "reason"}


def _strings(fd: FieldDescriptor, pools: Pools) -> st.SearchStrategy[str]:
    name = fd.name
    common = [st.sampled_from(HOSTILE_TEXT), st.text(max_size=20)]
    if name in PATHISH:
        extra = [st.sampled_from(pools.paths or ["/tmp"]), st.sampled_from(pools.models or ["x"])]
        return st.one_of(*extra, *extra, *common)
    if name.endswith("_id") or name in ("page_token", "from_stage", "pipeline_id"):
        return st.one_of(st.sampled_from(pools.ids or ["job-x"]), *common)
    if name in TEXT:
        return st.one_of(st.just("hello there"), st.text(max_size=200), *common)
    if name == "role":
        return st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), *common)
    return st.one_of(st.sampled_from(pools.names), *common)


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [0, 1, -1, 2, 4, 8, 16, 100, 1000, 10**6, lo, hi, lo + 1, hi - 1]
    return st.one_of(st.sampled_from(edges), st.integers(-5, 64), st.integers(lo, hi))


def _enum(fd: FieldDescriptor) -> st.SearchStrategy[int]:
    known = [v.number for v in fd.enum_type.values]
    return st.one_of(st.sampled_from(known), st.sampled_from([999, -1, 2**31 - 1, 12]))


def _struct(depth: int) -> st.SearchStrategy[struct_pb2.Struct]:
    leaf = st.one_of(st.none(), st.booleans(), FLOATS, st.sampled_from(HOSTILE_TEXT[:6]))
    tree = st.recursive(
        leaf,
        lambda kids: st.one_of(
            st.lists(kids, max_size=3),
            st.dictionaries(
                st.sampled_from(["stages", "sft", "loop", "epochs", "x"]), kids, max_size=3
            ),
        ),
        max_leaves=12,
    )

    def build(d: dict) -> struct_pb2.Struct:
        s = struct_pb2.Struct()
        s.update(d)
        return s

    deep = st.integers(12, 24).map(lambda n: _nested(n))  # past MAX_DEPTH, within protobuf's
    keys = st.sampled_from(["stages", "colour", "name", "dataset"])
    flat = st.dictionaries(keys, tree, max_size=4).map(build)
    return st.one_of(flat, flat, deep.map(build))


def _nested(n: int) -> dict:
    d: dict = {"x": math.inf}
    for _ in range(n):
        d = {"stages": d}
    return d


def _scalar(
    fd: FieldDescriptor, pools: Pools, depth: int, sparse: bool = False
) -> st.SearchStrategy:
    key = (id(pools), f"field:{fd.full_name}:{sparse}", depth)
    if key not in _CACHE:
        _CACHE[key] = _scalar_uncached(fd, pools, depth, sparse)
    return _CACHE[key]


def _scalar_uncached(
    fd: FieldDescriptor, pools: Pools, depth: int, sparse: bool
) -> st.SearchStrategy:
    t = fd.type
    if t == FieldDescriptor.TYPE_MESSAGE:
        return messages(fd.message_type, pools, depth + 1, sparse)
    if t == FieldDescriptor.TYPE_ENUM:
        return _enum(fd)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return FLOATS
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return _strings(fd, pools)
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return _ints(*INT64)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return _ints(*INT64).map(lambda v: v % 2**64)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return _ints(*INT32).map(lambda v: v % 2**32)
    return _ints(*INT32)


def _repeated(
    fd: FieldDescriptor, pools: Pools, depth: int, sparse: bool = False
) -> st.SearchStrategy[list]:
    key = (id(pools), f"repeated:{fd.full_name}:{sparse}", depth)
    if key not in _CACHE:
        _CACHE[key] = _repeated_uncached(fd, pools, depth, sparse)
    return _CACHE[key]


def _repeated_uncached(
    fd: FieldDescriptor, pools: Pools, depth: int, sparse: bool
) -> st.SearchStrategy:
    item = _scalar(fd, pools, depth, sparse)
    # Past-the-limit lengths as copies of one drawn item: cheap to draw, same to validate.
    many = st.sampled_from([65, 70, 257, 1100, 2100])
    return st.one_of(
        st.lists(item, max_size=3),
        st.lists(item, max_size=3),
        st.tuples(many, item).map(lambda t: [t[1]] * t[0]),
    )


def messages(
    desc: Descriptor, pools: Pools, depth: int = 0, sparse: bool = False
) -> st.SearchStrategy[Message]:
    """Messages of type ``desc`` with a random subset of fields set; ``sparse``: at most two
    per level (a patch for ``mutated``)."""
    key = (id(pools), desc.full_name + ("/sparse" if sparse else ""), depth)
    if key not in _CACHE:
        _CACHE[key] = _messages(desc, pools, depth, sparse)
    return _CACHE[key]


def mutated(bases: list[Message], pools: Pools) -> st.SearchStrategy[Message]:
    """One of ``bases`` (valid requests) with a sparse random patch merged in: mostly-valid
    requests whose one or two odd fields reach the deep checks."""
    patch = messages(bases[0].DESCRIPTOR, pools, sparse=True)

    def merge(pair: tuple[Message, Message]) -> Message:
        base, extra = pair
        out = type(base)()
        out.CopyFrom(base)
        out.MergeFrom(extra)
        return out

    return st.tuples(st.sampled_from(bases), patch).map(merge)


def _messages(
    desc: Descriptor, pools: Pools, depth: int, sparse: bool
) -> st.SearchStrategy[Message]:
    cls = _classes[desc.full_name]
    if desc.full_name == "google.protobuf.Struct":
        return _struct(depth)
    if depth > 4:
        return st.just(cls())
    fields = [f for f in desc.fields]

    @st.composite
    def build(draw) -> Message:  # noqa: ANN001
        msg = cls()
        most = 2 if sparse else min(len(fields), 5)  # more per level costs draw time only
        chosen = (
            draw(st.lists(st.sampled_from(fields), max_size=most, unique=True)) if fields else []
        )
        for fd in chosen:
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                kf, vf = (fd.message_type.fields_by_name[k] for k in ("key", "value"))
                n = draw(st.sampled_from([0, 1, 2, 3, 70]))
                target = getattr(msg, fd.name)
                value = None
                for i in range(n):
                    key = draw(_scalar(kf, pools, depth)) if n < 5 else f"k{i}"
                    value = draw(_scalar(vf, pools, depth)) if i < 5 else value
                    if vf.type == FieldDescriptor.TYPE_MESSAGE:
                        target[key].CopyFrom(value)
                    else:
                        target[key] = value
                continue
            if fd.is_repeated:
                values = draw(_repeated(fd, pools, depth, sparse))
                target = getattr(msg, fd.name)
                if fd.type == FieldDescriptor.TYPE_MESSAGE:
                    for v in values:
                        target.add().CopyFrom(v)
                else:
                    target.extend(values)
                continue
            value = draw(_scalar(fd, pools, depth, sparse))
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, fd.name).CopyFrom(value)
            else:
                setattr(msg, fd.name, value)
        return msg

    return build()


class _Classes(dict):
    """Message classes by full name, from the default pool (every generated module)."""

    def __missing__(self, name: str) -> type[Message]:
        from google.protobuf import message_factory, symbol_database

        desc = symbol_database.Default().pool.FindMessageTypeByName(name)
        cls = message_factory.GetMessageClass(desc)
        self[name] = cls
        return cls


_classes = _Classes()
