"""The config schema: MLX-free, bounds declared once on the fields and enforced from there,
one validation at the edge, and docs generated from the same fields."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from services import registry
from services.runtime.errors import InvalidArgument
from services.schema.base import DictConfig, rule_of
from services.schema.common import LoopSettings, OptimizerSettings

ROOT = Path(__file__).resolve().parents[2]

# The smallest valid config of each method (model references as given, no files read).
MINIMAL: dict[str, dict] = {
    "sft": {"model": {"model": "m"}, "dataset": {"path": "d"}},
    "export": {"model": {"model": "m", "adapter_path": "a"}},
    "distill": {"student": {"model": "s"}, "teachers": [{"model": {"model": "t"}}], "dataset": {"path": "d"}},  # noqa: E501
    "reward_model": {"model": {"model": "m"}, "dataset": {"path": "d"}},
    "dpo": {"policy": {"model": "m"}, "dataset": {"path": "d"}},
    "kto": {"policy": {"model": "m"}, "dataset": {"path": "d"}},
    "orpo": {"policy": {"model": "m"}, "dataset": {"path": "d"}},
    "ppo": {"policy": {"model": "m"}, "dataset": {"path": "d"}, "reward": {"reward_function": "length"}},  # noqa: E501
    "grpo": {"policy": {"model": "m"}, "dataset": {"path": "d"}, "reward": {"reward_function": "length"}},  # noqa: E501
}  # fmt: skip


def test_schema_and_registry_import_no_mlx():
    code = (
        "import sys\n"
        "from services import registry\n"
        "classes = [m.config_class() for m in registry.METHODS]\n"
        "bad = sorted(m for m in sys.modules if m == 'mlx' or m.startswith('mlx.'))\n"
        "assert not bad, bad\n"
        "print(len(classes))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{ROOT}:{ROOT / 'protos'}", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == len(MINIMAL)


def test_every_method_config_is_a_schema_class():
    for m in registry.METHODS:
        cls = m.config_class()
        assert cls.__module__.startswith("services.schema."), m.name
        built = cls.from_dict(MINIMAL[m.name], prefix="spec")
        assert cls.rehydrate(built.to_dict()) == built  # the stored dict round-trips


def _bounded(cls: type, path: str = "") -> typing.Iterator[tuple[str, dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        section = next((a for a in inner if isinstance(a, type) and issubclass(a, DictConfig)), 0)
        name = f"{path}{f.name}"
        if tuple in (typing.get_origin(hint), typing.get_origin(inner[0])):
            continue  # repeated fields: their entries are checked by name[i] (below)
        if section:
            yield from _bounded(section, name + ".")
        elif rule_of(f) is not None:
            yield name, f, inner[0]


def _outside(f: dataclasses.Field, typ: type) -> list:
    """Values that break the field's declared rule (and are not "0 = default")."""
    r = rule_of(f)
    assert r is not None
    if r.choices:
        return ["no-such-choice" if typ is str else 999]
    step = 1 if typ is int else 0.5
    out = []
    lo = r.ge if r.ge is not None else r.gt
    if lo is not None:
        bad = lo - step if r.ge is not None else lo
        while bad in r.alt or (f.metadata.get("zero") and bad == 0):
            bad -= step
        out.append(typ(bad))
    hi = r.le if r.le is not None else r.lt
    if hi is not None:
        out.append(typ(hi + step) if r.le is not None else typ(hi))
    return out


def _set(data: dict, path: str, value: object) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    node = data
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return data


@pytest.mark.parametrize("kind", sorted(MINIMAL))
def test_every_declared_bound_is_enforced_with_its_field_path(kind: str):
    cls = registry.get(kind).config_class()
    checked = 0
    for path, f, typ in _bounded(cls):
        if path == "optimizer.learning_rate":
            continue  # 0 is "the method's default" (prepare fills it), checked below
        for bad in _outside(f, typ):
            with pytest.raises(InvalidArgument) as e:
                cls.from_dict(_set(MINIMAL[kind], path, bad), prefix="spec")
            fields = {v.field for v in e.value.violations}
            assert f"spec.{path}" in fields, (path, bad, fields)
            checked += 1
            # The worker's rebuild does not validate again.
            cls.rehydrate(_set(MINIMAL[kind], path, bad))
    assert checked >= (3 if kind == "export" else 30)
    if kind == "export":
        return
    with pytest.raises(InvalidArgument, match="must be in"):
        cls.from_dict(_set(MINIMAL[kind], "optimizer.learning_rate", 50.0), prefix="spec")


def test_repeated_sections_report_every_entry_and_cross_field_rules_still_run():
    cls = registry.get("distill").config_class()
    bad = {
        **MINIMAL["distill"],
        "teachers": [{"model": {"model": "t"}, "weight": -1.0}, {"weight": 2.0}],
        "student_init": {"keep_teacher_layers": [0, -3, 0]},
    }
    with pytest.raises(InvalidArgument) as e:
        cls.from_dict(bad, prefix="spec")
    fields = [v.field for v in e.value.violations]
    assert "spec.teachers[0].weight" in fields
    assert "spec.teachers[1].model.model" in fields
    assert "spec.student_init.keep_teacher_layers" in fields  # -3, and the duplicate 0
    assert len(fields) == len(set((v.field, v.description) for v in e.value.violations))


def test_a_default_is_declared_once_and_zero_means_it():
    loop = LoopSettings.from_dict({"batch_size": 0, "steps_per_eval": -1})
    assert loop.batch_size == LoopSettings().batch_size == 4
    assert loop.steps_per_eval == -1
    assert OptimizerSettings.from_dict({"name": "lion"}).beta2 == 0.99
    sft = registry.get("sft").config_class()
    full = sft.from_dict({**MINIMAL["sft"], "method": "full"})
    assert full.optimizer.learning_rate == registry.get("sft").lr[0]


def test_docs_config_md_is_generated_from_the_schema():
    out = subprocess.run(
        [sys.executable, "scripts/gen_config_docs.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
