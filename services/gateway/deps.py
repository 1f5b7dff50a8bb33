"""What every handler needs: the backends, the settings, and the caller's API key (checked
here against MLXU_API_KEYS as the gRPC services check it, then forwarded to them)."""

from __future__ import annotations

import grpc
from fastapi import Request, Security
from fastapi.security import APIKeyHeader

from services.gateway.backends import Backends
from services.gateway.errors import BackendError
from services.runtime.rpc.auth import key_matches
from services.runtime.settings import Settings

HEADER = "X-API-Key"
_scheme = APIKeyHeader(name=HEADER, auto_error=False, description="an MLXU_API_KEYS key")


def backends(request: Request) -> Backends:
    return request.app.state.backends


def settings(request: Request) -> Settings:
    return request.app.state.settings


def api_key(request: Request, supplied: str | None = Security(_scheme)) -> str | None:
    """The caller's key. With keys configured, a missing or wrong one is a 401 here; without,
    whatever was sent is forwarded (the services then decide)."""
    keys = request.app.state.settings.api_keys
    if keys:
        if not supplied:
            raise BackendError(
                grpc.StatusCode.UNAUTHENTICATED, f"missing API key (send header '{HEADER}')"
            )
        if not key_matches(supplied, keys):
            raise BackendError(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
    return supplied or None
