"""Validation of a distillation config (the DistillationSpec as a plain dict), before a job
exists, and its resolution into the frozen settings the trainer runs with.

`validate(config)` collects every problem and raises one InvalidArgument whose violations name
the spec field ("spec.teachers[1].weight", "spec.features.layer_map[0].teacher_layer") or the
dataset row ("spec.dataset.path": "row 3: domain='law' matches no teacher's route_value").
Config dicts follow services.runtime.specs.to_dict: unset proto fields are absent, enums are
short lowercase names. The only I/O is reading the files the config names: config.json and
tokenizer.json of local models, and the dataset rows when routing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.distillation.trainers.losses import (
    DIVERGENCES,
    FEATURE_LOSSES,
    TEMPERATURE_MODES,
    Temperature,
)
from services.distillation.trainers.teachers import (
    TeacherSpec,
    check_tokenizers,
    route_rows,
    signature_from_dir,
)
from services.runtime.errors import InvalidArgument, Violations
from services.schema.common import (
    FINETUNE_METHODS,
    LoopSettings,
    LoraSettings,
    OptimizerSettings,
    ResourcesSettings,
)

METHODS = FINETUNE_METHODS
SECTIONS = {
    "loop": LoopSettings,
    "optimizer": OptimizerSettings,
    "lora": LoraSettings,
    "resources": ResourcesSettings,
}
KNOWN_KEYS = {
    "student",
    "teachers",
    "route_field",
    "dataset",
    "method",
    "lora",
    "optimizer",
    "loop",
    "resources",
    "divergence",
    "alpha",
    "jsd_beta",
    "temperature",
    "features",
    "on_policy",
    "teacher_cache",
    "student_init",
    "output_name",
    "labels",
    "chunk_size",  # not in the proto: positions per loss chunk (memory vs speed), default 128
}


def _enum(value: Any, prefix: str, default: str) -> str:
    s = str(value or "").strip().lower().removeprefix(prefix)
    return default if s in ("", "unspecified") else s


@dataclass(frozen=True)
class Features:
    enabled: bool = False
    pairs: tuple[tuple[int, int], ...] = ()  # explicit (student, teacher); () = uniform
    loss: str = "mse"
    weight: float = 1.0


@dataclass(frozen=True)
class OnPolicy:
    fraction: float = 0.0
    max_new_tokens: int = 128  # TRL GKDConfig.max_new_tokens
    temperature: float = 1.0


@dataclass(frozen=True)
class CacheSettings:
    enabled: bool = False
    top_k: int = 32


@dataclass(frozen=True)
class StudentInit:
    keep_teacher_layers: tuple[int, ...] = ()
    num_layers: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.keep_teacher_layers) or self.num_layers > 0


@dataclass(frozen=True)
class DistillConfig:
    teachers: tuple[TeacherSpec, ...]
    dataset: dict
    student: str = ""
    student_adapter: str = ""
    route_field: str = ""
    method: str = "lora"
    divergence: str = "forward_kl"
    alpha: float = 0.5
    jsd_beta: float = 0.5
    temperature: Temperature = Temperature()
    features: Features = Features()
    on_policy: OnPolicy = OnPolicy()
    cache: CacheSettings = CacheSettings()
    student_init: StudentInit = StudentInit()
    lora: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    loop: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)
    output_name: str = ""
    chunk_size: int = 128


def parse(config: dict) -> DistillConfig:
    """Resolve defaults and check ranges (no I/O). Raises InvalidArgument."""
    v = Violations()
    cfg = dict(config or {})
    for key in sorted(set(cfg) - KNOWN_KEYS):
        v.add(f"spec.{key}", "unknown field")

    raw_teachers = cfg.get("teachers") or []
    if not raw_teachers:
        v.add("spec.teachers", "at least one teacher is required")
    teachers = []
    for i, t in enumerate(raw_teachers):
        p = f"spec.teachers[{i}]"
        if not isinstance(t, dict):
            v.add(p, "must be an object")
            continue
        spec = TeacherSpec.from_dict(t)
        v.check(bool(spec.model), f"{p}.model.model", "is required")
        v.check(t.get("weight") is None or t["weight"] >= 0, f"{p}.weight", "must be >= 0")
        v.check(spec.quantize_bits in (0, 4, 8), f"{p}.quantize_bits", "must be 0, 4 or 8")
        v.check(
            not t.get("endpoint"),
            f"{p}.endpoint",
            "remote teachers are not supported yet; give a local model",
        )
        teachers.append(spec)
    if teachers and not sum(max(t.weight, 0.0) for t in teachers) > 0:
        v.add("spec.teachers", "teacher weights must sum to a positive number")

    route_field = str(cfg.get("route_field") or "")
    if route_field:
        seen: dict[str, int] = {}
        for i, t in enumerate(teachers):
            p = f"spec.teachers[{i}].route_value"
            if v.check(bool(t.route_value), p, "is required when spec.route_field is set"):
                v.check(
                    t.route_value not in seen,
                    p,
                    f"duplicates teachers[{seen.get(t.route_value)}].route_value",
                )
                seen.setdefault(t.route_value, i)

    student = cfg.get("student") or {}
    si_raw = cfg.get("student_init") or {}
    s_init = StudentInit(
        tuple(int(x) for x in si_raw.get("keep_teacher_layers") or ()),
        int(si_raw.get("num_layers") or 0),
    )
    v.check(
        not (s_init.keep_teacher_layers and s_init.num_layers),
        "spec.student_init",
        "give keep_teacher_layers or num_layers, not both",
    )
    v.check(s_init.num_layers >= 0, "spec.student_init.num_layers", "must be >= 0")
    v.check(
        len(set(s_init.keep_teacher_layers)) == len(s_init.keep_teacher_layers),
        "spec.student_init.keep_teacher_layers",
        "has duplicates",
    )
    v.check(
        s_init.enabled or bool(student.get("model")),
        "spec.student.model",
        "is required (or set spec.student_init to build one from teachers[0])",
    )

    ds = cfg.get("dataset") or {}
    v.check(bool(ds.get("path")), "spec.dataset.path", "is required")
    method = _enum(cfg.get("method"), "finetune_method_", "lora")
    v.check(method in METHODS, "spec.method", f"must be one of {', '.join(METHODS)}")

    divergence = _enum(cfg.get("divergence"), "divergence_", "forward_kl")
    v.check(divergence in DIVERGENCES, "spec.divergence", f"must be one of {DIVERGENCES}")
    alpha = cfg.get("alpha")
    alpha = 0.5 if alpha is None else float(alpha)
    v.check(0.0 <= alpha <= 1.0, "spec.alpha", "must be in [0, 1]")
    beta = float(cfg.get("jsd_beta") or 0.5)
    v.check(0.0 < beta < 1.0, "spec.jsd_beta", "must be in (0, 1)")

    traw = dict(cfg.get("temperature") or {})
    traw["mode"] = _enum(traw.get("mode"), "temperature_mode_", "fixed")
    v.check(
        traw["mode"] in TEMPERATURE_MODES,
        "spec.temperature.mode",
        f"must be one of {TEMPERATURE_MODES}",
    )
    for key in ("initial", "final", "min"):
        x = traw.get(key)
        v.check(x is None or x >= 0, f"spec.temperature.{key}", "must be > 0")
    temp = Temperature.from_dict(traw)
    if temp.mode == "adaptive":
        v.check(
            temp.low <= temp.high,
            "spec.temperature.min",
            f"must be <= the upper bound spec.temperature.final ({temp.high})",
        )

    fraw = cfg.get("features") or {}
    pairs = tuple(
        (int(p.get("student_layer") or 0), int(p.get("teacher_layer") or 0))
        for p in fraw.get("layer_map") or ()
    )
    features = Features(
        enabled=bool(fraw.get("enabled")),
        pairs=pairs,
        loss=_enum(fraw.get("loss"), "feature_loss_", "mse"),
        weight=float(fraw.get("weight") or 1.0),
    )
    v.check(
        features.loss in FEATURE_LOSSES, "spec.features.loss", f"must be one of {FEATURE_LOSSES}"
    )
    v.check(features.weight >= 0, "spec.features.weight", "must be >= 0")
    for k, (s, t) in enumerate(pairs):
        v.check(s >= 0, f"spec.features.layer_map[{k}].student_layer", "must be >= 0")
        v.check(t >= 0, f"spec.features.layer_map[{k}].teacher_layer", "must be >= 0")

    oraw = cfg.get("on_policy") or {}
    on_policy = OnPolicy(
        fraction=float(oraw.get("fraction") or 0.0),
        max_new_tokens=int(oraw.get("max_new_tokens") or OnPolicy.max_new_tokens),
        temperature=float(oraw.get("temperature") or 1.0),
    )
    v.check(0.0 <= on_policy.fraction <= 1.0, "spec.on_policy.fraction", "must be in [0, 1]")
    v.check(
        0 < on_policy.max_new_tokens <= 4096, "spec.on_policy.max_new_tokens", "must be in 1..4096"
    )
    v.check(0 < on_policy.temperature <= 10, "spec.on_policy.temperature", "must be in (0, 10]")

    craw = cfg.get("teacher_cache") or {}
    cache = CacheSettings(bool(craw.get("enabled")), int(craw.get("top_k") or 32))
    v.check(cache.top_k >= 1, "spec.teacher_cache.top_k", "must be >= 1")
    v.check(
        not (cache.enabled and features.enabled),
        "spec.teacher_cache.enabled",
        "cannot be combined with spec.features: feature matching needs the teachers' "
        "hidden states every step",
    )
    chunk = int(cfg.get("chunk_size") or 128)
    v.check(chunk >= 1, "spec.chunk_size", "must be >= 1")
    for name, section in SECTIONS.items():  # the shared sections, by their schema
        try:
            section.from_dict(cfg.get(name) or {}, prefix=f"spec.{name}")
        except InvalidArgument as e:
            v.items.extend(e.violations)
    v.raise_if_any()
    return DistillConfig(
        teachers=tuple(teachers),
        dataset=dict(ds),
        student=str(student.get("model") or ""),
        student_adapter=str(student.get("adapter_path") or ""),
        route_field=route_field,
        method=method,
        divergence=divergence,
        alpha=alpha,
        jsd_beta=beta,
        temperature=temp,
        features=features,
        on_policy=on_policy,
        cache=cache,
        student_init=s_init,
        lora=dict(cfg.get("lora") or {}),
        optimizer=dict(cfg.get("optimizer") or {}),
        loop=dict(cfg.get("loop") or {}),
        resources=dict(cfg.get("resources") or {}),
        output_name=str(cfg.get("output_name") or ""),
        chunk_size=chunk,
    )


def _layers(path: str) -> int | None:
    f = Path(path) / "config.json"
    if not f.is_file():
        return None
    conf = json.loads(f.read_text())
    n = conf.get("num_hidden_layers") or (conf.get("text_config") or {}).get("num_hidden_layers")
    return int(n) if n else None


def check_files(c: DistillConfig, v: Violations) -> None:
    """Checks that read the named files: layer ranges, tokenizers, routing of every row."""
    t0_layers = _layers(c.teachers[0].model)
    si = c.student_init
    if t0_layers is not None and si.enabled:
        for k, i in enumerate(si.keep_teacher_layers):
            v.check(
                0 <= i < t0_layers,
                f"spec.student_init.keep_teacher_layers[{k}]",
                f"{i} is out of range: teachers[0] has {t0_layers} layers",
            )
        v.check(
            si.num_layers <= t0_layers,
            "spec.student_init.num_layers",
            f"must be <= {t0_layers} (the layers of teachers[0])",
        )
    s_layers = (len(si.keep_teacher_layers) or si.num_layers) if si.enabled else _layers(c.student)
    if c.features.enabled and s_layers is not None and t0_layers is not None:
        for k, (s, t) in enumerate(c.features.pairs):
            v.check(
                s < s_layers,
                f"spec.features.layer_map[{k}].student_layer",
                f"{s} is out of range: the student has {s_layers} layers",
            )
            v.check(
                t < t0_layers,
                f"spec.features.layer_map[{k}].teacher_layer",
                f"{t} is out of range: teachers[0] has {t0_layers} layers",
            )

    ref = c.teachers[0].model if si.enabled else c.student
    student_sig = signature_from_dir(ref) if ref else None
    if student_sig is not None:
        try:
            check_tokenizers(student_sig, [signature_from_dir(t.model) for t in c.teachers])
        except InvalidArgument as e:
            v.items.extend(e.violations)

    if c.route_field:
        try:
            for rows, f in dataset_rows(c.dataset):
                route_rows(rows, c.route_field, c.teachers, f)
        except InvalidArgument as e:
            v.items.extend(e.violations)


def dataset_rows(ds: dict) -> list[tuple[list[dict], str]]:
    from services.runtime.datasets import load_dir, load_rows

    path = Path(ds.get("path") or "")
    if not path.exists():
        return []
    field_ = "spec.dataset.path"
    parts = load_dir(path, field_) if path.is_dir() else {"train": load_rows(path, field_)}
    out = [(rows, field_) for rows in parts.values()]
    if ds.get("valid_path") and Path(ds["valid_path"]).exists():
        out.append(
            (
                load_rows(Path(ds["valid_path"]), "spec.dataset.valid_path"),
                "spec.dataset.valid_path",
            )
        )
    return out


def validate(config: dict) -> DistillConfig:
    """Everything that can be known before a job exists; returns the resolved config."""
    c = parse(config)
    v = Violations()
    check_files(c, v)
    v.raise_if_any()
    return c
