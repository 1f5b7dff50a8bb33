"""The distillation service's config: teachers, divergence, temperature schedule, feature
matching, on-policy samples, the teacher cache and building the student from a teacher.

Mirrors DistillationSpec. Rules that read files (layer ranges, tokenizers, routing of every
row) are the distillation service's (services.distillation.validate.check_files).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from services.runtime.errors import Violations
from services.schema.base import DictConfig, field_path, setting, sub
from services.schema.common import (
    FINETUNE_METHODS,
    DatasetSettings,
    LoopSettings,
    LoraSettings,
    ModelSettings,
    OptimizerSettings,
    RemoteSettings,
    ResourcesSettings,
    method_name,
)

__all__ = [
    "DIVERGENCES",
    "FEATURE_LOSSES",
    "TEMPERATURE_MODES",
    "DistillSettings",
    "FeatureSettings",
    "LayerPair",
    "OnPolicySettings",
    "StudentInitSettings",
    "TeacherCacheSettings",
    "TeacherSettings",
    "TemperatureSettings",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "total_variation")
TEMPERATURE_MODES = ("fixed", "annealed", "adaptive")
FEATURE_LOSSES = ("mse", "cosine")


def _enum(raw: str, prefix: str, default: str) -> str:
    s = raw.strip().lower().removeprefix(prefix)
    return default if s in ("", "unspecified") else s


@dataclass(frozen=True)
class TeacherSettings(DictConfig):
    """Mirrors Teacher."""

    model: ModelSettings = sub(ModelSettings)
    weight: float = setting(1.0, zero=True, ge=0, doc="mixture weight (normalised)")
    route_value: str = setting("", doc="rows whose route_field equals this go to it")
    quantize_bits: int = setting(0, choices=(0, 4, 8), doc="quantize the teacher on load")
    endpoint: str = setting("", doc='shorthand for remote {kind: "grpc", address: …}')
    remote: RemoteSettings = sub(RemoteSettings)

    @property
    def backend(self) -> RemoteSettings:
        """Where the teacher runs: ``remote`` (``enabled``) or here."""
        return RemoteSettings.from_endpoint(self.endpoint, self.remote).resolve()

    def check(self, v: Violations, prefix: str) -> None:
        v.check(
            not (self.endpoint and self.remote.address),
            field_path(prefix, "endpoint"),
            "give endpoint or remote.address, not both",
        )
        if self.endpoint:
            self.backend.check(v, field_path(prefix, "endpoint"))
        b = self.backend
        if not b.enabled:
            v.check(bool(self.model.model), field_path(prefix, "model.model"), "is required")
            return
        v.check(
            not self.quantize_bits,
            field_path(prefix, "quantize_bits"),
            "applies to local teachers only; a remote server loads its model as it is",
        )


@dataclass(frozen=True)
class TemperatureSettings(DictConfig):
    """Mirrors TemperatureConfig. fixed: T = initial; annealed: cosine initial -> final;
    adaptive: per token in [min, final] from the teacher's normalised entropy."""

    mode: str = setting("fixed", zero=True, choices=TEMPERATURE_MODES)
    initial: float = setting(2.0, zero=True, gt=0)
    final: float = setting(0.0, ge=0, doc="0 = 1.0 (annealed) or initial (adaptive)")
    min: float = setting(0.0, ge=0, doc="adaptive lower bound; 0 = min(1, final)")

    def resolve(self) -> TemperatureSettings:
        return dataclasses.replace(self, mode=_enum(self.mode, "temperature_mode_", "fixed"))

    def check(self, v: Violations, prefix: str) -> None:
        if self.mode == "adaptive":
            high = self.final or self.initial
            low = self.min or min(1.0, high)
            v.check(
                low <= high,
                field_path(prefix, "min"),
                f"must be <= the upper bound spec.temperature.final ({high})",
            )


@dataclass(frozen=True)
class LayerPair(DictConfig):
    """Mirrors LayerPair."""

    student_layer: int = setting(0, ge=0)
    teacher_layer: int = setting(0, ge=0)


@dataclass(frozen=True)
class FeatureSettings(DictConfig):
    """Mirrors FeatureDistillation (hidden-state matching through learned projections)."""

    enabled: bool = False
    layer_map: tuple[LayerPair, ...] = setting((), doc="() = the uniform layer map")
    uniform: bool = setting(False, doc="deprecated, ignored")
    loss: str = setting("mse", zero=True, choices=FEATURE_LOSSES)
    weight: float = setting(1.0, zero=True, ge=0)

    def resolve(self) -> FeatureSettings:
        return dataclasses.replace(self, loss=_enum(self.loss, "feature_loss_", "mse"))


@dataclass(frozen=True)
class OnPolicySettings(DictConfig):
    """Mirrors OnPolicyConfig (TRL GKD's lmbda, max_new_tokens, temperature)."""

    fraction: float = setting(0.0, ge=0, le=1, doc="share of batches sampled from the student")
    max_new_tokens: int = setting(128, zero=True, ge=1, le=4096)
    temperature: float = setting(1.0, zero=True, gt=0, le=10)


@dataclass(frozen=True)
class TeacherCacheSettings(DictConfig):
    """Mirrors TeacherCacheConfig: the teachers' top-k log-probs computed once."""

    enabled: bool = False
    top_k: int = setting(32, zero=True, ge=1)


@dataclass(frozen=True)
class StudentInitSettings(DictConfig):
    """Mirrors StudentInit: build the student from teachers[0]'s layers."""

    keep_teacher_layers: tuple[int, ...] = setting((), ge=0)
    num_layers: int = setting(0, ge=0)

    @property
    def enabled(self) -> bool:
        return bool(self.keep_teacher_layers) or self.num_layers > 0

    def check(self, v: Violations, prefix: str) -> None:
        v.check(
            not (self.keep_teacher_layers and self.num_layers),
            prefix or "student_init",
            "give keep_teacher_layers or num_layers, not both",
        )
        v.check(
            len(set(self.keep_teacher_layers)) == len(self.keep_teacher_layers),
            field_path(prefix, "keep_teacher_layers"),
            "has duplicates",
        )


@dataclass(frozen=True)
class DistillSettings(DictConfig):
    """Mirrors DistillationSpec."""

    student: ModelSettings = sub(ModelSettings)
    teachers: tuple[TeacherSettings, ...] = ()
    route_field: str = setting("", doc="row field that picks the teacher (routing)")
    dataset: DatasetSettings = sub(DatasetSettings)
    method: str = setting("lora", zero=True, choices=FINETUNE_METHODS)
    lora: LoraSettings = sub(LoraSettings)
    optimizer: OptimizerSettings = sub(OptimizerSettings)
    loop: LoopSettings = sub(LoopSettings)
    resources: ResourcesSettings = sub(ResourcesSettings)
    divergence: str = setting("forward_kl", zero=True, choices=DIVERGENCES)
    alpha: float | None = setting(None, ge=0, le=1, doc="KD weight vs CE; unset: 0.5")
    jsd_beta: float = setting(0.5, zero=True, gt=0, lt=1, doc="JSD's mixture weight")
    temperature: TemperatureSettings = sub(TemperatureSettings)
    features: FeatureSettings = sub(FeatureSettings)
    on_policy: OnPolicySettings = sub(OnPolicySettings)
    teacher_cache: TeacherCacheSettings = sub(TeacherCacheSettings)
    student_init: StudentInitSettings = sub(StudentInitSettings)
    output_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    chunk_size: int = setting(128, zero=True, ge=1, doc="not in the proto: loss chunk")

    def resolve(self) -> DistillSettings:
        return dataclasses.replace(
            self,
            method=method_name(self.method),
            divergence=_enum(self.divergence, "divergence_", "forward_kl"),
            alpha=0.5 if self.alpha is None else self.alpha,
        )

    def check(self, v: Violations, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if not self.teachers:
            v.add(f"{p}teachers", "at least one teacher is required")
        elif not sum(max(t.weight, 0.0) for t in self.teachers) > 0:
            v.add(f"{p}teachers", "teacher weights must sum to a positive number")
        if self.route_field:
            seen: dict[str, int] = {}
            for i, t in enumerate(self.teachers):
                where = f"{p}teachers[{i}].route_value"
                if not t.route_value:
                    v.add(where, "is required when spec.route_field is set")
                elif t.route_value in seen:
                    v.add(where, f"duplicates teachers[{seen[t.route_value]}].route_value")
                else:
                    seen[t.route_value] = i
        v.check(
            self.student_init.enabled or bool(self.student.model),
            f"{p}student.model",
            "is required (or set spec.student_init to build one from teachers[0])",
        )
        v.check(bool(self.dataset.path), f"{p}dataset.path", "is required")
        _remote_rules(self, v, p)
        v.check(
            not (self.teacher_cache.enabled and self.features.enabled),
            f"{p}teacher_cache.enabled",
            "cannot be combined with spec.features: feature matching needs the teachers' "
            "hidden states every step",
        )


def _remote_rules(s: DistillSettings, v: Violations, p: str) -> None:
    """A remote teacher returns top-k log-probs only: no hidden states (features), no
    layers to copy (student_init), no full distribution to mix with another teacher."""
    remote = [i for i, t in enumerate(s.teachers) if t.backend.enabled]
    if not remote:
        return
    v.check(
        not (s.features.enabled and 0 in remote),
        f"{p}features.enabled",
        "feature matching needs teachers[0]'s hidden states; a remote teacher returns "
        "top-k log-probabilities only",
    )
    v.check(
        not (s.student_init.enabled and 0 in remote),
        f"{p}student_init",
        "builds the student from teachers[0]'s layers, which must be a local model",
    )
    v.check(
        len(s.teachers) == 1 or bool(s.route_field),
        f"{p}teachers[{remote[0]}].remote",
        "a remote teacher cannot be part of a mixture (its top-k cannot be mixed exactly): "
        "use one teacher, or route rows to teachers with spec.route_field",
    )
