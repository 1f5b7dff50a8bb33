"""The fast generator still makes the inputs that found bugs before (no servers: ~2 s).

For the first 1000 requests of each RPC (the default count, whatever MLXU_FUZZ_EXAMPLES is):
unknown enum numbers, NaN / Infinity (also inside ``overrides`` Structs), strings over 255
bytes, empty prompts and item lists, negative seeds, Structs nested past the edge's depth
limit, lists and maps past their limits, and bodies that do not parse.
"""

from __future__ import annotations

import math

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from services.runtime import specs
from tests.fuzz import seeds
from tests.fuzz.conftest import SEED
from tests.fuzz.mutator import Fuzzer
from tests.fuzz.strategies import Pools
from tests.fuzz.test_fuzz_rpcs import RPCS

N = 1000
F = FieldDescriptor
NAMED = [
    "model",
    "chat",
    "prefs",
    "prompts",
    "unpaired",
    "reward_model",
    "dsdir",
    "evil_ds",
    "missing",
    "dir",
]


@pytest.fixture(scope="module")
def generated() -> dict[str, tuple[Descriptor, list[tuple[str, Message | None]]]]:
    named = {k: f"/srv/fuzz/{k}" for k in NAMED}
    pools = Pools(paths=list(named.values()), models=[named["model"]], named=named)
    pools.ids += ["job-a", "job-b", "job-c", "pl-a", "run-a"]
    out = {}
    for _, svc, method in RPCS:
        rpc = f"{svc}.{method.name}"
        fuzzer = Fuzzer(method.input_type, seeds.for_method(rpc, pools), pools, SEED)
        reqs = []
        for i in range(N):
            kind, req = fuzzer.request(i)
            if isinstance(req, bytes):
                try:
                    req = fuzzer.cls.FromString(req)
                except (DecodeError, RuntimeError, ValueError):
                    req = None  # does not parse
            reqs.append((kind, req))
        out[rpc] = (method.input_type, reqs)
    return out


def _walk(msg: Message, depth: int = 0):  # noqa: ANN202
    """(field, value, depth, list length or None) of every value set in ``msg``."""
    for fd, value in msg.ListFields():
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            yield fd, value, depth, len(value)
            vf = fd.message_type.fields_by_name["value"]
            items = list(value.values())
        elif fd.is_repeated:
            yield fd, value, depth, len(value)
            vf, items = fd, list(value)[:3]  # long lists are copies of three items
        else:
            vf, items = fd, [value]
        for item in items:
            yield vf, item, depth, None
            if vf.type == F.TYPE_MESSAGE:
                yield from _walk(item, depth + 1)


def _reaches(desc: Descriptor, want, seen: set | None = None) -> bool:  # noqa: ANN001
    seen = seen if seen is not None else set()
    if desc.full_name in seen:
        return False
    seen.add(desc.full_name)
    return any(
        want(fd) or (fd.message_type is not None and _reaches(fd.message_type, want, seen))
        for fd in desc.fields
    )


def _any(reqs, pred) -> bool:  # noqa: ANN001
    return any(req is not None and any(pred(*v) for v in _walk(req)) for _, req in reqs)


def _unknown_enum(fd, value, depth, n) -> bool:  # noqa: ANN001
    return n is None and fd.type == F.TYPE_ENUM and value not in fd.enum_type.values_by_number


def _not_finite(fd, value, depth, n) -> bool:  # noqa: ANN001
    return n is None and fd.type == F.TYPE_DOUBLE and not math.isfinite(value)


def _long_string(fd, value, depth, n) -> bool:  # noqa: ANN001
    return n is None and fd.type == F.TYPE_STRING and len(value.encode()) > 255


def _too_many(fd, value, depth, n) -> bool:  # noqa: ANN001
    return n is not None and n > specs.MAX_MAP_ENTRIES  # 64; lists get 65..2100


def test_every_rpc_gets_unparseable_bodies_and_kinds(generated) -> None:
    for rpc, (_, reqs) in generated.items():
        kinds = {k for k, _ in reqs}
        assert {"bytes", "scratch"} <= kinds, (rpc, kinds)
        assert sum(req is None for _, req in reqs) >= 20, rpc
        if rpc != "OrchestratorService.ListTemplates":  # no fields, so no seed either
            assert "mutated" in kinds, rpc


@pytest.mark.parametrize(
    ("name", "field_pred", "value_pred"),
    [
        ("unknown enum", lambda fd: fd.type == F.TYPE_ENUM, _unknown_enum),
        ("NaN / Infinity", lambda fd: fd.type == F.TYPE_DOUBLE, _not_finite),
        ("string over 255 bytes", lambda fd: fd.type == F.TYPE_STRING, _long_string),
        ("list or map over 64 entries", lambda fd: fd.is_repeated, _too_many),
    ],
)
def test_hostile_values_reach_every_rpc_that_has_such_a_field(
    generated, name, field_pred, value_pred
) -> None:  # noqa: ANN001
    missing = [
        rpc
        for rpc, (desc, reqs) in generated.items()
        if _reaches(desc, field_pred) and not _any(reqs, value_pred)
    ]
    assert not missing, f"no {name} in {missing}"


def test_overrides_structs_carry_nan_and_deep_nesting(generated) -> None:
    _, reqs = generated["OrchestratorService.CreatePipelineFromTemplate"]
    overrides = [r.overrides for _, r in reqs if r is not None and r.HasField("overrides")]
    assert len(overrides) >= 50
    numbers = [v for o in overrides for fd, v, _, n in _walk(o) if fd.name == "number_value"]
    assert any(math.isnan(v) for v in numbers) and any(math.isinf(v) for v in numbers)
    depths = [max((d for *_, d, _ in _walk(o)), default=0) for o in overrides]
    assert max(depths) > specs.MAX_DEPTH, max(depths)
    shaped = [o for o in overrides if {"stages", "base_model", "datasets"} & set(o.keys())]
    assert len(shaped) >= 20  # PipelineSpec-shaped, so the merge and its checks run


def test_empty_prompts_items_and_negative_seeds(generated) -> None:
    _, gen = generated["GenerationService.Generate"]
    gen = [r for _, r in gen if r is not None]
    assert any(r.WhichOneof("input") == "prompt" and not r.prompt for r in gen)
    assert any(r.WhichOneof("input") == "chat" and not r.chat.messages for r in gen)
    assert any(r.sampling.HasField("seed") and r.sampling.seed < 0 for r in gen)
    _, score = generated["GenerationService.ScoreCompletions"]
    score = [r for _, r in score if r is not None]
    assert any(r.HasField("model") and not r.items for r in score)
    assert any(any(not item.prompt for item in r.items) for r in score)
