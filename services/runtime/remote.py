"""Calls from a trainer to a model server in another process (remote teachers, remote
rollouts). One place for what every such call needs: the API key, TLS, a per-call timeout,
and retries with exponential backoff while the server is unreachable, within a deadline,
after which the job fails with the reason.

Two transports: our GenerationService over gRPC (``grpc_channel``) and the OpenAI-compatible
completions API over HTTP (``post_json``: mlx_lm.server, vLLM). The backends built on them
live with their trainers; nothing here knows about teachers or rollouts.
"""

from __future__ import annotations

import collections
import json
import os
import random
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import structlog

from services.runtime.errors import InvalidArgument, Unavailable
from services.schema.common import RemoteSettings

log = structlog.get_logger(__name__)
T = TypeVar("T")

API_KEY_HEADER = "x-api-key"  # services/runtime/rpc/auth.py's HEADER
# gRPC codes worth retrying: the server is away, busy, or the call timed out.
_RETRY_GRPC = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"}
_RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # as the services' own limit


class RemoteUnavailable(Unavailable):
    """The remote side stayed unreachable (or kept failing transiently) past the deadline."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="REMOTE_UNAVAILABLE")


class RemoteRejected(Exception):
    """The remote side answered with a permanent error (bad request, auth): not retried."""


def api_key(settings: RemoteSettings, field: str = "remote.api_key_env") -> str:
    """The key named by ``api_key_env`` ("" when none is configured)."""
    if not settings.api_key_env:
        return ""
    key = os.environ.get(settings.api_key_env, "")
    if not key:
        raise InvalidArgument.one(
            field, f"environment variable {settings.api_key_env} is not set on the service"
        )
    return key


def transient(exc: BaseException) -> bool:
    """Whether a failed call is worth another try."""
    code = getattr(exc, "code", None)
    if callable(code):  # grpc.RpcError
        try:
            return code().name in _RETRY_GRPC
        except Exception:  # noqa: BLE001 - not a grpc error after all
            return False
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in _RETRY_HTTP
    return isinstance(exc, urllib.error.URLError | ConnectionError | TimeoutError)


def with_retry(
    call: Callable[[], T],
    settings: RemoteSettings,
    what: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
    initial_s: float = 0.5,
    max_backoff_s: float = 10.0,
) -> T:
    """``call()``, retried with jittered exponential backoff on transient failures until
    ``settings.retry_deadline_seconds`` have passed; then RemoteUnavailable with the reason."""
    deadline = time.monotonic() + settings.retry_deadline_seconds
    delay, attempt = initial_s, 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - sorted into transient or not below
            if not transient(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemoteUnavailable(
                    f"{what}: {settings.address} unreachable for "
                    f"{settings.retry_deadline_seconds:g} s ({attempt} attempts): "
                    f"{describe(exc)}"
                ) from exc
            wait = min(delay * (0.5 + random.random()), left, max_backoff_s)
            log.warning(
                "remote_retry",
                what=what,
                address=settings.address,
                attempt=attempt,
                wait_s=round(wait, 2),
                error=describe(exc),
            )
            sleep(wait)
            delay = min(delay * 2, max_backoff_s)


def describe(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):  # grpc.RpcError
        try:
            return f"{exc.code().name}: {details()}"  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001
            pass
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


# -- gRPC --------------------------------------------------------------------------------------


def grpc_channel(settings: RemoteSettings, field: str = "remote") -> grpc.Channel:
    """A blocking channel to ``settings.address`` with TLS (when asked) and the API key sent
    as ``x-api-key`` metadata on every call. Close it when done."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if settings.tls or settings.tls_ca:
        ca = Path(settings.tls_ca).read_bytes() if settings.tls_ca else None
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
        channel = grpc.secure_channel(settings.address, creds, options)
    else:
        channel = grpc.insecure_channel(settings.address, options)
    key = api_key(settings, f"{field}.api_key_env")
    if key:
        channel = grpc.intercept_channel(channel, _KeyInterceptor(key))
    return channel


def metadata(settings: RemoteSettings) -> list[tuple[str, str]]:
    """The call metadata carrying the API key (for calls made without grpc_channel)."""
    key = api_key(settings)
    return [(API_KEY_HEADER, key)] if key else []


class _Details(
    collections.namedtuple(
        "_Details",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _KeyInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, key: str) -> None:
        self._md = (API_KEY_HEADER, key)

    def _with_key(self, d: grpc.ClientCallDetails) -> _Details:
        md = [*(d.metadata or ()), self._md]
        return _Details(
            d.method,
            d.timeout,
            md,
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._with_key(details), request)


# -- OpenAI-compatible HTTP -------------------------------------------------------------------


def post_json(settings: RemoteSettings, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST ``body`` to ``<address>/<path>`` and return the JSON answer (one try: wrap in
    with_retry). 4xx answers other than 408/425/429 raise RemoteRejected with the server's
    message."""
    url = settings.address.rstrip("/") + "/" + path.lstrip("/")
    headers = {"Content-Type": "application/json"}
    key = api_key(settings)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=settings.tls_ca or None)
    try:
        with urllib.request.urlopen(req, timeout=settings.timeout_seconds, context=context) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code in _RETRY_HTTP:
            raise
        text = e.read()[:500].decode(errors="replace")
        raise RemoteRejected(f"{url}: HTTP {e.code}: {text}") from e
