"""The web dashboard at ``/`` (pages under ``/ui/``): pipelines, runs, jobs and models, a run's
or job's live curves, a form that creates a run from a template, and a cancel button.

The pages are HTML shells rendered here with Jinja2; they hold no data. The browser fills
them from the gateway's own JSON API (``/v1/...``) and follows runs and jobs over its SSE
streams (``/v1/runs/{id}/events``, ``/v1/jobs/{service}/{id}/events``) with
static/dashboard.js, so there is one data path, and the API key (when keys are configured)
travels in the ``X-API-Key`` header the API already checks. The charts are uPlot, vendored
under static/vendor/uplot/ (no CDN, no Node build step). docs/dashboard.md is the guide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from clients.client_connection import TRAINER_SERVICES
from services.gateway.errors import BackendError

HERE = Path(__file__).resolve().parent
STATIC = "/ui/static"
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(prefix="/ui", include_in_schema=False)


def _page(request: Request, name: str, title: str, **context: Any) -> HTMLResponse:
    ctx = {"page": name, "title": title, "static": STATIC, "services": TRAINER_SERVICES}
    return templates.TemplateResponse(request, f"{name}.html", ctx | context)


@router.get("/", response_class=HTMLResponse)
async def runs(request: Request) -> HTMLResponse:
    return _page(request, "runs", "Runs")


@router.get("/pipelines", response_class=HTMLResponse)
async def pipelines(request: Request) -> HTMLResponse:
    return _page(request, "pipelines", "Pipelines")


@router.get("/jobs", response_class=HTMLResponse)
async def jobs(request: Request) -> HTMLResponse:
    return _page(request, "jobs", "Jobs")


@router.get("/models", response_class=HTMLResponse)
async def models(request: Request) -> HTMLResponse:
    return _page(request, "models", "Models")


@router.get("/runs/{run_id}", response_class=HTMLResponse)
async def run(request: Request, run_id: str) -> HTMLResponse:
    return _page(request, "run", f"Run {run_id}", run_id=run_id)


@router.get("/jobs/{service}/{job_id}", response_class=HTMLResponse)
async def job(request: Request, service: str, job_id: str) -> HTMLResponse:
    if service not in TRAINER_SERVICES:
        raise BackendError.invalid("service", f"jobs live on {', '.join(TRAINER_SERVICES)}")
    return _page(request, "job", f"Job {job_id}", service=service, job_id=job_id)


async def _home() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


def install(app: FastAPI) -> None:
    """Serve the pages, their static files, and ``/`` as a way in."""
    app.include_router(router)
    app.mount(STATIC, StaticFiles(directory=HERE / "static"), name="ui-static")
    app.add_api_route("/", _home, include_in_schema=False)
