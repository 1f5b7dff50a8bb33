"""The RLHF service's preference methods: reward model, DPO (and IPO, hinge, robust), KTO and
ORPO. DPO and KTO share one base (policy, reference, cached reference log-probs)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from services import registry
from services.runtime.errors import Violations
from services.schema.base import DictConfig, field_path, setting, sub
from services.schema.common import (
    FINETUNE_METHODS,
    DatasetSettings,
    LoopSettings,
    LoraSettings,
    ModelSettings,
    OptimizerSettings,
    ResourcesSettings,
    default_lr,
    method_name,
)

__all__ = [
    "DPO_LOSSES",
    "KTO_FORMATS",
    "KTO_LOSSES",
    "DPOConfig",
    "KTOConfig",
    "ORPOConfig",
    "RewardModelConfig",
]

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
KTO_LOSSES = ("kto", "apo_zero_unpaired")
KTO_FORMATS = ("unpaired_preference", "preference")
_PAIRS = "preference rows (prompt, chosen, rejected)"


@dataclass(frozen=True)
class _Trained(DictConfig):
    """What every RLHF method trains and how (its model field is the subclass's)."""

    dataset: DatasetSettings = sub(DatasetSettings)
    method: str = setting("lora", zero=True, choices=FINETUNE_METHODS)
    lora: LoraSettings = sub(LoraSettings)
    optimizer: OptimizerSettings = sub(OptimizerSettings)
    loop: LoopSettings = sub(LoopSettings)
    resources: ResourcesSettings = sub(ResourcesSettings)
    output_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    KIND: ClassVar[str] = ""  # the registry's method name (its default learning rates)
    TITLE: ClassVar[str] = ""  # as messages name it
    FORMATS: ClassVar[tuple[str, ...]] = ("preference",)
    FORMAT_HINT: ClassVar[str] = _PAIRS

    @classmethod
    def prepare(cls, data: dict) -> dict:
        return default_lr(data, *registry.get(cls.KIND).lr)

    def resolve(self):  # type: ignore[no-untyped-def]
        return dataclasses.replace(self, method=method_name(self.method))

    def check(self, v: Violations, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        v.check(
            self.dataset.format in ("", *self.FORMATS),
            f"{p}dataset.format",
            f"{self.TITLE} trains on {self.FORMAT_HINT}",
        )


@dataclass(frozen=True)
class RewardModelConfig(_Trained):
    """Mirrors RewardModelSpec. TRL 1.16's RewardConfig: lr 1e-4 whatever is trained."""

    model: ModelSettings = sub(ModelSettings)
    use_margin: bool = setting(False, doc="subtract each row's margin (Llama 2's loss)")
    center_rewards_coef: float = setting(0.0, ge=0, doc="TRL's center_rewards_coefficient")

    KIND = "reward_model"
    TITLE = "a reward model"

    def check(self, v: Violations, prefix: str) -> None:
        v.check(bool(self.model.model), field_path(prefix, "model.model"), "is required")
        super().check(v, prefix)


@dataclass(frozen=True)
class _Referenced(_Trained):
    """A policy trained against a frozen reference (DPO, KTO)."""

    policy: ModelSettings = sub(ModelSettings)
    reference: ModelSettings | None = None
    beta: float = setting(0.1, gt=0, doc="temperature of the implicit reward")
    precompute_reference: bool | None = setting(
        None, doc="score the reference once before training (unset: true)"
    )

    def resolve(self):  # type: ignore[no-untyped-def]
        ref = self.reference if self.reference is not None and self.reference.model else None
        pre = True if self.precompute_reference is None else self.precompute_reference
        return dataclasses.replace(super().resolve(), reference=ref, precompute_reference=pre)

    def check(self, v: Violations, prefix: str) -> None:
        v.check(bool(self.policy.model), field_path(prefix, "policy.model"), "is required")
        super().check(v, prefix)


@dataclass(frozen=True)
class DPOConfig(_Referenced):
    """Mirrors DPOSpec. Defaults follow TRL 1.16's DPOConfig."""

    loss: str = setting("sigmoid", zero=True, choices=DPO_LOSSES)
    label_smoothing: float = setting(0.0, ge=0, lt=0.5, doc="robust loss only")

    KIND = "dpo"
    TITLE = "DPO"

    def resolve(self) -> DPOConfig:
        out = super().resolve()
        return dataclasses.replace(out, loss=out.loss.lower().removeprefix("dpo_loss_"))

    def check(self, v: Violations, prefix: str) -> None:
        super().check(v, prefix)
        if self.label_smoothing > 0 and self.loss != "robust":
            # TRL 1.16's sigmoid loss ignores label_smoothing (it no longer is cDPO).
            v.add(
                field_path(prefix, "label_smoothing"),
                f"applies to the robust loss only, not {self.loss}",
            )


@dataclass(frozen=True)
class KTOConfig(_Referenced):
    """Mirrors KTOSpec. Defaults follow TRL 1.16's KTOConfig."""

    loss_type: str = setting("kto", zero=True, choices=KTO_LOSSES)
    desirable_weight: float = setting(1.0, gt=0, doc="lambda_D")
    undesirable_weight: float = setting(1.0, gt=0, doc="lambda_U")

    KIND = "kto"
    TITLE = "KTO"
    FORMATS = KTO_FORMATS
    FORMAT_HINT = "unpaired rows (prompt, completion, label) or " + _PAIRS

    def resolve(self) -> KTOConfig:
        out = super().resolve()
        return dataclasses.replace(out, loss_type=out.loss_type.lower().removeprefix("kto_loss_"))

    def check(self, v: Violations, prefix: str) -> None:
        super().check(v, prefix)
        if self.loss_type == "kto" and self.loop.micro_batch_size < 2:
            # As TRL: with one row its own completion is its "mismatched" one, z = r.
            v.add(
                field_path(prefix, "loop.batch_size"),
                "the KL estimate needs >= 2 rows per micro-batch "
                "(batch_size / grad_accumulation_steps)",
            )


@dataclass(frozen=True)
class ORPOConfig(_Trained):
    """Mirrors ORPOSpec: SFT plus an odds-ratio term, no reference (TRL 1.16's ORPOConfig)."""

    policy: ModelSettings = sub(ModelSettings)
    beta: float = setting(0.1, gt=0, doc="weight of the odds-ratio term (lambda)")

    KIND = "orpo"
    TITLE = "ORPO"

    def check(self, v: Violations, prefix: str) -> None:
        v.check(bool(self.policy.model), field_path(prefix, "policy.model"), "is required")
        super().check(v, prefix)
