"""Core training service (port 8500): thin gRPC adapters over the shared job host.

TrainingService (StartSFT, StartExport) + JobService + GenerationService.
"""

from __future__ import annotations

from grpc import aio

from mlx_unified.v1 import (
    common_pb2,
    common_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from services.runtime.rpc.generation_servicer import GenerationServicer
from services.runtime.rpc.jobs_servicer import JobServicer, JobsHost
from services.runtime.rpc.server import ServiceHandle
from services.runtime.rpc.starts import add_start_handlers
from services.runtime.settings import Settings


@add_start_handlers("training")
class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    """StartSFT and StartExport, from services.registry (see rpc/starts.py)."""

    def __init__(self, host: JobsHost) -> None:
        self.host = host


async def register(server: aio.Server, settings: Settings) -> ServiceHandle:
    host = JobsHost.open(settings)
    training_pb2_grpc.add_TrainingServiceServicer_to_server(TrainingServicer(host), server)
    common_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(host), server)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(
        GenerationServicer(settings), server
    )
    names = [
        training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name,
        common_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
        generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    ]
    return ServiceHandle(names=names, on_start=host.on_start, on_stop=host.on_stop)
