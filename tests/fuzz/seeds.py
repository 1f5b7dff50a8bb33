"""Valid requests for each RPC: the fuzz suite mutates a few fields of these, so examples
reach the deep checks (file resolution, the trainers' own config rules, the scheduler)
instead of being refused at the first field."""

from __future__ import annotations

from google.protobuf.message import Message

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import distillation_pb2 as dpb
from mlx_unified.v1 import generation_pb2 as gpb
from mlx_unified.v1 import orchestrator_pb2 as opb
from mlx_unified.v1 import registry_pb2 as mpb
from mlx_unified.v1 import rlhf_pb2 as rpb
from mlx_unified.v1 import training_pb2 as tpb
from tests.fuzz.strategies import Pools


def _loop() -> cpb.LoopConfig:
    return cpb.LoopConfig(batch_size=2, max_steps=2, max_seq_length=64, steps_per_eval=-1)


def sft(p: Pools) -> tpb.SFTSpec:
    n = p.named
    return tpb.SFTSpec(
        model=cpb.ModelRef(model=n["model"]),
        dataset=cpb.DatasetRef(path=n["chat"]),
        lora=cpb.LoraConfig(rank=4, num_layers=-1),
        optimizer=cpb.OptimizerConfig(learning_rate=1e-3),
        loop=_loop(),
    )


def pipeline(p: Pools) -> opb.PipelineSpec:
    n = p.named
    dpo = rpb.DPOSpec(loop=_loop(), dataset=cpb.DatasetRef(path=n["prefs"]))
    return opb.PipelineSpec(
        name="fuzz",
        base_model=cpb.ModelRef(model=n["model"]),
        dataset=cpb.DatasetRef(path=n["chat"]),
        stages=[opb.Stage(name="sft", sft=sft(p)), opb.Stage(name="dpo", dpo=dpo)],
    )


def preference_pipeline(p: Pools) -> opb.PipelineSpec:
    """SFT then KTO and ORPO stages (each with its own dataset)."""
    n = p.named
    kto = rpb.KTOSpec(loop=_loop(), dataset=cpb.DatasetRef(path=n["unpaired"]))
    orpo = rpb.ORPOSpec(loop=_loop(), dataset=cpb.DatasetRef(path=n["prefs"]))
    return opb.PipelineSpec(
        name="fuzz-prefs",
        base_model=cpb.ModelRef(model=n["model"]),
        dataset=cpb.DatasetRef(path=n["chat"]),
        stages=[
            opb.Stage(name="sft", sft=sft(p)),
            opb.Stage(name="kto", kto=kto),
            opb.Stage(name="orpo", orpo=orpo),
        ],
    )


def for_method(name: str, p: Pools) -> list[Message]:
    """Valid requests of ``Service.Method`` (empty: the RPC is fuzzed from scratch only)."""
    n, ids = p.named, p.ids
    model = cpb.ModelRef(model=n["model"])
    prefs = cpb.DatasetRef(path=n["prefs"])
    prompts = cpb.DatasetRef(path=n["prompts"])
    fn = rpb.RewardSource(reward_function="length")
    rollout = rpb.RolloutConfig(batch_size=2, sampling=gpb.SamplingParams(max_tokens=4))
    table: dict[str, list[Message]] = {
        "TrainingService.StartSFT": [tpb.StartSFTRequest(spec=sft(p))],
        "TrainingService.StartExport": [
            tpb.StartExportRequest(
                spec=tpb.ExportSpec(
                    model=model,
                    mode=tpb.EXPORT_MODE_QUANTIZE,
                    quantization=cpb.QuantizationConfig(bits=4, group_size=32),
                )
            )
        ],
        "JobService.GetJob": [cpb.GetJobRequest(job_id=i) for i in ids[:3]],
        "JobService.WatchJob": [cpb.WatchJobRequest(job_id=i) for i in ids[:3]],
        "JobService.CancelJob": [cpb.CancelJobRequest(job_id=i) for i in ids[:3]],
        "JobService.ListJobs": [cpb.ListJobsRequest(page_size=2)],
        "GenerationService.Generate": [
            gpb.GenerateRequest(
                model=model, prompt="hello", sampling=gpb.SamplingParams(max_tokens=4)
            ),
            gpb.GenerateRequest(
                model=model,
                chat=gpb.ChatConversation(messages=[gpb.ChatMessage(role="user", content="hi")]),
                sampling=gpb.SamplingParams(max_tokens=2, seed=3),
            ),
        ],
        "GenerationService.ScoreCompletions": [
            gpb.ScoreCompletionsRequest(
                model=model, items=[gpb.PromptCompletion(prompt="a b", completion=" c")]
            )
        ],
        "GenerationService.TopLogprobs": [
            gpb.TopLogprobsRequest(
                model=model, sequences=[gpb.TokenSequence(token_ids=[5, 9, 31])], top_k=4
            )
        ],
        "GenerationService.DescribeModel": [gpb.DescribeModelRequest(model=model)],
        "GenerationService.SampleTokens": [
            gpb.SampleTokensRequest(
                model=model,
                prompts=[gpb.TokenSequence(token_ids=[1, 2, 3])],
                n=2,
                sampling=gpb.SamplingParams(max_tokens=2),
                seed=5,
                policy_version=1,
            )
        ],
        "RLHFService.StartRewardModel": [
            rpb.StartRewardModelRequest(
                spec=rpb.RewardModelSpec(model=model, dataset=prefs, loop=_loop())
            )
        ],
        "RLHFService.StartDPO": [
            rpb.StartDPORequest(spec=rpb.DPOSpec(policy=model, dataset=prefs, loop=_loop()))
        ],
        "RLHFService.StartPPO": [
            rpb.StartPPORequest(
                spec=rpb.PPOSpec(
                    policy=model,
                    dataset=prompts,
                    reward=rpb.RewardSource(reward_model=cpb.ModelRef(model=n["reward_model"])),
                    rollout=rollout,
                    loop=_loop(),
                    minibatch_size=2,
                )
            ),
            rpb.StartPPORequest(
                spec=rpb.PPOSpec(
                    policy=model,
                    dataset=prompts,
                    reward=fn,
                    rollout=rollout,
                    loop=_loop(),
                    minibatch_size=2,
                )
            ),
        ],
        "RLHFService.StartGRPO": [
            rpb.StartGRPORequest(
                spec=rpb.GRPOSpec(
                    policy=model, dataset=prompts, reward=fn, rollout=rollout, loop=_loop()
                )
            )
        ],
        "RLHFService.StartKTO": [
            rpb.StartKTORequest(
                spec=rpb.KTOSpec(
                    policy=model, dataset=cpb.DatasetRef(path=n["unpaired"]), loop=_loop()
                )
            )
        ],
        "RLHFService.StartORPO": [
            rpb.StartORPORequest(spec=rpb.ORPOSpec(policy=model, dataset=prefs, loop=_loop()))
        ],
        "RLHFService.Score": [
            rpb.ScoreRequest(
                reward_model=cpb.ModelRef(model=n["reward_model"]),
                items=[gpb.PromptCompletion(prompt="a", completion="b")],
            )
        ],
        "DistillationService.StartDistillation": [
            dpb.StartDistillationRequest(
                spec=dpb.DistillationSpec(
                    teachers=[dpb.Teacher(model=model)],
                    student_init=dpb.StudentInit(num_layers=1),
                    dataset=cpb.DatasetRef(path=n["chat"]),
                    loop=_loop(),
                )
            )
        ],
        "OrchestratorService.CreatePipeline": [
            opb.CreatePipelineRequest(spec=pipeline(p)),
            opb.CreatePipelineRequest(spec=preference_pipeline(p)),
        ],
        "OrchestratorService.CreatePipelineFromTemplate": [
            opb.CreatePipelineFromTemplateRequest(
                template="chatbot", base_model=model, dataset=cpb.DatasetRef(path=n["chat"])
            )
        ],
        "OrchestratorService.StartTraining": [
            opb.StartTrainingRequest(stage=opb.Stage(name="s", sft=sft(p)))
        ],
        "OrchestratorService.GetPipeline": [opb.GetPipelineRequest(pipeline_id=i) for i in ids],
        "OrchestratorService.RunPipeline": [opb.RunPipelineRequest(pipeline_id=i) for i in ids],
        "OrchestratorService.GetRun": [opb.GetRunRequest(run_id=i) for i in ids],
        "OrchestratorService.WatchRun": [opb.WatchRunRequest(run_id=i) for i in ids],
        "OrchestratorService.CancelRun": [opb.CancelRunRequest(run_id=i) for i in ids],
        "OrchestratorService.ListRuns": [opb.ListRunsRequest(page_size=2)],
        "OrchestratorService.ListPipelines": [opb.ListPipelinesRequest(page_size=2)],
        **_registry_seeds(p),
    }
    return table.get(name, [])


def _registry_seeds(p: Pools) -> dict[str, list[Message]]:
    n, ids, name = p.named, p.ids, "fuzz-model"
    ckpt = cpb.Checkpoint(path=n["reward_model"])  # a checkpoint with its manifest
    return {
        "ModelRegistryService.RegisterModel": [
            mpb.RegisterModelRequest(name=name, checkpoint=ckpt),
            *(mpb.RegisterModelRequest(name=name, run=mpb.RunResultSource(run_id=i)) for i in ids),
        ],
        "ModelRegistryService.ListModels": [mpb.ListModelsRequest(page_size=2)],
        "ModelRegistryService.GetModel": [mpb.GetModelRequest(name=name)],
        "ModelRegistryService.GetModelVersion": [
            mpb.GetModelVersionRequest(name=name, version=1),
            mpb.GetModelVersionRequest(name=name, alias="production"),
        ],
        "ModelRegistryService.SetAlias": [
            mpb.SetAliasRequest(name=name, alias="production", version=1)
        ],
        "ModelRegistryService.DeleteAlias": [mpb.DeleteAliasRequest(name=name, alias="production")],
        "ModelRegistryService.DeleteModelVersion": [
            mpb.DeleteModelVersionRequest(name=name, version=1)
        ],
    }
