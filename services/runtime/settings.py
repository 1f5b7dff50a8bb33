"""Service settings from the environment (flags override in the CLI).

MLXU_HOME            data dir (default ~/.mlxu): job DBs, checkpoints, converted models
MLXU_API_KEYS        comma-separated API keys; MLXU_API_KEYS_FILE: one key per line
MLXU_ALLOWED_ROOTS   os.pathsep-separated dirs clients may read models/datasets from
                     (MLXU_HOME is always allowed; default adds the working directory)
MLXU_HOST            bind address (default 127.0.0.1; with no API key, loopback only)
MLXU_MAX_ATTEMPTS    worker starts per job before it fails (default 3)
MLXU_TLS_CERT / MLXU_TLS_KEY / MLXU_TLS_CLIENT_CA   optional TLS / mTLS
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

PORTS = {"orchestrator": 8600, "distillation": 8300, "rlhf": 8400, "training": 8500}


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
            port=int(env_port) if env_port else PORTS.get(service, 0),
            api_keys=_keys_from_env(),
            allowed_roots=_roots_from_env(home),
            max_attempts=int(os.environ.get("MLXU_MAX_ATTEMPTS", "3")),
            tls_cert=os.environ.get("MLXU_TLS_CERT", ""),
            tls_key=os.environ.get("MLXU_TLS_KEY", ""),
            tls_client_ca=os.environ.get("MLXU_TLS_CLIENT_CA", ""),
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
