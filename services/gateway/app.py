"""The gateway's FastAPI app and its server: ``mlxu serve gateway`` (or
``python -m services.gateway.app``) serves it with uvicorn on MLXU_GATEWAY_PORT (8700)."""

from __future__ import annotations

import contextlib
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from orchestrator.backend import channel_credentials
from services.gateway import dashboard, errors, legacy, metrics, resources, streams
from services.gateway.backends import Backends
from services.gateway.middleware import Edge
from services.runtime import logs
from services.runtime.settings import Settings

SERVICE = "gateway"
DESCRIPTION = (
    "HTTP/JSON over the MLX Unified Training services. Send `X-API-Key` when the services "
    'have keys (MLXU_API_KEYS). Errors: `{"error": {"code", "message", "violations"}}`.'
    " Guide: docs/http.md."
)


def create_app(settings: Settings, backends: Backends | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await app.state.backends.close()

    app = FastAPI(
        title="MLX Unified Training",
        version="v1",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    # TLS towards the services exactly as the orchestrator does (MLXU_TLS_* settings).
    app.state.backends = backends or Backends(settings.endpoints, channel_credentials(settings))
    errors.install(app)

    @app.get("/healthz", tags=["health"], summary="The gateway and its services' health")
    async def healthz(request: Request) -> JSONResponse:
        states = await request.app.state.backends.health()
        ok = all(s == "SERVING" for s in states.values())
        body = {"status": "ok" if ok else "degraded", "services": states}
        return JSONResponse(body, status_code=200 if ok else 503)

    http = metrics.install(app)
    app.add_middleware(Edge, max_bytes=settings.limits.max_request_bytes, observe=http.observe)
    app.include_router(legacy.router)
    app.include_router(streams.router)
    app.include_router(resources.router)
    app.include_router(metrics.router)
    dashboard.install(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(resources.SCHEMAS)
            _error_responses(doc, schemas)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "example": "INVALID_ARGUMENT"},
                "message": {"type": "string"},
                "violations": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "field": {"type": "string"},
                            "description": {"type": "string"},
                        },
                    },
                },
            },
        }
    },
}


def _error_responses(doc: dict[str, Any], schemas: dict[str, Any]) -> None:
    """Document the errors as they are sent: 400 with violations (FastAPI would say 422),
    401 where a key is needed."""
    schemas["Error"] = _ERROR
    body = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for ops in doc.get("paths", {}).values():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if op.get("parameters") or op.get("requestBody"):
                responses["400"] = {"description": "invalid request (field violations)", **body}
            if op.get("security"):
                responses["401"] = {"description": "missing or wrong X-API-Key", **body}
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(host: str | None = None, port: int | None = None, home: str | None = None) -> None:
    import uvicorn

    log = logs.configure(SERVICE)
    overrides: dict[str, object] = {}
    if host:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if home:
        overrides["home"] = Path(home).expanduser().resolve()
    settings = Settings.from_env(SERVICE, **overrides)
    if not settings.api_keys and not _loopback(settings.host):
        # As the gRPC services: without a key, nobody off this machine may call.
        log.warning("no_api_key_loopback_only", requested_host=settings.host)
        settings = replace(settings, host="127.0.0.1")
    tls: dict[str, Any] = {}
    if settings.tls_cert and settings.tls_key:  # HTTPS, and mTLS with a client CA
        tls = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
        if settings.tls_client_ca:
            tls |= {"ssl_ca_certs": settings.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    log.info(
        "serving",
        address=f"{settings.host}:{settings.port}",
        backends=settings.endpoints,
        auth=bool(settings.api_keys),
        tls=bool(tls),
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        **tls,
    )


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--home")
    a = p.parse_args()
    main(a.host, a.port, a.home)
