"""ModelRegistryService: a thin gRPC adapter over ``orchestrator.model_registry``, served
by the orchestrator process (it shares the orchestrator's database and runs)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from grpc import aio

from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import registry_pb2 as rpb
from mlx_unified.v1 import registry_pb2_grpc
from orchestrator import lineage
from orchestrator.model_registry import ModelRegistry, check_name
from orchestrator.store import Store
from services.runtime import checkpoints
from services.runtime.errors import FailedPrecondition, InvalidArgument
from services.runtime.paths import confine

__all__ = ["SERVICE_NAME", "ModelRegistryServicer"]

SERVICE_NAME = rpb.DESCRIPTOR.services_by_name["ModelRegistryService"].full_name
_KINDS = {"adapter": cpb.CHECKPOINT_KIND_ADAPTER, "full": cpb.CHECKPOINT_KIND_FULL}


def _required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument.one(field, "is required")
    return value


def _positive(value: int, field: str) -> int:
    if value <= 0:
        raise InvalidArgument.one(field, "must be >= 1")
    return value


class ModelRegistryServicer(registry_pb2_grpc.ModelRegistryServiceServicer):
    def __init__(self, models: ModelRegistry, store: Store, roots: tuple) -> None:
        self.models, self.store, self.roots = models, store, roots

    def _explicit(self, given: cpb.Checkpoint) -> cpb.Checkpoint:
        """The checkpoint at a client's path (confined), completed from its manifest."""
        path = confine(_required(given.path, "checkpoint.path"), self.roots, "checkpoint.path")
        if given.kind not in cpb.CheckpointKind.values():
            raise InvalidArgument.one("checkpoint.kind", f"unknown kind {given.kind}")
        if not path.is_dir():
            raise InvalidArgument.one("checkpoint.path", f"{given.path!r} is not a directory")
        try:
            if not (path / checkpoints.MANIFEST).exists():
                return self._plain(given, path)
            return self._from_manifest(given, path, checkpoints.read_manifest(path))
        except (OSError, ValueError, TypeError, AttributeError) as e:
            # A manifest that is not what checkpoints.save writes: not a checkpoint.
            raise FailedPrecondition(
                f"{given.path!r} is not a checkpoint with a readable manifest.json "
                f"({type(e).__name__})"
            ) from None

    @staticmethod
    def _plain(given: cpb.Checkpoint, path: Path) -> cpb.Checkpoint:
        """An mlx-lm directory without our manifest (an export, a downloaded model)."""
        adapter = path / "adapter_config.json"
        if not adapter.is_file() and not (path / "config.json").is_file():
            raise FailedPrecondition(
                f"{given.path!r} is not a checkpoint (no manifest.json, config.json "
                "or adapter_config.json)"
            )
        ckpt = cpb.Checkpoint(path=str(path), kind=given.kind, base_model=given.base_model)
        if adapter.is_file():
            ckpt.kind = ckpt.kind or cpb.CHECKPOINT_KIND_ADAPTER
            base = json.loads(adapter.read_text()).get("base_model") or ""
            ckpt.base_model = ckpt.base_model or str(base)
        else:
            ckpt.kind = ckpt.kind or cpb.CHECKPOINT_KIND_FULL
        ckpt.sha256 = checkpoints.weights_sha256(path)
        return ckpt

    @staticmethod
    def _from_manifest(given: cpb.Checkpoint, path: Path, manifest: dict) -> cpb.Checkpoint:
        if not isinstance(manifest, dict):
            raise TypeError("manifest is not an object")
        ckpt = cpb.Checkpoint(path=str(path), kind=given.kind, base_model=given.base_model)
        ckpt.kind = ckpt.kind or _KINDS.get(str(manifest.get("kind", "")), 0)
        ckpt.base_model = ckpt.base_model or str(manifest.get("base_model", ""))
        ckpt.sha256 = str(manifest.get("sha256", ""))
        ckpt.step = int(manifest.get("step", 0))
        ckpt.job_id = str(manifest.get("job_id", ""))
        for k, v in dict(manifest.get("metrics") or {}).items():
            ckpt.metrics[str(k)] = float(v)
        return ckpt

    def _register(self, request: rpb.RegisterModelRequest) -> rpb.ModelVersion:
        check_name(request.name, "name")
        which = request.WhichOneof("source")
        if which == "checkpoint":
            ckpt = self._explicit(request.checkpoint)
            return self.models.register(
                request.name, ckpt, base_model=ckpt.base_model, description=request.description
            )
        if which == "run":
            run = self.store.get_run(_required(request.run.run_id, "run.run_id"))
            ckpt, lin, base = lineage.from_run(self.store, run, request.run.stage)
            return self.models.register(
                request.name, ckpt, base_model=base, lineage=lin, description=request.description
            )
        raise InvalidArgument.one("checkpoint", "is required (or run: a run's result)")

    async def RegisterModel(
        self, request: rpb.RegisterModelRequest, context: aio.ServicerContext
    ) -> rpb.RegisterModelResponse:
        version = await asyncio.to_thread(self._register, request)
        return rpb.RegisterModelResponse(version=version)

    async def ListModels(
        self, request: rpb.ListModelsRequest, context: aio.ServicerContext
    ) -> rpb.ListModelsResponse:
        items, token = self.models.list_models(request.page_size, request.page_token)
        return rpb.ListModelsResponse(models=items, next_page_token=token)

    async def GetModel(
        self, request: rpb.GetModelRequest, context: aio.ServicerContext
    ) -> rpb.GetModelResponse:
        name = _required(request.name, "name")
        return rpb.GetModelResponse(model=self.models.get_model(name))

    async def GetModelVersion(
        self, request: rpb.GetModelVersionRequest, context: aio.ServicerContext
    ) -> rpb.GetModelVersionResponse:
        name = _required(request.name, "name")
        which = request.WhichOneof("selector")
        if which == "version":
            _positive(request.version, "version")
        if which == "alias":
            _required(request.alias, "alias")
        v = self.models.get_version(name, request.version, request.alias)
        return rpb.GetModelVersionResponse(version=v)

    async def SetAlias(
        self, request: rpb.SetAliasRequest, context: aio.ServicerContext
    ) -> rpb.SetAliasResponse:
        name = _required(request.name, "name")
        _positive(request.version, "version")
        v = await asyncio.to_thread(self.models.set_alias, name, request.alias, request.version)
        return rpb.SetAliasResponse(version=v)

    async def DeleteAlias(
        self, request: rpb.DeleteAliasRequest, context: aio.ServicerContext
    ) -> rpb.DeleteAliasResponse:
        name = _required(request.name, "name")
        alias = _required(request.alias, "alias")
        await asyncio.to_thread(self.models.delete_alias, name, alias)
        return rpb.DeleteAliasResponse()

    async def DeleteModelVersion(
        self, request: rpb.DeleteModelVersionRequest, context: aio.ServicerContext
    ) -> rpb.DeleteModelVersionResponse:
        name = _required(request.name, "name")
        _positive(request.version, "version")
        await asyncio.to_thread(self.models.delete_version, name, request.version)
        return rpb.DeleteModelVersionResponse()
