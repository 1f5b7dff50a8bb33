"""The shared remote-call helpers: settings validation, retry with backoff within a deadline,
the API key taken from the service's environment."""

from __future__ import annotations

import urllib.error

import pytest

from services.runtime import remote
from services.runtime.errors import InvalidArgument
from services.schema.common import RemoteSettings
from services.schema.distill import TeacherSettings


def test_endpoint_is_grpc_shorthand_and_bad_addresses_are_named() -> None:
    t = TeacherSettings.rehydrate({"endpoint": "127.0.0.1:5"})
    assert t.backend.kind == "grpc" and t.backend.address == "127.0.0.1:5"
    with pytest.raises(InvalidArgument) as e:
        RemoteSettings.from_dict(
            {"kind": "openai", "address": "127.0.0.1:8080", "api_key_env": "a-b"}, prefix="r"
        )
    fields = {v.field for v in e.value.violations}
    assert fields == {"r.address", "r.api_key_env"}


def test_retry_gives_up_at_the_deadline_with_the_reason() -> None:
    s = RemoteSettings.from_dict({"address": "127.0.0.1:1", "retry_deadline_seconds": 0.2})
    calls = []

    def call() -> None:
        calls.append(1)
        raise urllib.error.URLError("connection refused")

    with pytest.raises(remote.RemoteUnavailable, match="unreachable for 0.2 s.*refused"):
        remote.with_retry(call, s, "teacher", initial_s=0.01)
    assert len(calls) >= 2


def test_retry_recovers_and_permanent_errors_are_not_retried() -> None:
    s = RemoteSettings.from_dict({"address": "127.0.0.1:1"})
    answers = iter([ConnectionRefusedError("down"), TimeoutError("slow"), "ok"])

    def flaky() -> str:
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    assert remote.with_retry(flaky, s, "rollout", sleep=lambda _s: None) == "ok"
    with pytest.raises(remote.RemoteRejected):
        remote.with_retry(
            lambda: (_ for _ in ()).throw(remote.RemoteRejected("HTTP 400")), s, "rollout"
        )


def test_api_key_comes_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    s = RemoteSettings.from_dict({"address": "127.0.0.1:1", "api_key_env": "MLXU_TEST_KEY"})
    monkeypatch.delenv("MLXU_TEST_KEY", raising=False)
    with pytest.raises(InvalidArgument, match="MLXU_TEST_KEY is not set"):
        remote.api_key(s)
    monkeypatch.setenv("MLXU_TEST_KEY", "s3cret")
    assert remote.metadata(s) == [("x-api-key", "s3cret")]
