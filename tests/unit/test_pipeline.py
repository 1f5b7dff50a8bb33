"""Pipeline validation, bindings, auto_configure rules and templates (no services)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from orchestrator import autoconfig, templates
from orchestrator.autoconfig import DatasetInfo, Environment, ModelInfo
from orchestrator.pipeline import Plan, normalize, placeholder, resolve
from services.runtime.errors import FailedPrecondition, InvalidArgument

ALL = ("training", "distillation", "rlhf")


def spec(*stages: dict[str, Any], **extra: Any) -> opb.PipelineSpec:
    d = {"name": "p", "base_model": {"model": "base"}, "dataset": {"path": "/d.jsonl"}}
    d |= extra
    d["stages"] = list(stages)
    return normalize(json_format.ParseDict(d, opb.PipelineSpec()))


def fields(exc: pytest.ExceptionInfo) -> dict[str, str]:
    return {v.field: v.description for v in exc.value.violations}


def stage(plan: Plan, name: str) -> dict[str, Any]:
    return next(s.to_json() for s in plan.stages if s.name == name)


# ---- validation ----------------------------------------------------------------------


def test_unknown_stage_kind() -> None:
    with pytest.raises(InvalidArgument) as e:
        resolve(spec({"name": "a", "kind": 42}), ALL)
    assert "spec.stages[0].kind" in fields(e)


def test_kind_and_spec_must_agree() -> None:
    with pytest.raises(InvalidArgument) as e:
        resolve(spec({"name": "a", "kind": "STAGE_KIND_DPO", "sft": {}}), ALL)
    assert "spec.stages[0].sft" in fields(e)


def test_binding_to_a_later_stage_is_a_cycle() -> None:
    s = spec(
        {"kind": "STAGE_KIND_SFT", "inputs": [{"input": "model", "from_stage": "dpo"}]},
        {"kind": "STAGE_KIND_DPO"},
    )
    with pytest.raises(InvalidArgument) as e:
        resolve(s, ALL)
    assert "earlier stages only" in fields(e)["spec.stages[0].inputs[0].from_stage"]


def test_binding_to_itself_and_to_unknown_stage() -> None:
    s = spec(
        {"kind": "STAGE_KIND_SFT"},
        {
            "kind": "STAGE_KIND_DPO",
            "inputs": [
                {"input": "model", "from_stage": "dpo"},
                {"input": "reference", "from_stage": "nope"},
            ],
        },
    )
    with pytest.raises(InvalidArgument) as e:
        resolve(s, ALL)
    f = fields(e)  # both reported at once
    assert "earlier stages only" in f["spec.stages[1].inputs[0].from_stage"]
    assert "no stage named 'nope'" in f["spec.stages[1].inputs[1].from_stage"]


def test_ppo_without_reward_source() -> None:
    s = spec({"kind": "STAGE_KIND_SFT"}, {"kind": "STAGE_KIND_PPO"})
    with pytest.raises(InvalidArgument) as e:
        resolve(s, ALL)
    assert "reward source" in fields(e)["spec.stages[1].ppo.reward"]


def test_duplicate_stage_names() -> None:
    s = spec({"kind": "STAGE_KIND_SFT"}, {"name": "sft", "kind": "STAGE_KIND_SFT"})
    with pytest.raises(InvalidArgument) as e:
        resolve(s, ALL)
    assert "duplicate" in fields(e)["spec.stages[1].name"]


def test_unknown_input_and_wrong_source_kinds() -> None:
    s = spec(
        {"kind": "STAGE_KIND_SFT"},
        {"name": "rm", "kind": "STAGE_KIND_REWARD_MODEL"},
        {
            "kind": "STAGE_KIND_PPO",
            "inputs": [
                {"input": "model", "from_stage": "rm"},
                {"input": "reward_model", "from_stage": "sft"},
                {"input": "teacher", "from_stage": "sft"},
            ],
        },
    )
    with pytest.raises(InvalidArgument) as e:
        resolve(s, ALL)
    f = fields(e)
    assert "not a policy" in f["spec.stages[2].inputs[0].from_stage"]
    assert "not a reward_model stage" in f["spec.stages[2].inputs[1].from_stage"]
    assert "not an input of a ppo stage" in f["spec.stages[2].inputs[2].input"]


def test_missing_dataset_name_base_and_explicit_conflict() -> None:
    d = {"name": "", "base_model": {}, "stages": []}
    d["stages"] = [
        {"kind": "STAGE_KIND_SFT", "sft": {"model": {"model": "x"}}},
        {
            "kind": "STAGE_KIND_DPO",
            "dpo": {"policy": {"model": "y"}, "dataset": {"path": "/p.jsonl"}},
            "inputs": [{"input": "model", "from_stage": "sft"}],
        },
    ]
    with pytest.raises(InvalidArgument) as e:
        resolve(normalize(json_format.ParseDict(d, opb.PipelineSpec())), ALL)
    f = fields(e)
    assert set(f) >= {"spec.name", "spec.base_model.model", "spec.stages[0].sft.dataset.path"}
    assert "set explicitly" in f["spec.stages[1].inputs[0].input"]


def test_unconfigured_service_is_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition, match="rlhf"):
        resolve(spec({"kind": "STAGE_KIND_SFT"}, {"kind": "STAGE_KIND_DPO"}), ["training"])


# ---- bindings ------------------------------------------------------------------------


def test_sft_output_is_dpo_policy_and_reference() -> None:
    plan = resolve(spec({"kind": "STAGE_KIND_SFT"}, {"kind": "STAGE_KIND_DPO"}), ALL)
    sft, dpo = stage(plan, "sft"), stage(plan, "dpo")
    assert sft["spec"]["model"] == {"model": "base"}
    assert dpo["spec"]["policy"] == {"model": placeholder("sft")}
    assert dpo["spec"]["reference"] == {"model": placeholder("sft")}  # never the base
    assert {(b["input"], b["from_stage"]) for b in dpo["bindings"]} == {
        ("model", "sft"),
        ("reference", "sft"),
    }
    assert dpo["spec"]["dataset"] == {"path": "/d.jsonl"}


def test_dpo_first_uses_base_for_both() -> None:
    plan = resolve(spec({"kind": "STAGE_KIND_DPO"}), ALL)
    body = stage(plan, "dpo")["spec"]
    assert body["policy"] == body["reference"] == {"model": "base"}


def test_reward_model_feeds_ppo_but_is_not_the_policy() -> None:
    s = spec(
        {"kind": "STAGE_KIND_SFT"},
        {"kind": "STAGE_KIND_REWARD_MODEL"},
        {"kind": "STAGE_KIND_PPO"},
        datasets={"ppo": {"path": "/prompts.jsonl"}},
    )
    plan = resolve(s, ALL)
    assert stage(plan, "reward_model")["spec"]["model"] == {"model": placeholder("sft")}
    ppo = stage(plan, "ppo")["spec"]
    assert ppo["policy"] == {"model": placeholder("sft")}
    assert ppo["reference"] == {"model": placeholder("sft")}
    assert ppo["reward"]["reward_model"] == {"model": placeholder("reward_model")}
    assert ppo["dataset"] == {"path": "/prompts.jsonl"}


def test_distillation_teachers() -> None:
    # Default teacher = previous model; student = student_init.
    plan = resolve(
        spec(
            {"kind": "STAGE_KIND_SFT"},
            {"kind": "STAGE_KIND_DISTILL", "distill": {"student_init": {"num_layers": 2}}},
        ),
        ALL,
    )
    d = stage(plan, "distill")["spec"]
    assert d["teachers"] == [{"model": {"model": placeholder("sft")}}]
    assert "student" not in d
    # An outside teacher plus an earlier stage's output as a second teacher.
    plan = resolve(
        spec(
            {"kind": "STAGE_KIND_SFT"},
            {
                "kind": "STAGE_KIND_DISTILL",
                "distill": {"teachers": [{"model": {"model": "big"}}], "student": {"model": "s"}},
                "inputs": [{"input": "teachers[1]", "from_stage": "sft"}],
            },
        ),
        ALL,
    )
    d = stage(plan, "distill")["spec"]
    assert [t["model"]["model"] for t in d["teachers"]] == ["big", placeholder("sft")]
    # The student would be the teacher itself.
    with pytest.raises(InvalidArgument) as e:
        resolve(spec({"kind": "STAGE_KIND_SFT"}, {"kind": "STAGE_KIND_DISTILL"}), ALL)
    assert "teacher itself" in fields(e)["spec.stages[1].distill.student"]


# ---- auto_configure ------------------------------------------------------------------


def env(params: int, layers: int, rows: int, tokens: int, memory_gib: float) -> Environment:
    return Environment(
        model_info=lambda ref: ModelInfo(params, layers),
        dataset_info=lambda ref: DatasetInfo(rows, tokens),
        memory_bytes=int(memory_gib * autoconfig.GiB),
    )


def test_auto_configure_small_model() -> None:
    s = spec({"kind": "STAGE_KIND_SFT"}, {"kind": "STAGE_KIND_DPO"}, auto_configure=True)
    plan = resolve(s, ALL, env(135_000_000, 30, 1000, 200_000, 24))
    sft = stage(plan, "sft")
    assert sft["spec"]["method"] == "FINETUNE_METHOD_FULL"
    assert sft["spec"]["optimizer"]["learning_rate"] == 2e-5
    # mean 200 tokens/row -> 512; 16 GiB left / 1 GiB a sequence = 15 -> 8; 900 train rows
    loop = sft["spec"]["loop"]
    assert (loop["max_seq_length"], loop["batch_size"], loop["epochs"]) == (512, 8, 2)
    assert int(loop["max_steps"]) == 225  # ceil(900 * 2 / 8)
    assert "lora" not in sft["spec"]
    assert sft["auto_configure"]["model_params"] == 135_000_000
    dpo = stage(plan, "dpo")["spec"]
    assert dpo["optimizer"]["learning_rate"] == 5e-7 and dpo["loop"]["epochs"] == 1
    assert dpo["policy"] == {"model": placeholder("sft")}  # bindings untouched


def test_auto_configure_big_model_keeps_user_fields() -> None:
    s = spec(
        {"kind": "STAGE_KIND_SFT", "sft": {"optimizer": {"learning_rate": 3e-4}}},
        auto_configure=True,
    )
    plan = resolve(s, ALL, env(7_000_000_000, 32, 50_000, 40_000_000, 24))
    sft = stage(plan, "sft")
    body = sft["spec"]
    assert body["method"] == "FINETUNE_METHOD_QLORA"  # 28 GB of frozen fp32 does not fit
    assert body["lora"]["rank"] == 16
    assert body["optimizer"]["learning_rate"] == 3e-4  # the user's value wins
    loop = body["loop"]  # mean 800 tokens -> 2048; nothing fits -> batch 1 + checkpointing
    assert (loop["max_seq_length"], loop["batch_size"]) == (2048, 1)
    assert loop["grad_checkpoint"] is True and loop["grad_accumulation_steps"] == 4
    assert (loop["epochs"], int(loop["max_steps"])) == (1, 11250)  # 45000 rows / 4
    assert "optimizer.learning_rate" not in sft["auto_configure"]["chosen"]
    # With 128 GiB the same model gets plain LoRA.
    plan = resolve(s, ALL, env(7_000_000_000, 32, 50_000, 40_000_000, 128))
    assert stage(plan, "sft")["spec"]["method"] == "FINETUNE_METHOD_LORA"


def test_auto_configure_student_size_and_errors() -> None:
    s = spec(
        {"kind": "STAGE_KIND_DISTILL", "distill": {"student_init": {"num_layers": 15}}},
        auto_configure=True,
    )
    plan = resolve(s, ALL, env(1_000_000_000, 30, 100, 0, 64))
    auto = stage(plan, "distill")["auto_configure"]
    assert (auto["model_params"], auto["frozen_params"]) == (500_000_000, 1_000_000_000)

    def boom(ref: str) -> int:
        raise OSError("no network")

    bad = Environment(boom, lambda r: DatasetInfo(1), 1 << 30)
    with pytest.raises(InvalidArgument) as e:
        resolve(spec({"kind": "STAGE_KIND_SFT"}, auto_configure=True), ALL, bad)
    assert "no network" in fields(e)["spec.stages[0].sft.model.model"]


# ---- templates -----------------------------------------------------------------------


@pytest.mark.parametrize("name", templates.names())
def test_templates_resolve(name: str) -> None:
    s = templates.from_template(
        name,
        base_model=cpb.ModelRef(model="base"),
        dataset=cpb.DatasetRef(path="/d.jsonl"),
        model_info=lambda ref: ModelInfo(135_000_000, 30),
    )
    plan = resolve(normalize(s), ALL, env(135_000_000, 30, 500, 50_000, 24))
    kinds = [p.info.name for p in plan.stages]
    expected = {
        "chatbot": ["sft", "dpo"],
        "efficient_llm": ["distill", "sft"],
        "aligned_model": ["sft", "dpo", "distill"],
        "research": ["sft", "reward_model", "dpo", "ppo", "distill", "export"],
    }[name]
    assert kinds == expected
    for p in plan.stages:
        if p.info.name == "distill":
            assert p.spec["student_init"]["num_layers"] == 15  # half of 30
    if name == "research":
        ppo = stage(plan, "ppo")["spec"]
        assert ppo["policy"]["model"] == placeholder("dpo")
        assert ppo["reward"]["reward_model"]["model"] == placeholder("reward_model")
        assert stage(plan, "export")["spec"]["model"]["model"] == placeholder("distill")
    assert [t.name for t in templates.list_templates()] == templates.names()


def test_template_overrides_apply_and_errors_name_the_path() -> None:
    over = struct_pb2.Struct()
    over.update(
        {
            "stages": {
                "sft": {"sft": {"loop": {"max_steps": 7}, "method": "FINETUNE_METHOD_LORA"}}
            },
            "labels": {"team": "a"},
        }
    )
    s = templates.from_template(
        "chatbot", base_model=cpb.ModelRef(model="base"), overrides=over, name="mine"
    )
    assert s.name == "mine" and s.labels["team"] == "a"
    assert s.stages[0].sft.loop.max_steps == 7
    assert s.stages[0].sft.method == cpb.FINETUNE_METHOD_LORA
    assert s.auto_configure is True
    for bad, path in [
        ({"stages": {"sft": {"sft": {"loop": {"max_stepz": 1}}}}}, "sft.sft.loop.max_stepz"),
        ({"stages": {"ppo": {}}}, "stages.ppo"),
        ({"auto_configure": "yes"}, "auto_configure"),
        ({"stages": {"dpo": {"dpo": {"loss": "HUBER"}}}}, "dpo.dpo.loss"),
        ({"stages": {"dpo": {"dpo": {"beta": "big"}}}}, "dpo.dpo.beta"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            templates.from_template("chatbot", overrides=bad)
        assert any(f.endswith(path) and f.startswith("overrides.") for f in fields(e)), fields(e)
    with pytest.raises(InvalidArgument) as e:
        templates.from_template("nope")
    assert "template" in fields(e)
    with pytest.raises(InvalidArgument) as e:  # half depth needs the base model's depth
        templates.from_template("efficient_llm", base_model=cpb.ModelRef(model="base"))
    assert "spec.stages[0].distill.student_init.num_layers" in fields(e)


def test_auto_configure_counts_train_rows_by_where_validation_comes_from(tmp_path) -> None:
    from orchestrator.environment import DatasetFacts
    from services.runtime.settings import Settings
    from tests.conftest import DEMO_DATA, REPO

    # A directory with its own valid.jsonl: every train.jsonl row trains.
    facts = DatasetFacts(Settings(service="orchestrator", home=tmp_path, allowed_roots=(REPO,)))
    info = facts(cpb.DatasetRef(path=str(DEMO_DATA)))
    assert (info.rows, info.valid_rows) == (48, 16)
    sized = env(135_000_000, 30, 300, 60_000, 24)
    own = Environment(
        sized.model_info, lambda ref: DatasetInfo(300, 60_000, 30), sized.memory_bytes
    )
    s = spec({"kind": "STAGE_KIND_SFT", "sft": {"loop": {"batch_size": 4}}}, auto_configure=True)
    auto = stage(resolve(s, ALL, own), "sft")
    assert int(auto["spec"]["loop"]["max_steps"]) == 225  # ceil(300 * 3 / 4)
    assert auto["auto_configure"]["why"]["loop.max_steps"] == (
        "3 epoch(s) of 300 training rows (valid.jsonl's 30 rows held out), 4 a step"
    )
    # A lone file: 10% of it is held out for validation, the rest trains.
    auto = stage(resolve(s, ALL, sized), "sft")
    assert int(auto["spec"]["loop"]["max_steps"]) == 203  # ceil(270 * 3 / 4)
    assert auto["auto_configure"]["why"]["loop.max_steps"] == (
        "3 epoch(s) of 270 training rows (10% of 300 held out), 4 a step"
    )
