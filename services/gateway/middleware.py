"""ASGI middleware (pure ASGI, so SSE streams pass through untouched): a body-size limit
before anything reads the body, and one structlog line per request."""

from __future__ import annotations

import json
import time
from typing import Any

from services.runtime import logs

Scope = dict[str, Any]


class Edge:
    """Refuses a declared body over ``max_bytes`` (413, as MLXU_MAX_REQUEST_BYTES bounds a
    gRPC message) and logs method, path, status and duration of every request."""

    def __init__(self, app: Any, max_bytes: int, observe: Any = None) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.observe = observe  # (scope, status, seconds): the request metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.monotonic(), [0]
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"0")
        if self.max_bytes and declared.isdigit() and int(declared) > self.max_bytes:
            await _too_large(send, self.max_bytes)
            status[0] = 413
        else:

            async def send_status(message: dict) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            await self.app(scope, receive, send_status)
        if self.observe is not None:
            self.observe(scope, status[0], time.monotonic() - start)
        logs.get().info(
            "http_request",
            method=scope.get("method"),
            path=scope.get("path"),
            status=status[0],
            ms=round((time.monotonic() - start) * 1000, 1),
        )


async def _too_large(send: Any, limit: int) -> None:
    message = f"the request body is over {limit} bytes (MLXU_MAX_REQUEST_BYTES)"
    body = json.dumps({"error": {"code": "RESOURCE_EXHAUSTED", "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
