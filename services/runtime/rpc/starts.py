"""The Start RPCs of every training method, built from services.registry.

Each Start handler is the same three steps: turn the request's spec into the trainer's
config (the method's ``prepare``: resolve and confine paths, validate every field and row,
in a thread), record the job on the service's JobsHost (idempotent on ``request_id``), and
answer with the job (with ``validate_only``: the first step only, no job).
``add_start_handlers`` puts one such handler on a servicer class for
each of the service's methods, so a new method needs no servicer code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.message import Message
from grpc import aio

from services import registry

__all__ = ["add_start_handlers", "start_handler"]


def start_handler(method: registry.Method) -> Callable[..., Awaitable[Message]]:
    """``async (self, request, context) -> <Method>Response`` for a servicer with ``host``."""
    prepare = None

    async def handler(self: Any, request: Any, context: aio.ServicerContext) -> Message:
        nonlocal prepare
        prepare = prepare or registry.load(method.prepare)
        config = await asyncio.to_thread(prepare, request.spec, self.host.settings)
        if request.validate_only:  # every check Start makes, and no job
            return method.response(created=False)
        job, created = await self.host.start_job(
            method.name,
            method.trainer,
            config,
            request_id=request.request_id,
            output_name=request.spec.output_name,
            labels=dict(request.spec.labels),
        )
        return method.response(job=job, created=created)

    handler.__name__ = handler.__qualname__ = method.rpc
    handler.__doc__ = f"{method.rpc}: start a {method.name} job ({method.trainer})."
    return handler


def add_start_handlers(service: str) -> Callable[[type], type]:
    """Class decorator: define every ``service`` method's Start RPC on the servicer class."""

    def decorate(servicer_cls: type) -> type:
        for method in registry.of_service(service):
            setattr(servicer_cls, method.rpc, start_handler(method))
        return servicer_cls

    return decorate
