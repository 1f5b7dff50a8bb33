"""GenerationService over services.runtime.generation (any service may mount it)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

from grpc import aio

from mlx_unified.v1 import generation_pb2, generation_pb2_grpc
from services.runtime import generation
from services.runtime.errors import InvalidArgument
from services.runtime.models import resolve_model
from services.runtime.paths import confine
from services.runtime.settings import Settings

_FINISH = {
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
}


_DONE = object()


async def _in_one_thread(it: Iterator) -> AsyncIterator:
    """Drive a blocking iterator on one dedicated thread (MLX streams are thread-bound),
    handing items to the event loop; a client that goes away stops it at the next item."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def pump() -> None:
        try:
            for item in it:
                loop.call_soon_threadsafe(queue.put_nowait, item)
                if stop.is_set():
                    break
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the loop side
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            close = getattr(it, "close", None)
            if close:
                close()

    thread = threading.Thread(target=pump, name="generate", daemon=True)
    thread.start()
    try:
        while (item := await queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, settings: Settings, cache: generation.ModelCache | None = None) -> None:
        self.settings = settings
        self.cache = cache or generation.ModelCache()

    async def _model(self, ref, field: str) -> tuple[str, str | None]:  # noqa: ANN001
        path = await asyncio.to_thread(
            resolve_model, ref.model, self.settings.home, self.settings.allowed_roots, field
        )
        adapter = None
        if ref.adapter_path:
            adapter = str(confine(ref.adapter_path, self.settings.allowed_roots, f"{field}_path"))
        return str(path), adapter

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        s = request.sampling
        sampling = generation.Sampling(
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            max_tokens=s.max_tokens or 128,
            stop=tuple(s.stop),
            seed=s.seed if s.HasField("seed") else None,
            repetition_penalty=s.repetition_penalty,
        )
        sampling.validate("sampling")
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidArgument.one("prompt", "give a prompt or a chat conversation")
        messages = None
        if which == "chat":
            if not request.chat.messages:
                raise InvalidArgument.one("chat.messages", "must not be empty")
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        path, adapter = await self._model(request.model, "model.model")
        it = generation.generate(
            self.cache,
            path,
            adapter,
            sampling,
            prompt=request.prompt if which == "prompt" else None,
            messages=messages,
            return_logprobs=request.return_logprobs,
        )
        async for chunk in _in_one_thread(it):
            yield generation_pb2.GenerateResponse(
                text=chunk.text,
                token_ids=chunk.token_ids,
                logprobs=chunk.logprobs,
                finish_reason=_FINISH.get(chunk.finish_reason or "", 0),
                prompt_tokens=chunk.prompt_tokens,
                completion_tokens=chunk.completion_tokens,
                tokens_per_second=chunk.tokens_per_second,
            )

    async def ScoreCompletions(
        self, request: generation_pb2.ScoreCompletionsRequest, context: aio.ServicerContext
    ) -> generation_pb2.ScoreCompletionsResponse:
        if not request.items:
            raise InvalidArgument.one("items", "must not be empty")
        if len(request.items) > 256:
            raise InvalidArgument.one("items", "at most 256 items per call")
        path, adapter = await self._model(request.model, "model.model")
        items = [(i.prompt, i.completion) for i in request.items]
        scores = await asyncio.to_thread(generation.score, self.cache, path, adapter, items)
        return generation_pb2.ScoreCompletionsResponse(
            scores=[
                generation_pb2.CompletionScore(
                    sum_logprob=float(sum(t)), num_tokens=len(t), token_logprobs=t
                )
                for t in scores
            ]
        )
