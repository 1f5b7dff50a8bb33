"""The config sections every method shares: model, dataset, resources, loop, optimizer, LoRA
and quantization. Each mirrors a proto message of common.proto; a zero means the default.

The bounds here are the only ones: the servicers' Start, the orchestrator's pipeline check
and the docs (docs/config.md, generated from these fields) all read them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from services.runtime.errors import Violations
from services.schema.base import DictConfig, setting

__all__ = [
    "DTYPES",
    "FINETUNE_METHODS",
    "MAX_LEARNING_RATE",
    "OPTIMIZERS",
    "OPTIMIZER_DEFAULTS",
    "SCHEDULES",
    "DatasetSettings",
    "LoopSettings",
    "LoraSettings",
    "ModelSettings",
    "OptimizerSettings",
    "QuantizationSettings",
    "REMOTE_KINDS",
    "RemoteSettings",
    "ResourcesSettings",
    "default_dtype",
    "default_lr",
    "method_name",
]

DTYPES = ("float32", "bfloat16", "float16")
FINETUNE_METHODS = ("full", "lora", "dora", "qlora")
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "lion", "muon")
SCHEDULES = ("constant", "cosine", "linear")
REMOTE_KINDS = ("grpc", "openai")
# The one bound on a learning rate (0 in a request = the method's default).
MAX_LEARNING_RATE = 1.0


def default_dtype() -> str:
    """float32 on the CPU (bf16 is far slower there), bfloat16 on a GPU (asks MLX, lazily)."""
    from services.runtime.models import compute_dtype

    return compute_dtype()


def method_name(raw: str) -> str:
    """ "FINETUNE_METHOD_LORA" or "LoRA" -> "lora"."""
    return raw.lower().removeprefix("finetune_method_")


def default_lr(data: dict, full: float, adapter: float) -> dict:
    """``data`` with the method's default learning rate when none is given: ``full`` for full
    fine-tuning, ``adapter`` for adapters (the pairs are ``services.registry``'s ``lr``)."""
    data = dict(data or {})
    opt = dict(data.get("optimizer") or {})
    if not opt.get("learning_rate"):
        opt["learning_rate"] = full if method_name(data.get("method") or "") == "full" else adapter
    data["optimizer"] = opt
    return data


@dataclass(frozen=True)
class ModelSettings(DictConfig):
    """Mirrors ModelRef; ``model`` is already resolved (a local dir or a hub id)."""

    model: str = setting("", doc="registered name, model directory or hub id")
    adapter_path: str = setting("", doc="LoRA/DoRA adapter directory applied on top")

    def check(self, v: Violations, prefix: str) -> None:
        v.check(bool(self.model), f"{prefix}.model" if prefix else "model", "is required")


@dataclass(frozen=True)
class DatasetSettings(DictConfig):
    """Mirrors DatasetRef (passed on to services.runtime.datasets.prepare)."""

    path: str = setting("", doc="JSONL file or directory with train.jsonl / valid.jsonl")
    format: str = setting("", doc='row format; "" = detected from row 1')
    valid_path: str = setting("", doc="validation JSONL (else split off the training rows)")
    valid_fraction: float | None = setting(
        None, ge=0, lt=0.5, doc="rows held out when there is no validation file (unset: 0.1)"
    )

    def resolve(self) -> DatasetSettings:
        frac = 0.1 if self.valid_fraction is None else self.valid_fraction
        return dataclasses.replace(self, format=self.format.lower(), valid_fraction=frac)

    def check(self, v: Violations, prefix: str) -> None:
        v.check(bool(self.path), f"{prefix}.path" if prefix else "path", "is required")


@dataclass(frozen=True)
class ResourcesSettings(DictConfig):
    """Mirrors Resources (used by the job runner to launch data-parallel workers)."""

    num_processes: int = setting(1, zero=True, ge=1, le=256, doc="data-parallel processes")
    hosts: tuple[str, ...] = setting((), doc="hosts for mlx.launch (else this machine)")
    hostfile: str = setting("", doc="an mlx.launch hostfile instead of hosts")
    backend: str = setting("ring", zero=True, doc="mlx.distributed backend")

    def check(self, v: Violations, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if self.hosts and self.hostfile:
            v.add(f"{p}hosts", "give hosts or hostfile, not both")
        for i, host in enumerate(self.hosts[:256]):
            v.check(
                bool(host)
                and len(host) <= 255
                and all(c.isalnum() or c in "._-:@[]" for c in host),
                f"{p}hosts[{i}]",
                "must be a host name or address (letters, digits, '.', '_', '-', ':', '@', '[]')",
            )


@dataclass(frozen=True)
class LoopSettings(DictConfig):
    """Mirrors LoopConfig; a zero means the default."""

    batch_size: int = setting(4, zero=True, ge=1, le=4096, doc="global sequences per step")
    grad_accumulation_steps: int = setting(1, zero=True, ge=1, le=1024, doc="micro-batches")
    max_steps: int = setting(0, ge=0, le=10_000_000, doc="0 = epochs x steps per epoch")
    epochs: int = setting(1, zero=True, ge=1, le=1000)
    max_seq_length: int = setting(512, zero=True, ge=8, le=131072, doc="tokens per sequence")
    seed: int = setting(0, doc="data order, dropout and sampling seed")
    steps_per_report: int = setting(10, zero=True, ge=1)
    steps_per_eval: int = setting(100, zero=True, ge=1, alt=(-1,), doc="-1 = no validation")
    val_batches: int = setting(25, zero=True, ge=1, alt=(-1,), doc="-1 = the whole valid set")
    steps_per_checkpoint: int = setting(100, zero=True, ge=1, alt=(-1,), doc="-1 = at the end")
    keep_last_checkpoints: int = setting(3, zero=True, ge=1, le=100, alt=(-1,), doc="-1 = all")
    grad_checkpoint: bool = setting(False, doc="recompute activations in the backward pass")
    mask_prompt: bool | None = setting(None, doc="unset = by format (chat/completion: true)")
    dtype: str = setting(
        "", zero=True, choices=DTYPES, doc='"" = bfloat16 on a GPU, float32 on the CPU'
    )

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accumulation_steps

    def resolve(self) -> LoopSettings:
        return dataclasses.replace(self, dtype=self.dtype.lower() or default_dtype())

    def check(self, v: Violations, prefix: str) -> None:
        v.check(
            self.batch_size % max(self.grad_accumulation_steps, 1) == 0,
            f"{prefix}.batch_size" if prefix else "batch_size",
            "must be a multiple of grad_accumulation_steps (it is the global batch)",
        )


# Per-optimizer defaults for the fields whose "unset" depends on the optimizer.
OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {
    "adamw": {"weight_decay": 0.01, "beta1": 0.9, "beta2": 0.999},
    "adam": {"weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999},
    "sgd": {"weight_decay": 0.0, "momentum": 0.0},
    "adafactor": {"weight_decay": 0.0},
    "lion": {"weight_decay": 0.0, "beta1": 0.9, "beta2": 0.99},
    "muon": {"weight_decay": 0.01, "momentum": 0.95, "beta1": 0.9, "beta2": 0.999},
}


@dataclass(frozen=True)
class OptimizerSettings(DictConfig):
    """Mirrors OptimizerConfig. ``learning_rate`` 0 means the method's default (the registry's
    ``lr``: full, adapters); the other zeros resolve per optimizer (OPTIMIZER_DEFAULTS)."""

    name: str = setting("adamw", zero=True, choices=OPTIMIZERS)
    learning_rate: float = setting(1e-4, zero=True, gt=0, le=MAX_LEARNING_RATE)
    weight_decay: float | None = setting(
        None, ge=0, lt=1, doc="decoupled, as torch.optim.AdamW; unset = per optimizer"
    )
    beta1: float = setting(0.0, ge=0, lt=1, doc="0 = per optimizer")
    beta2: float = setting(0.0, ge=0, lt=1, doc="0 = per optimizer")
    eps: float = setting(1e-8, zero=True, gt=0, lt=1)
    momentum: float = setting(0.0, ge=0, lt=1, doc="SGD / Muon")
    schedule: str = setting("cosine", zero=True, choices=SCHEDULES)
    warmup_steps: int = setting(0, ge=0, doc="linear warmup from 0, as transformers")
    min_lr_ratio: float = setting(0.0, ge=0, le=1, doc="final lr = learning_rate x this")
    grad_clip_norm: float = setting(0.0, ge=0, doc="global norm, as clip_grad_norm_; 0 = off")
    # Adam/AdamW (and Muon's AdamW half) as torch.optim: bias-corrected moments. MLX's and
    # mlx-lm's own default is False, which makes the first updates 3-6x larger.
    bias_correction: bool = setting(True, doc="Adam moments bias-corrected, as torch.optim")

    def resolve(self) -> OptimizerSettings:
        defaults = OPTIMIZER_DEFAULTS.get(self.name.lower(), {})
        changes: dict[str, Any] = {"name": self.name.lower(), "schedule": self.schedule.lower()}
        if self.weight_decay is None:
            changes["weight_decay"] = defaults.get("weight_decay", 0.0)
        for key in ("beta1", "beta2", "momentum"):
            if getattr(self, key) == 0.0 and key in defaults:
                changes[key] = defaults[key]
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class LoraSettings(DictConfig):
    """Mirrors LoraConfig (LoRA and DoRA adapters, mlx-lm's layout)."""

    rank: int = setting(8, zero=True, ge=1, le=1024)
    scale: float = setting(20.0, zero=True, gt=0, le=1e4, doc="mlx-lm's scale; peft alpha/r")
    dropout: float = setting(0.0, ge=0, lt=1)
    num_layers: int = setting(16, zero=True, ge=1, le=1024, alt=(-1,), doc="last N; -1 = all")
    keys: tuple[str, ...] = setting((), doc='modules, e.g. "self_attn.q_proj"; () = default')
    alpha: float = setting(0.0, ge=0, le=1e6, doc="peft's lora_alpha: > 0 sets scale")

    def resolve(self) -> LoraSettings:
        if self.alpha > 0:
            return dataclasses.replace(self, scale=self.alpha / self.rank)
        return self

    def check(self, v: Violations, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        v.check(len(self.keys) <= 64, f"{p}keys", "at most 64 module names")
        for i, key in enumerate(self.keys[:64]):
            v.check(bool(key) and len(key) <= 256, f"{p}keys[{i}]", "must be a module name")


@dataclass(frozen=True)
class QuantizationSettings(DictConfig):
    """Mirrors QuantizationConfig (QLoRA's base and export's quantize mode)."""

    bits: int = setting(4, zero=True, choices=(2, 3, 4, 5, 6, 8), doc="4 or 8 (2-6 work)")
    group_size: int = setting(64, zero=True, choices=(32, 64, 128))


@dataclass(frozen=True)
class RemoteSettings(DictConfig):
    """Mirrors RemoteBackend: a teacher or rollout server in another process."""

    kind: str = setting("", choices=("", *REMOTE_KINDS), doc='"grpc" or "openai" ("" = grpc)')
    address: str = setting("", doc="grpc host:port, or the openai base URL (http[s]://…/v1)")
    model: str = setting("", doc="the model the server is asked for")
    api_key_env: str = setting("", doc="env var of the trainer's service holding the key")
    tls: bool = setting(False, doc="TLS on grpc (https URLs always use it)")
    tls_ca: str = setting("", doc="CA bundle (PEM) verifying the server; implies TLS")
    timeout_seconds: float = setting(60.0, zero=True, gt=0, le=3600, doc="one call")
    retry_deadline_seconds: float = setting(
        120.0, zero=True, gt=0, le=86400, doc="keep retrying an unreachable server this long"
    )

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    @classmethod
    def from_endpoint(cls, endpoint: str, remote: RemoteSettings) -> RemoteSettings:
        """The backend a section names: ``remote``, or the ``endpoint`` shorthand (grpc)."""
        if endpoint and not remote.address:
            return dataclasses.replace(remote, kind="grpc", address=endpoint)
        return remote

    def resolve(self) -> RemoteSettings:
        if self.address and not self.kind:
            return dataclasses.replace(self, kind="grpc")
        return self

    def check(self, v: Violations, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if not self.address:
            v.check(not self.kind, f"{p}address", "is required when kind is set")
            return
        if (self.kind or "grpc") == "openai":
            v.check(
                self.address.startswith(("http://", "https://")),
                f"{p}address",
                'must be the API\'s base URL, e.g. "http://127.0.0.1:8080/v1"',
            )
        else:
            host, _, port = self.address.rpartition(":")
            v.check(
                bool(host) and port.isdigit() and 0 < int(port) < 65536,
                f"{p}address",
                'must be host:port, e.g. "127.0.0.1:50061"',
            )
        v.check(
            not self.api_key_env or self.api_key_env.replace("_", "").isalnum(),
            f"{p}api_key_env",
            "must be an environment variable name (letters, digits, '_')",
        )
