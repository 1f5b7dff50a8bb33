"""`mlxu serve generation` (port 8800): GenerationService alone, for any model the allowed
roots (or the model registry) hold, adapters hot-loaded by checkpoint path (the ModelCache
keys by (model, adapter)). What a trainer's remote teacher talks to (docs/remote.md)."""

from __future__ import annotations

from grpc import aio

from mlx_unified.v1 import generation_pb2, generation_pb2_grpc
from services.runtime.generation import ModelCache
from services.runtime.rpc.generation_servicer import GenerationServicer
from services.runtime.rpc.server import ServiceHandle
from services.runtime.settings import Settings, _env_int


async def register(server: aio.Server, settings: Settings) -> ServiceHandle:
    # More than the training service's 2: one base with several adapters is the usual case.
    cache = ModelCache(size=_env_int("MLXU_GENERATION_MODELS", 4), roots=settings.allowed_roots)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(
        GenerationServicer(settings, cache), server
    )
    return ServiceHandle(
        names=[generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name]
    )
