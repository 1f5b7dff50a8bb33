"""Validation of a distillation config (the DistillationSpec as a plain dict), before a job
exists, and its resolution into the frozen settings the trainer runs with.

The field rules are the schema's (services.schema.distill.DistillSettings); this module adds
the checks that read files and gives the trainer its view (``DistillConfig``).
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

from services.distillation.trainers.losses import Temperature
from services.distillation.trainers.teachers import (
    TeacherSpec,
    check_tokenizers,
    route_rows,
    signature_from_dir,
)
from services.runtime.errors import InvalidArgument, NotFound, Violations
from services.schema.common import FINETUNE_METHODS
from services.schema.distill import DistillSettings

METHODS = FINETUNE_METHODS


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


def parse(config: dict, *, validated: bool = False) -> DistillConfig:
    """The trainer's view of a distillation config. Checks every rule that needs no file
    (the schema, services.schema.distill) unless ``validated`` (the worker: Start did)."""
    cfg = dict(config or {})
    if validated:
        s = DistillSettings.rehydrate(cfg)
    else:
        s = DistillSettings.from_dict(cfg, prefix="spec")
    t = s.temperature.to_dict()
    return DistillConfig(
        teachers=tuple(
            TeacherSpec(
                model=x.model.model,
                adapter_path=x.model.adapter_path,
                weight=x.weight,
                route_value=x.route_value,
                quantize_bits=x.quantize_bits,
                remote=x.backend if x.backend.enabled else None,
            )
            for x in s.teachers
        ),
        dataset=dict(cfg.get("dataset") or {}),
        student=s.student.model,
        student_adapter=s.student.adapter_path,
        route_field=s.route_field,
        method=s.method,
        divergence=s.divergence,
        alpha=float(s.alpha if s.alpha is not None else 0.5),
        jsd_beta=s.jsd_beta,
        temperature=Temperature.from_dict({k: v for k, v in t.items() if v}),
        features=Features(
            enabled=s.features.enabled,
            pairs=tuple((p.student_layer, p.teacher_layer) for p in s.features.layer_map),
            loss=s.features.loss,
            weight=s.features.weight,
        ),
        on_policy=OnPolicy(
            s.on_policy.fraction, s.on_policy.max_new_tokens, s.on_policy.temperature
        ),
        cache=CacheSettings(s.teacher_cache.enabled, s.teacher_cache.top_k),
        student_init=StudentInit(s.student_init.keep_teacher_layers, s.student_init.num_layers),
        lora=dict(cfg.get("lora") or {}),
        optimizer=dict(cfg.get("optimizer") or {}),
        loop=dict(cfg.get("loop") or {}),
        resources=dict(cfg.get("resources") or {}),
        output_name=s.output_name,
        chunk_size=s.chunk_size,
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
        local = [None if t.remote else signature_from_dir(t.model) for t in c.teachers]
        try:
            check_tokenizers(student_sig, local)
        except InvalidArgument as e:
            v.items.extend(e.violations)
        for i, t in enumerate(c.teachers):
            if t.remote is not None:
                probe_remote(t, i, student_sig, v)

    if c.route_field:
        try:
            for rows, f in dataset_rows(c.dataset):
                route_rows(rows, c.route_field, c.teachers, f)
        except InvalidArgument as e:
            v.items.extend(e.violations)


def probe_remote(t: TeacherSpec, i: int, student_sig: dict, v: Violations) -> None:
    """Ask a remote teacher, once and briefly, whether it serves the named model with the
    student's tokenizer. An unreachable server is not a violation (it may come up before the
    job starts; the job retries and checks again), a wrong model or tokenizer is."""
    import dataclasses

    from services.distillation.trainers.teacher_backends import TOKENIZER_MISMATCH, open_backend
    from services.runtime import remote

    assert t.remote is not None
    if t.remote.kind == "openai":
        return  # needs the student's tokenizer loaded: checked when the job starts
    quick = dataclasses.replace(
        t.remote, timeout_seconds=min(t.remote.timeout_seconds, 5.0), retry_deadline_seconds=0.01
    )
    backend = None
    try:
        backend = open_backend(dataclasses.replace(t, remote=quick), i, "float32", student_sig)
        if not backend.same_tokenizer(student_sig):
            v.add(f"spec.teachers[{i}].model", TOKENIZER_MISMATCH.format(i=i))
    except InvalidArgument as e:
        v.items.extend(e.violations)
    except NotFound as e:
        v.add(f"spec.teachers[{i}].model", str(e))
    except remote.RemoteRejected as e:  # it answered, and refused (e.g. UNAUTHENTICATED)
        v.add(f"spec.teachers[{i}].remote", str(e))
    except remote.RemoteUnavailable:
        pass  # checked again when the job starts, with retries
    finally:
        if backend is not None:
            backend.close()


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
