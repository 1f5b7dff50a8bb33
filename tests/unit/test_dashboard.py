"""The dashboard's pages as the gateway serves them (no browser: tests/integration/
test_dashboard.py drives a real one): shells with no data in them, escaped ids, the vendored
chart library, and the gateway's error shape for a bad service."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.runtime.settings import Settings

STATIC = Path(__file__).resolve().parents[2] / "services" / "gateway" / "static"


def _client(tmp_path: Path, **kw: object) -> TestClient:
    return TestClient(create_app(Settings.from_env("gateway", home=tmp_path, **kw)))


def test_pages_are_served_without_a_key_and_hold_no_data(tmp_path: Path) -> None:
    # With keys configured the pages still open: they carry no data, the API calls
    # they make send the key.
    with _client(tmp_path, api_keys=frozenset({"k"})) as c:
        r = c.get("/", follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/ui/"
        for path in ("/ui/", "/ui/pipelines", "/ui/jobs", "/ui/models", "/ui/runs/r-1"):
            r = c.get(path)
            assert r.status_code == 200, path
            assert r.headers["content-type"].startswith("text/html")
            assert "/ui/static/vendor/uplot/uPlot.iife.min.js" in r.text
        assert c.get("/v1/runs").status_code == 401  # the data still needs the key
        assert c.get("/ui/jobs/training/job-1").status_code == 200
        assert "/ui/" not in c.get("/openapi.json").json()["paths"]


def test_ids_are_escaped_and_a_bad_service_is_a_400(tmp_path: Path) -> None:
    with _client(tmp_path) as c:
        r = c.get("/ui/runs/r-<script>x")
        assert "<script>x" not in r.text and "&lt;script&gt;x" in r.text
        r = c.get("/ui/jobs/nope/job-1")
        assert r.status_code == 400 and r.json()["error"]["violations"][0]["field"] == "service"


def test_static_files_and_the_vendored_library(tmp_path: Path) -> None:
    with _client(tmp_path) as c:
        for name in ("api.js", "charts.js", "dashboard.js", "dashboard.css"):
            assert c.get(f"/ui/static/{name}").status_code == 200, name
        lib = c.get("/ui/static/vendor/uplot/uPlot.iife.min.js")
        assert lib.status_code == 200 and "uPlot (v1.6.32)" in lib.text
    assert "MIT" in (STATIC / "vendor" / "uplot" / "LICENSE").read_text()
