"""Service settings from the environment (flags override in the CLI).

MLXU_HOME            data dir (default ~/.mlxu): job DBs, checkpoints, converted models
MLXU_API_KEYS        comma-separated API keys; MLXU_API_KEYS_FILE: one key per line
MLXU_ALLOWED_ROOTS   os.pathsep-separated dirs clients may read models/datasets from
                     (MLXU_HOME is always allowed; default adds the working directory)
MLXU_HOST            bind address (default 127.0.0.1; with no API key, loopback only)
MLXU_MAX_ATTEMPTS    worker starts per job before it fails (default 3)
MLXU_TLS_CERT / MLXU_TLS_KEY / MLXU_TLS_CLIENT_CA   optional TLS / mTLS
MLXU_<SERVICE>_PORT  a service's port (MLXU_GATEWAY_PORT: the HTTP gateway's, default 8700)
MLXU_<SERVICE>_ADDR  where the other services are (the orchestrator's and gateway's backends)
MLXU_OFFLINE         1 = no hub access: a hub id must already be in the local hub cache
                     (default: HF_HUB_OFFLINE)

Limits (``Limits`` below; docs/operations.md lists them all): MLXU_MAX_REQUEST_BYTES,
MLXU_GENERATE_*, MLXU_SCORE_MAX_ITEMS, MLXU_RATE_*. A rate of 0 turns that limit off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

PORTS = {"orchestrator": 8600, "distillation": 8300, "rlhf": 8400, "training": 8500}
# The HTTP/JSON gateway (services/gateway): not a gRPC service, so not in PORTS.
GATEWAY_PORT = 8700
# The standalone GenerationService (`mlxu serve generation`: a remote teacher server).
GENERATION_PORT = 8800


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not an integer") from None
    if value < 0:
        raise SystemExit(f"{name}={raw!r} must be >= 0")
    return value


def _env_flag(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    return default if not raw else raw in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Limits:
    """What one request (and one client) may ask of a service. Each is refused with a clear
    status: over a size limit INVALID_ARGUMENT naming the field (a body over
    ``max_request_bytes`` gets gRPC's own RESOURCE_EXHAUSTED), a full queue or an empty rate
    bucket RESOURCE_EXHAUSTED with the limit named."""

    max_request_bytes: int = 4 * 1024 * 1024  # MLXU_MAX_REQUEST_BYTES
    generate_max_prompt_tokens: int = 8192  # MLXU_GENERATE_MAX_PROMPT_TOKENS
    generate_max_tokens: int = 4096  # MLXU_GENERATE_MAX_TOKENS (sampling.max_tokens)
    generate_max_messages: int = 64  # MLXU_GENERATE_MAX_MESSAGES (chat turns)
    generate_concurrency: int = 1  # MLXU_GENERATE_CONCURRENCY (MLX work is serialised)
    generate_queue: int = 8  # MLXU_GENERATE_QUEUE (waiting beyond the running ones)
    # Prompt tokens per prefill step: the deadline and cancel are checked between steps.
    generate_prefill_chunk: int = 512  # MLXU_GENERATE_PREFILL_CHUNK
    # A call without a deadline is stopped after this long (its own deadline if shorter).
    generate_max_seconds: int = 300  # MLXU_GENERATE_MAX_SECONDS
    score_max_items: int = 256  # MLXU_SCORE_MAX_ITEMS (ScoreCompletions / Score)
    # Per-client token buckets (client = API key, else peer address): sustained calls per
    # minute and burst. Start*: every Start RPC, RunPipeline and CreatePipeline*.
    rate_start_per_min: int = 60  # MLXU_RATE_START_PER_MIN
    rate_start_burst: int = 20  # MLXU_RATE_START_BURST
    rate_generate_per_min: int = 600  # MLXU_RATE_GENERATE_PER_MIN (Generate, Score*)
    rate_generate_burst: int = 60  # MLXU_RATE_GENERATE_BURST

    @classmethod
    def from_env(cls) -> Limits:
        d = cls()
        kw = {f: _env_int(f"MLXU_{f.upper()}", getattr(d, f)) for f in cls.__dataclass_fields__}
        for name in ("generate_concurrency", "generate_prefill_chunk", "generate_max_tokens"):
            kw[name] = max(kw[name], 1)
        return cls(**kw)


def _keys_from_env() -> frozenset[str]:
    keys = {k.strip() for k in os.environ.get("MLXU_API_KEYS", "").split(",") if k.strip()}
    key_file = os.environ.get("MLXU_API_KEYS_FILE")
    if key_file:
        lines = Path(key_file).read_text().splitlines()
        keys |= {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}
    return frozenset(keys)


def _roots_from_env(home: Path) -> tuple[Path, ...]:
    raw = os.environ.get("MLXU_ALLOWED_ROOTS")
    roots = [Path(p) for p in raw.split(os.pathsep) if p] if raw else [Path.cwd()]
    roots = [r.expanduser().resolve() for r in roots]
    # "/" as a root would make confinement meaningless.
    roots = [r for r in roots if r != Path("/")]
    return (home, *[r for r in roots if r != home])


@dataclass(frozen=True)
class Settings:
    service: str
    home: Path
    host: str = "127.0.0.1"
    port: int = 0
    api_keys: frozenset[str] = frozenset()
    allowed_roots: tuple[Path, ...] = ()
    max_attempts: int = 3
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    limits: Limits = field(default_factory=Limits)
    offline: bool = False
    # Addresses of the other services (orchestrator side).
    endpoints: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, service: str, **overrides: object) -> Settings:
        home_raw = overrides.pop("home", None) or os.environ.get("MLXU_HOME", "~/.mlxu")
        home = Path(str(home_raw)).expanduser().resolve()
        env_port = os.environ.get(f"MLXU_{service.upper()}_PORT")
        endpoints = {
            name: os.environ.get(f"MLXU_{name.upper()}_ADDR", f"127.0.0.1:{port}")
            for name, port in PORTS.items()
        }
        s = cls(
            service=service,
            home=home,
            host=os.environ.get("MLXU_HOST", "127.0.0.1"),
            port=int(env_port)
            if env_port
            else {**PORTS, "gateway": GATEWAY_PORT, "generation": GENERATION_PORT}.get(service, 0),
            api_keys=_keys_from_env(),
            allowed_roots=_roots_from_env(home),
            max_attempts=int(os.environ.get("MLXU_MAX_ATTEMPTS", "3")),
            tls_cert=os.environ.get("MLXU_TLS_CERT", ""),
            tls_key=os.environ.get("MLXU_TLS_KEY", ""),
            tls_client_ca=os.environ.get("MLXU_TLS_CLIENT_CA", ""),
            limits=Limits.from_env(),
            offline=_env_flag("MLXU_OFFLINE", _env_flag("HF_HUB_OFFLINE")),
            endpoints=endpoints,
        )
        return replace(s, **overrides) if overrides else s  # type: ignore[arg-type]

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def db_path(self) -> Path:
        return self.state_dir / f"{self.service}.db"

    @property
    def checkpoints_dir(self) -> Path:
        return self.home / "checkpoints"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def ensure_dirs(self) -> None:
        for d in (self.state_dir, self.checkpoints_dir, self.models_dir):
            d.mkdir(parents=True, exist_ok=True)
