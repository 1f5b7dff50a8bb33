"""Fast, seeded fuzz requests built by walking the proto descriptor (no Hypothesis).

Hypothesis needs 2-20 ms to draw one of these messages; this needs ~0.1 ms, so the suite can
send 1000+ requests per RPC. Request ``i`` of an RPC comes from its own
``random.Random(f"{seed}/{rpc}/{i}")``: the same seed gives the same requests whatever the
servers answered, and any one request can be rebuilt alone (``Fuzzer(...).request(i)``).

Kinds of request (see ``Fuzzer.request``):

- mutated: a valid seed request (seeds.py) with 1-4 fields changed, so examples reach the deep
  checks (file resolution, trainer rules, the scheduler) with one odd value in them;
- scratch: a message with random fields set, from the descriptor;
- bytes: a serialized seed / mutated / scratch request with byte-level damage (bit flips,
  truncation, bogus tags and wire types, over-long lengths and varints, bad UTF-8), sent raw.

Values mix the environment's real paths, models and ids (strategies.Pools) with hostile ones:
unknown enum numbers, NaN/Inf, integer extremes, strings around the 255/256/4096-byte limits,
NUL, traversal, empty prompts and lists, lists and maps past their limits, Structs nested past
MAX_DEPTH, and ``overrides``-shaped Structs (descriptor field names, wrong types, NaN leaves).
"""

from __future__ import annotations

import math
import random

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from tests.fuzz.strategies import HOSTILE_TEXT, PATHISH, TEXT, Pools, _classes

F = FieldDescriptor
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
SMALL_INTS = [0, 1, -1, 2, 3, 4, 7, 8, 16, 31, 32, 64, 100, 128, 255, 256, 257, 1000, 1024]
BIG_INTS = [1025, 4096, 4097, 10_000_000, 10_000_001, 131072, 131073, 10**6, 10**9]
FLOATS = [
    0.0, -0.0, 1.0, -1.0, 0.5, 0.1, 1e-3, 1e-12, 0.999999, 1.0000001, 2.0, 10.0, 1e4, 1e6,
    1e9, 1e308, -1e308, 5e-324, 3.5e38, math.inf, -math.inf, math.nan, -math.nan,
]  # fmt: skip
# Strings around the byte limits (ids 256, names 255, others 4096), in 1- and 2-byte chars.
SIZED = ["a" * 255, "a" * 256, "a" * 257, "é" * 128, "é" * 129, "x" * 4096, "x" * 4097]
ROLES = ["user", "assistant", "system", "tool", "User", ""]
NAMES = ["sft", "dpo", "ppo", "grpo", "kto", "orpo", "distill", "export", "reward_model"]
TEMPLATES = ["chatbot", "efficient_llm", "aligned_model", "research"]
BIG_LENGTHS = [17, 33, 65, 70, 257, 1025, 1100, 2100]
JSON_KEYS = ["stages", "sft", "dpo", "loop", "epochs", "batch_size", "x", "", "k" * 300]
JSON_LEAVES = [
    None, True, False, 0, 1, -1, 2.5, 1e308, math.inf, -math.inf, math.nan, "", "x",
    "a" * 300, "\x00", "DPO_LOSS_IPO", "999", [], {},
]  # fmt: skip
MAX_DEPTH = 4  # of random sub-messages (seeds are deeper; mutations walk into them)


class Fuzzer:
    """Requests for one RPC: ``request(i)`` -> (kind, message or raw bytes)."""

    def __init__(self, desc: Descriptor, bases: list[Message], pools: Pools, seed: str) -> None:
        self.desc, self.bases, self.pools, self.seed = desc, bases, pools, seed
        self.cls = _classes[desc.full_name]

    def request(self, i: int) -> tuple[str, Message | bytes]:
        rng = random.Random(f"{self.seed}/{self.desc.full_name}/{i}")
        r = rng.random()
        if r < 0.15:
            return "bytes", damage(self._message(rng, rng.random()).SerializeToString(), rng)
        return ("mutated" if self.bases and r < 0.75 else "scratch"), self._message(rng, r)

    def _message(self, rng: random.Random, r: float) -> Message:
        if self.bases and r < 0.75:
            msg = self.cls()
            msg.CopyFrom(rng.choice(self.bases))
            for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
                self.mutate(msg, rng, 0)
            return msg
        return self.scratch(self.desc, rng, 0)

    # --- values ------------------------------------------------------------------------

    def string(self, fd: FieldDescriptor, rng: random.Random) -> str:
        p, name, r = self.pools, fd.name, rng.random()
        if r < 0.25:
            value = rng.choice(HOSTILE_TEXT + SIZED)
            if name in TEXT and len(value) > 1000 and rng.random() < 0.8:
                # Free text has no size limit but the request's: an accepted Score of it
                # runs the model over 2048 tokens (seconds), so it is drawn less often.
                value = value[: rng.choice([0, 1, 255, 256, 257])]
            return value
        if r < 0.35:
            return _text(rng)
        if name in PATHISH:
            return rng.choice((p.paths + p.models) or ["/tmp"])
        if name.endswith("_id") or name in ("page_token", "from_stage"):
            return rng.choice(p.ids + ["", "job-x", "run-x", "pl-x"])
        if name in TEXT:
            return rng.choice(["hello there", "", " ", "a b", "\n"])
        if name == "role":
            return rng.choice(ROLES)
        if name == "template":
            return rng.choice(TEMPLATES + ["nope"])
        return rng.choice(p.names + NAMES)

    def scalar(self, fd: FieldDescriptor, rng: random.Random, depth: int) -> object:
        t = fd.type
        if t == F.TYPE_MESSAGE:
            if fd.message_type.full_name == "google.protobuf.Struct":
                return self.struct(rng)
            return self.scratch(fd.message_type, rng, depth + 1)
        if t == F.TYPE_ENUM:
            known = [v.number for v in fd.enum_type.values]
            return rng.choice(known + known + [max(known) + 1, 999, -1, INT32[0], INT32[1]])
        if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            return rng.choice(FLOATS) if rng.random() < 0.8 else rng.uniform(-2, 2)
        if t == F.TYPE_BOOL:
            return rng.random() < 0.5
        if t == F.TYPE_STRING:
            return self.string(fd, rng)
        v = self.integer(t, rng)
        if t in (F.TYPE_UINT64, F.TYPE_FIXED64):  # unsigned: the same values, wrapped
            return v % 2**64
        if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
            return v % 2**32
        return v

    def integer(self, t: int, rng: random.Random) -> int:
        lo, hi = INT64 if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64) else INT32
        r = rng.random()
        if r < 0.5:
            return rng.choice(SMALL_INTS)
        if r < 0.7:
            return rng.choice(BIG_INTS + [-v for v in BIG_INTS])
        if r < 0.85:
            return rng.choice([lo, hi, lo + 1, hi - 1, -2, -(2**31), 2**31 - 1])
        return rng.randint(lo, hi)

    def struct(self, rng: random.Random) -> struct_pb2.Struct:
        r = rng.random()
        if r < 0.2:  # nested past specs.MAX_DEPTH; past protobuf's own recursion limit too
            d: dict = {"x": rng.choice([math.inf, 1.0])}
            for _ in range(rng.randint(10, 40)):
                d = {"stages": d}
        elif r < 0.6:  # shaped like a PipelineSpec: real field names, odd values
            d = self.spec_json(_classes["mlx_unified.v1.PipelineSpec"].DESCRIPTOR, rng, 0)
        elif r < 0.7:  # past the map-entry and list limits
            n = rng.choice(BIG_LENGTHS[2:])
            d = {f"k{i}": i for i in range(n)} if n < 100 else {"stages": [1.0] * n}
        else:
            d = {rng.choice(JSON_KEYS): _json(rng, 0) for _ in range(rng.randint(0, 4))}
        s = struct_pb2.Struct()
        s.update(d)
        return s

    def spec_json(self, desc: Descriptor, rng: random.Random, depth: int) -> dict:
        """A JSON object keyed by ``desc``'s field names (proto or camelCase, or a typo)."""
        out: dict = {}
        for fd in rng.sample(list(desc.fields), min(len(desc.fields), rng.randint(1, 3))):
            key = rng.choice([fd.name, fd.name, fd.json_name, fd.name + "_typo"])
            if rng.random() < 0.2:
                out[key] = _json(rng, 2)  # any JSON where a field goes
            elif fd.name == "stages" and rng.random() < 0.6:  # keyed by stage name
                stage = fd.message_type
                out[key] = {rng.choice(NAMES): self.spec_json(stage, rng, depth + 1)}
            elif fd.message_type is not None and depth < 5:
                sub = self.spec_json(fd.message_type, rng, depth + 1)
                out[key] = [sub] if fd.is_repeated else sub
            elif fd.type == F.TYPE_ENUM:
                out[key] = rng.choice([v.name for v in fd.enum_type.values] + [999, "NOPE"])
            else:
                v = self.scalar(fd, rng, depth)
                out[key] = v if not isinstance(v, str) or len(v) < 5000 else v[:5000]
        return out

    # --- messages ------------------------------------------------------------------------

    def scratch(self, desc: Descriptor, rng: random.Random, depth: int) -> Message:
        msg = _classes[desc.full_name]()
        if depth > MAX_DEPTH or not desc.fields:
            return msg
        for fd in rng.sample(list(desc.fields), min(len(desc.fields), rng.randint(0, 5))):
            self.assign(msg, fd, rng, depth)
        return msg

    def assign(self, msg: Message, fd: FieldDescriptor, rng: random.Random, depth: int) -> None:
        """Give ``fd`` of ``msg`` a new random value (a new list / map when repeated)."""
        if _is_map(fd):
            self.fill_map(msg, fd, rng, depth)
            return
        if fd.is_repeated:
            target = getattr(msg, fd.name)
            del target[:]
            n = rng.choice([0, 1, 1, 2, 3]) if rng.random() < 0.85 else rng.choice(BIG_LENGTHS)
            if not n:
                return
            items = [self.scalar(fd, rng, depth) for _ in range(min(n, 3))]
            items = [items[i % len(items)] for i in range(n)]  # long lists: copies, cheap
            if fd.type == F.TYPE_MESSAGE:
                for item in items:
                    target.add().CopyFrom(item)
            else:
                target.extend(items)
            return
        value = self.scalar(fd, rng, depth)
        if fd.type == F.TYPE_MESSAGE:
            getattr(msg, fd.name).CopyFrom(value)
        else:
            setattr(msg, fd.name, value)

    def fill_map(self, msg: Message, fd: FieldDescriptor, rng: random.Random, depth: int) -> None:
        target = getattr(msg, fd.name)
        kf, vf = (fd.message_type.fields_by_name[k] for k in ("key", "value"))
        n = rng.choice([0, 1, 2, 3]) if rng.random() < 0.85 else rng.choice([65, 70])
        for i in range(n):
            key = self.scalar(kf, rng, depth) if n < 5 else f"k{i}"
            if vf.type == F.TYPE_MESSAGE:
                target[key].CopyFrom(self.scalar(vf, rng, depth))
            else:
                target[key] = self.scalar(vf, rng, depth)

    def mutate(self, msg: Message, rng: random.Random, depth: int) -> None:
        """Change one field somewhere in ``msg``: walk down (mostly through fields that are
        set, so the rest of a valid request stays valid), then replace, clear or edit it."""
        fields = list(msg.DESCRIPTOR.fields)
        if not fields:
            return
        present = [fd for fd, _ in msg.ListFields()]
        fd = rng.choice(present) if present and rng.random() < 0.6 else rng.choice(fields)
        r = rng.random()
        if r < 0.1:
            msg.ClearField(fd.name)
        elif _is_map(fd):
            self.fill_map(msg, fd, rng, depth)
        elif fd.is_repeated:
            items = getattr(msg, fd.name)
            if fd.type == F.TYPE_MESSAGE and len(items) and r < 0.6:
                self.mutate(rng.choice(items), rng, depth + 1)  # edit one item in place
            elif len(items) and r < 0.4:
                items[rng.randrange(len(items))] = self.scalar(fd, rng, depth)
            else:
                self.assign(msg, fd, rng, depth)
        elif (
            fd.type == F.TYPE_MESSAGE
            and fd.message_type.full_name != "google.protobuf.Struct"
            and depth < 8
            and r < 0.75
        ):
            self.mutate(getattr(msg, fd.name), rng, depth + 1)
            if not getattr(msg, fd.name).ListFields():
                getattr(msg, fd.name).SetInParent()  # an empty sub-message, set
        else:
            self.assign(msg, fd, rng, depth)


def damage(data: bytes, rng: random.Random) -> bytes:
    """``data`` with 1-4 byte-level edits: mostly unparseable, sometimes a message with
    unknown fields or a different value parsed from the same bytes."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op, at = rng.randrange(9), rng.randint(0, len(buf))
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # cut the end off
            del buf[rng.randrange(len(buf)) :]
        elif op == 2:  # random bytes
            buf[at:at] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and buf:  # drop a slice
            del buf[at : at + rng.randint(1, 8)]
        elif op == 4:  # a field with a random number and wire type (6 and 7 do not exist)
            tag = (rng.choice([1, 2, 3, 5, 15, 16, 99, 2**29 - 1]) << 3) | rng.randrange(8)
            buf[at:at] = _varint(tag) + rng.randbytes(rng.randint(0, 6))
        elif op == 5:  # a length-delimited field claiming more bytes than there are
            buf[at:at] = _varint((rng.randint(1, 12) << 3) | 2) + _varint(rng.choice([5, 2**31]))
        elif op == 6:  # an over-long varint
            buf[at:at] = b"\x08" + b"\xff" * rng.randint(10, 12) + b"\x01"
        elif op == 7:  # a string field (tag 1..12) that is not UTF-8
            buf[at:at] = _varint((rng.randint(1, 12) << 3) | 2) + b"\x03\xff\xfe\xc0"
        elif buf:  # duplicate a slice (repeated / last-one-wins fields)
            j = rng.randrange(len(buf))
            buf[at:at] = buf[j : j + rng.randint(1, 32)]
    return bytes(buf)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _text(rng: random.Random) -> str:
    alphabet = "ab /.-_~\x00\t\né\u202e日\U0001f600"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))


def _json(rng: random.Random, depth: int) -> object:
    r = rng.random()
    if depth < 3 and r < 0.25:
        return {rng.choice(JSON_KEYS): _json(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    if depth < 3 and r < 0.4:
        return [_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return rng.choice(JSON_LEAVES)


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry
