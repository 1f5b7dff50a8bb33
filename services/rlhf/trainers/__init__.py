"""RLHF trainers, one module per method; each exposes ``run(config, ctx) -> CheckpointInfo``.

Dotted names for the job runner are in ``TRAINERS``. This module holds what the four share:
loading the policy with its fine-tuning method, loading the frozen reference, writing a
policy (plus an optional value/reward head) as an mlx-lm checkpoint directory, and, for the
rollout trainers (PPO, GRPO), their step strategy for the shared loop (services.runtime.steps:
the same reports, checkpoints, stop and exact resume as every other method).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services import registry
from services.runtime import checkpoints
from services.runtime.contract import CheckpointInfo, Report

# The tokenizer helpers live with the sampler; trainers import them from here.
from services.runtime.sampler import eos_ids as eos_ids
from services.runtime.sampler import pad_id as pad_id
from services.runtime.steps import Artifact, StepOutput, run_steps

TRAINERS = {m.name: m.trainer for m in registry.of_service("rlhf")}


@dataclass
class Policy:
    """A trainable LM: its method is applied; ``adapter_config`` is None for full training."""

    model: Any
    tokenizer: Any
    base: str
    adapter_config: dict | None
    source: Path | None
    model_config: dict

    @property
    def kind(self) -> str:
        return "full" if self.adapter_config is None else "adapter"


def _source_dir(model: str) -> Path | None:
    p = Path(model)
    if p.is_dir():
        return p
    try:  # a hub id: mlx-lm's local snapshot
        from mlx_lm.utils import _download

        return Path(_download(model))
    except Exception:  # noqa: BLE001 - no snapshot: tokenizer files come from the tokenizer
        return None


def load_policy(ref, method: str, lora, dtype: str, field: str = "spec.policy") -> Policy:
    """Load ``ref`` (ModelSettings) and make it trainable with ``method``.

    A starting adapter is continued by adapter methods and fused into the weights for full
    training, as SFT does."""
    from services.runtime import adapters, models

    base, init_adapter = ref.model, ref.adapter_path or None
    if method == "full" and init_adapter:
        model, tokenizer = models.load_model(base, init_adapter, dtype=dtype, field=field)
        adapters.fuse(model)
        init_adapter = None
    else:
        model, tokenizer = models.load_model(base, dtype=dtype, field=field)
    adapter_config = adapters.apply(model, method, lora, base_model=base, init_adapter=init_adapter)
    source = _source_dir(base)
    cfg = models.model_config(source) if source is not None else {}
    return Policy(model, tokenizer, base, adapter_config, source, cfg)


def load_reference(ref, policy_ref, dtype: str, field: str = "spec.reference"):
    """The frozen reference LM: ``ref`` when given, else the policy's *starting* checkpoint
    (its base plus its starting adapter, never the bare base behind an adapter)."""
    from services.runtime import models

    own = ref is not None and bool(ref.model)
    use = ref if own else policy_ref
    where = field if own else "spec.policy"
    model, _ = models.load_model(use.model, use.adapter_path or None, dtype=dtype, field=where)
    model.freeze()
    model.eval()
    return model, {"model": use.model, "adapter_path": use.adapter_path}


def write_policy(dst: Path, policy: Policy, head_kind: str | None = None) -> None:
    """The policy as an mlx-lm dir (adapter or full), plus ``value_head.safetensors`` when
    the model carries a head. The head never enters the LM's own weight files, so
    ``mlx_lm.load`` opens the directory as a plain LM."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import make_shards, save_config

    from services.rlhf.trainers import heads
    from services.runtime import adapters

    dst.mkdir(parents=True, exist_ok=True)
    lm = policy.model
    if policy.adapter_config is not None:
        weights = {k: v for k, v in adapters.adapter_weights(lm).items() if not heads.is_head(k)}
        mx.save_safetensors(str(dst / adapters.ADAPTER_WEIGHTS), weights)
        (dst / adapters.ADAPTER_CONFIG).write_text(json.dumps(policy.adapter_config, indent=2))
    else:
        weights = {k: v for k, v in tree_flatten(lm.parameters()) if not heads.is_head(k)}
        shards = make_shards(weights)
        n = len(shards)
        for i, shard in enumerate(shards, 1):
            name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            mx.save_safetensors(str(dst / name), shard, metadata={"format": "mlx"})
        save_config(dict(policy.model_config), dst / "config.json")
        policy.tokenizer.save_pretrained(str(dst))
        src = policy.source
        if src is not None and (src / "generation_config.json").is_file():
            shutil.copy(src / "generation_config.json", dst)
    if head_kind is not None:
        heads.save_head(lm, dst, head_kind)


class RLState:
    """The extra trainer state of an RL run: KL controller (PPO) and rollout RNG."""

    def __init__(self, rng, kl=None) -> None:
        self.rng, self.kl = rng, kl

    def state(self) -> dict:
        return {"rng": self.rng.state(), "kl": self.kl.state() if self.kl else None}

    def restore(self, state: dict) -> None:
        self.rng.restore(state["rng"])
        if self.kl is not None and state.get("kl"):
            self.kl.restore(state["kl"])


class RolloutStrategy:
    """One PPO / GRPO iteration as a step of the shared loop (services.runtime.steps).

    ``iteration(step, prompt_batch) -> (metrics, tokens)`` samples completions for the next
    rollout batch of ``prompts``, scores them and runs its updates; it returns that
    iteration's metrics (already reduced over ranks; each must stay finite) and the tokens
    it sampled over all ranks. Reports average the metrics over the iterations since the
    last report. ``on_start`` runs once after any restore, before the first iteration."""

    validates = False  # rollouts hold no prompts out
    report_at_checkpoints = True  # iterations are slow and few: report every saved one

    def __init__(
        self,
        iteration: Callable[[int, dict], tuple[dict[str, float], int]],
        prompts: Any,
        extra: RLState,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        self.iteration, self.data, self.extra, self.on_start = iteration, prompts, extra, on_start

    def start(self) -> None:
        self.prompts = iter(self.data)  # after any restore: at the saved prompt position
        if self.on_start is not None:
            self.on_start()

    def step(self, step: int) -> StepOutput:
        metrics, tokens = self.iteration(step, next(self.prompts))
        return StepOutput({**metrics, _TOKENS: float(tokens)}, watch=metrics)

    def summarize(self, window: dict, seconds: float, steps: int) -> tuple[dict, int]:
        metrics = {k: v / steps for k, v in window.items() if k != _TOKENS}
        return metrics, int(window.get(_TOKENS, 0))

    def validate(self) -> dict[str, float]:
        return {}


_TOKENS = "_tokens"


def train_rollouts(
    strategy: RolloutStrategy,
    ctx,
    policy: Policy,
    optimizer,
    cfg,
    total: int,
    resolved: dict,
    head_kind: str | None,
) -> CheckpointInfo:
    """Run ``strategy`` to ``total`` iterations with the shared loop (checkpoints hold the
    policy, its ``head_kind`` head and the trainer state) and publish the final policy.
    ``cfg`` is the trainer's config (its ``loop`` and ``optimizer`` sections)."""
    artifact = Artifact(
        kind=policy.kind,
        write=lambda dst: write_policy(dst, policy, head_kind=head_kind),
        base_model=policy.base,
        config=resolved,
    )
    done = run_steps(
        strategy,
        model=policy.model,
        optimizer=optimizer,
        loop=cfg.loop,
        opt=cfg.optimizer,
        ctx=ctx,
        artifact=artifact,
        total=total,
    )
    progress = done.progress
    metrics = {**progress.metrics, "steps": float(progress.step)}
    metrics["train_time_s"] = progress.train_time
    if not ctx.is_main or done.checkpoint is None:  # data-parallel ranks > 0: rank 0 publishes
        return CheckpointInfo(Path(ctx.output_dir) / checkpoints.FINAL, policy.kind, progress.step)
    final = checkpoints.publish(done.checkpoint.path, Path(ctx.output_dir), metrics)
    ctx.checkpoint_written(final)
    return final


def run_cli(run, argv: list[str], module: str) -> int:
    """``python -m <trainer module> CONFIG.json OUTPUT_DIR``: run a trainer outside a job,
    resuming from the newest checkpoint in OUTPUT_DIR, printing reports."""
    from services.runtime.contract import JobContext

    if len(argv) != 2:
        print(f"usage: python -m {module} CONFIG.json OUTPUT_DIR")
        return 2

    def report(r: Report) -> None:
        shown = {k: round(v, 4) for k, v in sorted(r.metrics.items())}
        print(f"step {r.step}/{r.total_steps} {shown}", flush=True)

    out = Path(argv[1])
    ctx = JobContext(job_id="local", output_dir=out, report=report, log=print)
    ctx.resume_from = checkpoints.latest(out)
    info = run(json.loads(Path(argv[0]).read_text()), ctx)
    print(f"final: {info.path} {info.metrics}")
    return 0
