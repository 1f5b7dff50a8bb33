"""The RLHF service's rollout methods, which train on their own samples: PPO and GRPO, with
their sampling, rollout batch and reward source sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from services.runtime.errors import Violations
from services.schema.base import DictConfig, field_path, setting, sub
from services.schema.common import (
    DatasetSettings,
    ModelSettings,
    RemoteSettings,
    ResourcesSettings,
)
from services.schema.preference import _Trained

__all__ = [
    "GRPO_LOSSES",
    "REWARD_FUNCTIONS",
    "REWARD_SCALES",
    "GRPOConfig",
    "PPOConfig",
    "RewardSourceSettings",
    "RolloutSampling",
    "RolloutSettings",
    "check_data_parallel",
    "reward_function_problem",
]

GRPO_LOSSES = ("dapo", "grpo", "bnpo", "dr_grpo")
REWARD_SCALES = ("group", "batch", "none")
REWARD_FUNCTIONS = ("token_count:<token>", "length", "contains:<text>")


def reward_function_problem(spec: str) -> str | None:
    """Why ``spec`` is not a built-in reward function (syntax only), or None."""
    name, _, arg = spec.partition(":")
    if (name == "length" and not arg) or (name in ("token_count", "contains") and arg):
        return None
    return f"unknown reward function {spec!r}; expected one of {', '.join(REWARD_FUNCTIONS)}"


def check_data_parallel(
    v: Violations, resources: ResourcesSettings, p: str, sizes: dict[str, int]
) -> None:
    """Global batch sizes that every rank must hold an equal share of."""
    n = resources.num_processes
    for name, size in sizes.items():
        v.check(
            n <= 1 or size % n == 0,
            f"{p}{name}",
            f"{size} must be divisible by resources.num_processes ({n}): each process "
            "takes an equal share",
        )


def check_prompt_format(v: Violations, dataset: DatasetSettings, p: str) -> None:
    v.check(
        dataset.format in ("", "prompt"),
        f"{p}dataset.format",
        "rollouts need prompt rows ({'prompt': ...})",
    )


@dataclass(frozen=True)
class RolloutSampling(DictConfig):
    """Mirrors SamplingParams. Rollouts must sample, so temperature 0 ("unset") means 1.0."""

    temperature: float = setting(1.0, zero=True, gt=0, le=10)
    top_p: float = setting(0.0, ge=0, le=1, doc="0 = off")
    top_k: int = setting(0, ge=0, doc="0 = off")
    max_tokens: int = setting(128, zero=True, ge=1, le=4096, doc="tokens per completion")
    stop: tuple[str, ...] = ()
    seed: int | None = setting(None, doc="unset: the loop's seed")
    repetition_penalty: float = setting(
        0.0, choices=(0.0, 1.0), doc="not supported: it would bias the policy's log-probs"
    )

    def check(self, v: Violations, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        v.check(all(self.stop), f"{p}stop", "stop strings must be non-empty")


@dataclass(frozen=True)
class RolloutSettings(DictConfig):
    """Mirrors RolloutConfig."""

    batch_size: int = setting(8, zero=True, ge=1, le=4096, doc="prompts per rollout batch")
    sampling: RolloutSampling = dataclasses.field(default_factory=RolloutSampling)
    endpoint: str = setting("", doc='shorthand for remote {kind: "grpc", address: …}')
    remote: RemoteSettings = sub(RemoteSettings)
    sync_every: int = setting(1, zero=True, ge=1, le=100000, doc="remote: steps per policy version")
    max_staleness: int = setting(0, ge=0, le=100000, doc="remote: most steps a rollout may lag")

    @property
    def backend(self) -> RemoteSettings:
        """Where rollouts are sampled: ``remote`` (``enabled``) or here."""
        return RemoteSettings.from_endpoint(self.endpoint, self.remote).resolve()

    def check(self, v: Violations, prefix: str) -> None:
        v.check(
            not (self.endpoint and self.remote.address),
            field_path(prefix, "endpoint"),
            "give endpoint or remote.address, not both",
        )
        if self.endpoint:
            self.backend.check(v, field_path(prefix, "endpoint"))
        v.check(
            self.max_staleness >= self.sync_every - 1,
            field_path(prefix, "max_staleness"),
            f"must be at least sync_every - 1 ({self.sync_every - 1}): a policy version "
            "serves that many steps after the one it was written at",
        )


@dataclass(frozen=True)
class RewardSourceSettings(DictConfig):
    """Mirrors RewardSource: exactly one of a reward checkpoint or a built-in function."""

    reward_model: ModelSettings | None = None
    reward_function: str = setting("", doc="built-in: " + ", ".join(REWARD_FUNCTIONS))

    def check(self, v: Violations, prefix: str) -> None:
        """Every problem, the absence of both sources included (a trainer's config calls
        this: a spec without ``reward`` never reaches the nested validation)."""
        has_model = self.reward_model is not None and bool(self.reward_model.model)
        if not has_model and not self.reward_function:
            v.add(
                prefix,
                "give a reward model (reward.reward_model) or a reward function "
                "(reward.reward_function: " + ", ".join(REWARD_FUNCTIONS) + ")",
            )
        elif has_model and self.reward_function:
            v.add(prefix, "give a reward model or a reward function, not both")
        elif self.reward_function:
            problem = reward_function_problem(self.reward_function)
            if problem:
                v.add(f"{prefix}.reward_function", problem)
        else:
            from services.rlhf.trainers import heads  # reads the checkpoint's head (MLX)

            path = Path(self.reward_model.model)  # type: ignore[union-attr]
            if not path.exists():
                v.add(f"{prefix}.reward_model.model", f"not found: {path}")
            elif heads.head_metadata(path) is None:
                v.add(
                    f"{prefix}.reward_model.model",
                    f"{path} is not a reward checkpoint: it has no value head "
                    f"({heads.HEAD_FILE}); train one with StartRewardModel",
                )


@dataclass(frozen=True)
class _Rollouts(_Trained):
    policy: ModelSettings = sub(ModelSettings)
    reference: ModelSettings | None = None
    reward: RewardSourceSettings = sub(RewardSourceSettings)
    rollout: RolloutSettings = sub(RolloutSettings)

    def resolve(self):  # type: ignore[no-untyped-def]
        ref = self.reference if self.reference is not None and self.reference.model else None
        return dataclasses.replace(super().resolve(), reference=ref)

    def check(self, v: Violations, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        v.check(bool(self.policy.model), f"{p}policy.model", "is required")
        self.reward.check(v, f"{p}reward")
        check_prompt_format(v, self.dataset, p)
        v.check(
            not self.rollout.backend.enabled or self.resources.num_processes <= 1,
            f"{p}rollout.remote",
            "remote rollouts run with one training process (resources.num_processes 1)",
        )


@dataclass(frozen=True)
class PPOConfig(_Rollouts):
    """Mirrors PPOSpec: the clipped policy and value losses, GAE, an adaptive KL controller
    (TRL's experimental PPOTrainer and Ziegler et al. 2019)."""

    ppo_epochs: int = setting(4, zero=True, ge=1, le=100, doc="passes over each rollout batch")
    minibatch_size: int = setting(4, zero=True, ge=1, doc="rollouts per PPO update")
    gamma: float = setting(1.0, zero=True, gt=0, le=1)
    lam: float = setting(0.95, zero=True, ge=0, le=1, doc="GAE lambda")
    clip_range: float = setting(0.2, zero=True, gt=0)
    clip_range_value: float = setting(0.2, zero=True, gt=0)
    vf_coef: float = setting(0.1, zero=True, ge=0)
    init_kl_coef: float = setting(0.2, zero=True, ge=0)
    adaptive_kl: bool = setting(False, doc="Ziegler et al.'s proportional KL controller")
    kl_target: float = setting(6.0, zero=True, gt=0)
    kl_horizon: float = setting(10000.0, zero=True, gt=0)
    whiten_advantages: bool | None = setting(None, doc="unset: true")

    KIND = "ppo"

    def resolve(self) -> PPOConfig:
        out = super().resolve()
        whiten = True if out.whiten_advantages is None else out.whiten_advantages
        return dataclasses.replace(out, whiten_advantages=whiten)

    def check(self, v: Violations, prefix: str) -> None:
        super().check(v, prefix)
        p = f"{prefix}." if prefix else ""
        v.check(
            self.minibatch_size <= self.rollout.batch_size,
            f"{p}minibatch_size",
            f"{self.minibatch_size} is larger than the rollout batch "
            f"({self.rollout.batch_size} prompts)",
        )
        check_data_parallel(
            v,
            self.resources,
            p,
            {"rollout.batch_size": self.rollout.batch_size, "minibatch_size": self.minibatch_size},
        )


@dataclass(frozen=True)
class GRPOConfig(_Rollouts):
    """Mirrors GRPOSpec; defaults follow TRL 1.16's GRPOConfig."""

    group_size: int = setting(8, zero=True, ge=2, le=256, doc="TRL's num_generations")
    beta: float = setting(0.0, ge=0, doc="KL coefficient; TRL's default 0: no reference")
    clip_range: float = setting(0.2, zero=True, gt=0, doc="TRL's epsilon")
    loss_type: str = setting("dapo", zero=True, choices=GRPO_LOSSES)
    scale_rewards: str = setting("group", zero=True, choices=REWARD_SCALES)
    num_iterations: int = setting(1, zero=True, ge=1, le=100, doc="TRL's num_iterations")

    KIND = "grpo"

    def check(self, v: Violations, prefix: str) -> None:
        super().check(v, prefix)
        check_data_parallel(
            v,
            self.resources,
            f"{prefix}." if prefix else "",
            {
                "rollout.batch_size": self.rollout.batch_size,
                "loop.batch_size": self.loop.batch_size,
            },
        )
