"""The model-registry calls of MLXUClient (ModelRegistryService, on the orchestrator's
address): register, list, show, tag (aliases) and delete versions.

    c.register_model("chat-bot", run_id=run.run_id)          # the run's result, with lineage
    c.set_alias("chat-bot", "production", 3)
    c.create_pipeline(spec)   # spec.base_model.model = "chat-bot:production" resolves to v3

``ModelCalls`` is a base class of MLXUClient.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf.message import Message

from clients.client_connection import Connection
from mlx_unified.v1 import common_pb2, registry_pb2_grpc
from mlx_unified.v1 import registry_pb2 as rpb


class ModelCalls(Connection):
    def _models(self, method: str, request: Message) -> Any:
        return self._call(
            "orchestrator", registry_pb2_grpc.ModelRegistryServiceStub, method, request
        )

    def register_model(
        self,
        name: str,
        *,
        path: str = "",
        run_id: str = "",
        stage: str = "",
        base_model: str = "",
        description: str = "",
    ) -> rpb.ModelVersion:
        """A new version of ``name``: the checkpoint at ``path``, or run ``run_id``'s result
        (``stage``'s, when given)."""
        req = rpb.RegisterModelRequest(name=name, description=description)
        if run_id:
            req.run.CopyFrom(rpb.RunResultSource(run_id=run_id, stage=stage))
        elif path:
            req.checkpoint.CopyFrom(common_pb2.Checkpoint(path=path, base_model=base_model))
        return self._models("RegisterModel", req).version

    def list_models(self, page_size: int = 100) -> Iterator[rpb.RegisteredModel]:
        token = ""
        while True:
            req = rpb.ListModelsRequest(page_size=page_size, page_token=token)
            resp = self._models("ListModels", req)
            yield from resp.models
            token = resp.next_page_token
            if not token:
                return

    def get_model(self, name: str) -> rpb.RegisteredModel:
        return self._models("GetModel", rpb.GetModelRequest(name=name)).model

    def get_model_version(
        self, name: str, version: int | None = None, alias: str | None = None
    ) -> rpb.ModelVersion:
        """By number, by alias, or (neither) the latest."""
        req = rpb.GetModelVersionRequest(name=name)
        if version is not None:
            req.version = version
        elif alias is not None:
            req.alias = alias
        return self._models("GetModelVersion", req).version

    def set_alias(self, name: str, alias: str, version: int) -> rpb.ModelVersion:
        req = rpb.SetAliasRequest(name=name, alias=alias, version=version)
        return self._models("SetAlias", req).version

    def delete_alias(self, name: str, alias: str) -> None:
        self._models("DeleteAlias", rpb.DeleteAliasRequest(name=name, alias=alias))

    def delete_model_version(self, name: str, version: int) -> None:
        req = rpb.DeleteModelVersionRequest(name=name, version=version)
        self._models("DeleteModelVersion", req)
