"""grpc.health.v1.Health with all three methods: Check, Watch and List.

grpcio-health-checking (1.85 here) implements only Check and Watch; List, added to
health.proto in 2024, is inherited from the generated base servicer, which raises
NotImplementedError. Behind the error interceptor that surfaced as INTERNAL, so a probe
or `grpcurl ... grpc.health.v1.Health/List` saw a server fault instead of the statuses.
"""

from __future__ import annotations

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2

# health.proto: "The server may respond with a RESOURCE_EXHAUSTED error if too many
# services exist." A service registers a handful of names; this only bounds a bug.
MAX_LISTED = 100


class HealthServicer(health.aio.HealthServicer):
    async def List(
        self, request: health_pb2.HealthListRequest, context: aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        # A snapshot: statuses set later (stop() marks NOT_SERVING) show in the next List.
        statuses = dict(self._server_status)
        if len(statuses) > MAX_LISTED:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(statuses)} services registered; List answers at most {MAX_LISTED}",
            )
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in statuses.items()
            }
        )
