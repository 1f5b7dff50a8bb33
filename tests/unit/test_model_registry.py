"""Model registry state: versions never reused, aliases, delete refused while a live run
uses a version, durability across reopen, and name@N / name:alias resolution."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from mlx_unified.v1 import registry_pb2 as rpb
from orchestrator import model_refs
from orchestrator.model_registry import ModelRegistry
from orchestrator.pipeline import normalize, resolve
from orchestrator.store import Store
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound

RS = opb.RunState


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state" / "orchestrator.db")
    yield s
    s.close()


def _ckpt(path: str, kind: int = cpb.CHECKPOINT_KIND_FULL, base: str = "") -> cpb.Checkpoint:
    return cpb.Checkpoint(path=path, kind=kind, base_model=base, sha256="ab" * 32)


def _pipeline_on(store: Store, model: cpb.ModelRef) -> opb.Pipeline:
    spec = normalize(
        opb.PipelineSpec(
            name="p",
            base_model=model,
            dataset=cpb.DatasetRef(path="/d.jsonl"),
            stages=[opb.Stage(kind=opb.STAGE_KIND_SFT)],
        )
    )
    pl, _ = store.create_pipeline(spec, resolve(spec, ["training"]).to_json())
    return pl


def test_versions_count_up_and_are_never_reused(store: Store) -> None:
    reg = ModelRegistry(store.db)
    assert reg.register("m", _ckpt("/c/1")).version == 1
    lin = rpb.ModelLineage(run_id="r1", stages=[rpb.LineageStage(stage="sft", job_id="j1")])
    v2 = reg.register("m", _ckpt("/c/2"), base_model="tiny-llama", lineage=lin)
    assert (v2.version, v2.base_model, v2.lineage.stages[0].job_id) == (2, "tiny-llama", "j1")
    reg.delete_version("m", 2)
    assert reg.register("m", _ckpt("/c/3")).version == 3  # 2 is gone for good
    m = reg.get_model("m")
    assert [v.version for v in m.versions] == [1, 3] and m.latest_version == 3
    assert reg.get_version("m").checkpoint.path == "/c/3"
    with pytest.raises(NotFound):
        reg.get_version("m", 2)
    with pytest.raises(NotFound):
        reg.get_model("nope")


def test_names_and_aliases_are_checked(store: Store) -> None:
    reg = ModelRegistry(store.db)
    for bad in ("tiny-llama", "a/b", "x@1", "", "a:b"):
        with pytest.raises(InvalidArgument):
            reg.register(bad, _ckpt("/c"))
    reg.register("m", _ckpt("/c/1"))
    with pytest.raises(InvalidArgument):
        reg.set_alias("m", "3", 1)  # an all-digit alias would read as a version
    with pytest.raises(NotFound):
        reg.set_alias("m", "production", 9)


def test_aliases_move_and_follow_deletes(store: Store) -> None:
    reg = ModelRegistry(store.db)
    reg.register("m", _ckpt("/c/1"))
    reg.register("m", _ckpt("/c/2"))
    assert reg.set_alias("m", "production", 1).aliases == ["production"]
    reg.set_alias("m", "production", 2)
    assert reg.get_version("m", alias="production").version == 2
    assert reg.get_model("m").aliases == {"production": 2}
    reg.set_alias("m", "old", 1)
    reg.delete_version("m", 1)  # its aliases go with it
    assert dict(reg.get_model("m").aliases) == {"production": 2}
    reg.delete_alias("m", "production")
    with pytest.raises(NotFound):
        reg.delete_alias("m", "production")
    with pytest.raises(NotFound):
        reg.get_version("m", alias="production")


def test_delete_is_refused_while_a_live_run_uses_the_version(store: Store) -> None:
    reg = ModelRegistry(store.db)
    reg.register("m", _ckpt("/ckpts/m1"))
    spec = opb.PipelineSpec(base_model=cpb.ModelRef(model="m@1"))
    resolved = model_refs.resolve(reg, spec, "spec")
    assert resolved.base_model.model == "/ckpts/m1"
    pl = _pipeline_on(store, resolved.base_model)
    run, _ = store.create_run(pl.pipeline_id)  # PENDING
    with pytest.raises(FailedPrecondition, match=run.run_id):
        reg.delete_version("m", 1)
    store.set_run_state(run.run_id, RS.RUN_STATE_RUNNING, "started")
    with pytest.raises(FailedPrecondition):
        reg.delete_version("m", 1)
    store.set_run_state(run.run_id, RS.RUN_STATE_SUCCEEDED, "done")
    reg.delete_version("m", 1)  # a finished run no longer holds it


def test_state_survives_reopen(store: Store, tmp_path: Path) -> None:
    reg = ModelRegistry(store.db)
    reg.register("m", _ckpt("/c/1"), description="first")
    reg.set_alias("m", "production", 1)
    store.close()
    again = Store(tmp_path / "state" / "orchestrator.db")
    try:
        reg2 = ModelRegistry(again.db)
        v = reg2.get_version("m", alias="production")
        assert (v.version, v.description, v.checkpoint.sha256) == (1, "first", "ab" * 32)
        assert reg2.register("m", _ckpt("/c/2")).version == 2
        models, token = reg2.list_models()
        assert [m.name for m in models] == ["m"] and token == ""
    finally:
        again.close()


def test_references_resolve_or_name_the_field(store: Store) -> None:
    reg = ModelRegistry(store.db)
    reg.register("full", _ckpt("/c/full"))
    reg.register("ad", _ckpt("/c/ad", cpb.CHECKPOINT_KIND_ADAPTER, base="tiny-llama"))
    reg.set_alias("ad", "production", 1)
    spec = opb.PipelineSpec(
        base_model=cpb.ModelRef(model="ad:production"),
        stages=[opb.Stage(sft={"model": {"model": "full"}})],
    )
    out = model_refs.resolve(reg, spec, "spec")
    assert (out.base_model.model, out.base_model.adapter_path) == ("tiny-llama", "/c/ad")
    assert out.stages[0].sft.model.model == "/c/full"
    # Not registered: today's meaning (a built-in name, a hub id, a path) is kept.
    for plain in ("tiny-llama", "org/name", "/abs/path"):
        keep = opb.PipelineSpec(base_model=cpb.ModelRef(model=plain))
        assert model_refs.resolve(reg, keep, "spec").base_model.model == plain
    bad = opb.PipelineSpec(
        base_model=cpb.ModelRef(model="full@7"),
        stages=[opb.Stage(sft={"model": {"model": "nobody:production"}})],
    )
    with pytest.raises(InvalidArgument) as e:
        model_refs.resolve(reg, bad, "spec")
    assert {v.field for v in e.value.violations} == {
        "spec.base_model.model",
        "spec.stages[0].sft.model.model",
    }


def test_an_older_database_gains_the_registry_tables(tmp_path: Path) -> None:
    path = tmp_path / "state" / "orchestrator.db"
    Store(path).close()
    conn = sqlite3.connect(path)  # as a database written before the registry existed
    conn.executescript("DROP TABLE models; DROP TABLE model_versions; DROP TABLE model_aliases;")
    conn.close()
    s = Store(path)
    try:
        assert ModelRegistry(s.db).register("m", _ckpt("/c/1")).version == 1
    finally:
        s.close()
