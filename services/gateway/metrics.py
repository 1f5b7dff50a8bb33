"""Prometheus metrics at ``GET /metrics`` (prometheus_client's text format, names ``mlxu_``).

The gateway holds no state, so the platform's gauges are read from the services at scrape
time (ListJobs on each trainer service, their health): jobs by service, kind and state, the
queue depth, each running job's steps/s and tokens/s, and whether each service answers. The
gateway's own traffic is counted as it happens: requests by method, route and status, and
their latency, and the event lag (``mlxu_event_lag_seconds``): how long after a job or run
event was recorded (its ``time``) the gateway delivered it to an SSE watcher,
``phase="live"`` for events recorded while the watch was open, ``"replay"`` for stored ones
a (re)connect asked for. With API keys configured the scrape sends ``X-API-Key`` like any
caller (Prometheus: ``http_headers`` or ``authorization`` in the scrape config).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from clients.client_connection import TRAINER_SERVICES
from mlx_unified.v1 import common_pb2 as cpb
from services.gateway import deps
from services.gateway.backends import Backends
from services.gateway.errors import BackendError
from services.gateway.resources import JOBS

router = APIRouter()
PAGE = 500
MAX_PAGES = 20  # at most 10,000 jobs a service per scrape


class Http:
    """The gateway's own request counters (one per app, so tests can run several)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "mlxu_http_requests",
            "HTTP requests answered by the gateway",
            ["method", "route", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "mlxu_http_request_seconds",
            "Time to the end of the response (SSE streams: the whole stream)",
            ["method", "route"],
            registry=registry,
            buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.event_lag = Histogram(
            "mlxu_event_lag_seconds",
            "From a job or run event's recorded time to its delivery to an SSE watcher",
            ["stream", "phase"],
            registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
        )

    def observe(self, scope: dict[str, Any], status: int, seconds: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"  # the template, not the ids
        method = str(scope.get("method", ""))
        self.requests.labels(method, path, str(status)).inc()
        self.seconds.labels(method, path).observe(seconds)

    def delivered(self, stream: str, created: float, opened: float) -> None:
        """An event recorded at ``created`` (epoch s) reached a watcher whose stream opened
        at ``opened``. Service and gateway clocks are compared: a skew shows as lag, never
        below zero."""
        phase = "live" if created >= opened else "replay"
        self.event_lag.labels(stream, phase).observe(max(0.0, time.time() - created))


def install(app: Any) -> Http:
    registry = CollectorRegistry()
    app.state.metrics_registry = registry
    app.state.http_metrics = Http(registry)
    return app.state.http_metrics


async def _jobs(b: Backends, service: str, key: str | None) -> list[cpb.Job] | None:
    jobs: list[cpb.Job] = []
    token = ""
    for _ in range(MAX_PAGES):
        req = cpb.ListJobsRequest(page_size=PAGE, page_token=token)
        try:
            resp = await b.call(service, JOBS, "ListJobs", req, key)
        except BackendError as e:
            if e.code.name == "UNAUTHENTICATED":
                raise
            return None  # down or not configured: mlxu_service_up says so
        jobs.extend(resp.jobs)
        token = resp.next_page_token
        if not token:
            break
    return jobs


async def _families(b: Backends, key: str | None) -> list[GaugeMetricFamily]:
    services = [s for s in TRAINER_SERVICES if b.addresses.get(s)]
    health, listed = await asyncio.gather(
        b.health(), asyncio.gather(*(_jobs(b, s, key) for s in services))
    )
    up = GaugeMetricFamily(
        "mlxu_service_up", "1 when the service answers SERVING", labels=["service"]
    )
    for service, state in health.items():
        up.add_metric([service], 1.0 if state == "SERVING" else 0.0)
    by_state = GaugeMetricFamily(
        "mlxu_jobs", "Jobs by service, kind and state", labels=["service", "kind", "state"]
    )
    queue = GaugeMetricFamily("mlxu_queue_depth", "PENDING jobs", labels=["service"])
    steps = GaugeMetricFamily(
        "mlxu_job_steps_per_second",
        "A running job's optimizer steps/s",
        labels=["service", "kind", "job_id"],
    )
    tokens = GaugeMetricFamily(
        "mlxu_job_tokens_per_second",
        "A running job's tokens/s",
        labels=["service", "kind", "job_id"],
    )
    for service, jobs in zip(services, listed, strict=True):
        if jobs is None:
            continue
        counts: dict[tuple[str, str], int] = {}
        for job in jobs:
            state = cpb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
            counts[(job.kind, state)] = counts.get((job.kind, state), 0) + 1
            if job.state == cpb.JOB_STATE_RUNNING:
                labels = [service, job.kind, job.job_id]
                if "steps_per_second" in job.metrics:
                    steps.add_metric(labels, job.metrics["steps_per_second"])
                if "tokens_per_second" in job.metrics:
                    tokens.add_metric(labels, job.metrics["tokens_per_second"])
        for (kind, state), n in sorted(counts.items()):
            by_state.add_metric([service, kind, state], float(n))
        queue.add_metric([service], float(counts_of(counts, "pending")))
    return [up, by_state, queue, steps, tokens]


def counts_of(counts: dict[tuple[str, str], int], state: str) -> int:
    return sum(n for (_, s), n in counts.items() if s == state)


@router.get("/metrics", tags=["health"], summary="Prometheus metrics (text format, mlxu_*)")
async def metrics(
    request: Request,
    b: Backends = Depends(deps.backends),
    key: str | None = Depends(deps.api_key),
) -> Response:
    start = time.monotonic()
    families = await _families(b, key)
    own = generate_latest(request.app.state.metrics_registry).decode()
    scrape = GaugeMetricFamily("mlxu_scrape_seconds", "Time to read the services for this scrape")
    scrape.add_metric([], time.monotonic() - start)
    once = CollectorRegistry()
    once.register(_Fixed([*families, scrape]))
    text = own + generate_latest(once).decode()
    return Response(text, media_type=CONTENT_TYPE_LATEST)


class _Fixed:
    def __init__(self, families: list[GaugeMetricFamily]) -> None:
        self.families = families

    def collect(self) -> list[GaugeMetricFamily]:
        return self.families
