"""GenerationService over services.runtime.generation (any service may mount it).

One client can never block another beyond its place in line:

- admission: at most ``generate_concurrency`` calls run (MLX work is serialised anyway) and
  at most ``generate_queue`` wait, first come first served; one more is RESOURCE_EXHAUSTED;
- every call is bounded in size (prompt tokens, chat messages, max_tokens: see Limits) and in
  time: it stops when its client's deadline passes, when the client cancels or goes away,
  or after ``generate_max_seconds`` without a deadline - checked between prefill chunks and
  between tokens, so a long prompt stops within one chunk of its deadline.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

from grpc import aio

from mlx_unified.v1 import generation_pb2, generation_pb2_grpc
from services.runtime import generation, top_logprobs
from services.runtime.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from services.runtime.models import resolve_model
from services.runtime.refs import resolve_adapter
from services.runtime.settings import Settings

_FINISH = {
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
}
_DONE = object()


class Admission:
    """A FIFO of calls: ``capacity`` run at once, ``queue`` may wait. ``release`` is safe
    from any thread (the generation thread frees its slot when it has really stopped)."""

    def __init__(self, capacity: int, queue: int) -> None:
        self.capacity, self.queue = max(capacity, 1), max(queue, 0)
        self.running = 0
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def acquire(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.running < self.capacity and not self._waiting:
            self.running += 1
            return
        if len(self._waiting) >= self.queue:
            raise ResourceExhausted(
                f"the generation queue is full ({self.running} running, {len(self._waiting)} "
                f"waiting; MLXU_GENERATE_CONCURRENCY / MLXU_GENERATE_QUEUE); retry later",
                reason="GENERATE_QUEUE_FULL",
                retry_after_s=1.0,
            )
        fut = self._loop.create_future()
        self._waiting.append(fut)
        try:
            await fut  # the slot is handed over by _release (running stays counted)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # handed a slot just as we were cancelled: pass it on
            else:
                self._waiting.remove(fut)
            raise

    def _release(self) -> None:
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)  # hand the slot over
                return
        self.running -= 1

    def release(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._release()
        else:
            loop.call_soon_threadsafe(self._release)


class CallBudget:
    """When one call must stop: its deadline (capped), its client's cancel."""

    def __init__(self, context: aio.ServicerContext, cap_s: float) -> None:
        remaining = context.time_remaining()
        self.capped = remaining is None or remaining > cap_s
        budget = cap_s if self.capped else remaining
        self.end = time.monotonic() + budget
        self.cap_s = cap_s
        self.gone = threading.Event()
        context.add_done_callback(lambda _ctx: self.gone.set())

    def should_stop(self) -> str | None:
        if self.gone.is_set():
            return "the client cancelled or went away"
        if time.monotonic() > self.end:
            return "deadline"
        return None

    def stopped(self, exc: generation.Stopped) -> Exception:
        if self.capped and str(exc) == "deadline":
            return DeadlineExceeded(
                f"generation stopped after {self.cap_s:g} s (MLXU_GENERATE_MAX_SECONDS); "
                "set a deadline or ask for fewer tokens"
            )
        return DeadlineExceeded(f"generation stopped: {exc}")


async def _in_one_thread(it: Iterator, on_exit: Callable[[], None]) -> AsyncIterator:
    """Drive a blocking iterator on one dedicated thread (MLX streams are thread-bound),
    handing items to the event loop; ``on_exit`` runs on that thread once it is done."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def put(item: object) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def pump() -> None:
        try:
            for item in it:
                put(item)
                if stop.is_set():
                    break
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the loop side
            put(exc)
        finally:
            close = getattr(it, "close", None)
            if close:
                close()
            on_exit()

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
        self.limits = settings.limits
        self.cache = cache or generation.ModelCache(roots=settings.allowed_roots)
        self.admission = Admission(self.limits.generate_concurrency, self.limits.generate_queue)

    async def _model(self, ref, field: str) -> tuple[str, str | None]:  # noqa: ANN001
        s = self.settings
        path = await asyncio.to_thread(
            resolve_model, ref.model, s.home, s.allowed_roots, field, offline=s.offline
        )
        adapter = None
        if ref.adapter_path:
            adapter = str(await asyncio.to_thread(resolve_adapter, ref.adapter_path, s, "model"))
        return str(path), adapter

    def _sampling(self, s: generation_pb2.SamplingParams) -> generation.Sampling:
        sampling = generation.Sampling(
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            max_tokens=s.max_tokens or min(128, self.limits.generate_max_tokens),
            stop=tuple(s.stop),
            seed=s.seed if s.HasField("seed") else None,
            repetition_penalty=s.repetition_penalty,
        )
        sampling.validate("sampling", self.limits.generate_max_tokens)
        return sampling

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        sampling = self._sampling(request.sampling)
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidArgument.one("prompt", "give a prompt or a chat conversation")
        messages = None
        if which == "prompt" and not request.prompt:
            raise InvalidArgument.one("prompt", "must not be empty")
        if which == "chat":
            if not request.chat.messages:
                raise InvalidArgument.one("chat.messages", "must not be empty")
            for i, m in enumerate(request.chat.messages):
                if not m.role:
                    raise InvalidArgument.one(f"chat.messages[{i}].role", "is required")
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        path, adapter = await self._model(request.model, "model.model")
        call = CallBudget(context, float(self.limits.generate_max_seconds))
        await self.admission.acquire()
        it = generation.generate(
            self.cache,
            path,
            adapter,
            sampling,
            prompt=request.prompt if which == "prompt" else None,
            messages=messages,
            return_logprobs=request.return_logprobs,
            should_stop=call.should_stop,
            max_prompt_tokens=self.limits.generate_max_prompt_tokens,
            prefill_chunk=self.limits.generate_prefill_chunk,
        )
        try:
            async for chunk in _in_one_thread(it, self.admission.release):
                yield generation_pb2.GenerateResponse(
                    text=chunk.text,
                    token_ids=chunk.token_ids,
                    logprobs=chunk.logprobs,
                    finish_reason=_FINISH.get(chunk.finish_reason or "", 0),
                    prompt_tokens=chunk.prompt_tokens,
                    completion_tokens=chunk.completion_tokens,
                    tokens_per_second=chunk.tokens_per_second,
                )
        except generation.Stopped as exc:
            raise call.stopped(exc) from None

    async def ScoreCompletions(
        self, request: generation_pb2.ScoreCompletionsRequest, context: aio.ServicerContext
    ) -> generation_pb2.ScoreCompletionsResponse:
        if not request.items:
            raise InvalidArgument.one("items", "must not be empty")
        path, adapter = await self._model(request.model, "model.model")
        items = [(i.prompt, i.completion) for i in request.items]
        call = CallBudget(context, float(self.limits.generate_max_seconds))
        await self.admission.acquire()

        def work() -> list[list[float]]:
            try:
                return generation.score(
                    self.cache,
                    path,
                    adapter,
                    items,
                    should_stop=call.should_stop,
                    max_tokens=self.limits.generate_max_prompt_tokens,
                )
            finally:
                self.admission.release()

        try:
            scores = await asyncio.to_thread(work)
        except generation.Stopped as exc:
            raise call.stopped(exc) from None
        return generation_pb2.ScoreCompletionsResponse(
            scores=[
                generation_pb2.CompletionScore(
                    sum_logprob=float(sum(t)), num_tokens=len(t), token_logprobs=t
                )
                for t in scores
            ]
        )

    async def TopLogprobs(
        self, request: generation_pb2.TopLogprobsRequest, context: aio.ServicerContext
    ) -> generation_pb2.TopLogprobsResponse:
        if not request.sequences:
            raise InvalidArgument.one("sequences", "must not be empty")
        path, adapter = await self._model(request.model, "model.model")
        seqs = [list(s.token_ids) for s in request.sequences]
        k = request.top_k
        call = CallBudget(context, float(self.limits.generate_max_seconds))
        await self.admission.acquire()

        def work() -> tuple[list[top_logprobs.TopK], int]:
            try:
                return top_logprobs.top_logprobs(
                    self.cache,
                    path,
                    adapter,
                    seqs,
                    k,
                    vocab_limit=request.vocab_limit,
                    should_stop=call.should_stop,
                    max_tokens=self.limits.generate_max_prompt_tokens,
                    max_items=self.limits.score_max_items,
                )
            finally:
                self.admission.release()

        try:
            results, vocab = await asyncio.to_thread(work)
        except generation.Stopped as exc:
            raise call.stopped(exc) from None
        return generation_pb2.TopLogprobsResponse(
            results=[
                generation_pb2.SequenceTopLogprobs(
                    positions=len(r.rest),
                    token_ids=r.idx.reshape(-1).tolist(),
                    logprobs=r.top.reshape(-1).tolist(),
                    rest_logprob=r.rest.tolist(),
                )
                for r in results
            ],
            vocab_size=vocab,
            top_k=k,
        )

    async def DescribeModel(
        self, request: generation_pb2.DescribeModelRequest, context: aio.ServicerContext
    ) -> generation_pb2.DescribeModelResponse:
        path, adapter = await self._model(request.model, "model.model")
        info = await asyncio.to_thread(top_logprobs.describe, self.cache, path, adapter)
        return generation_pb2.DescribeModelResponse(
            tokenizer_fingerprint=info.fingerprint,
            vocab_size=info.vocab_size,
            tokenizer_json=(info.tokenizer_json or "") if request.include_tokenizer else "",
            num_layers=info.num_layers,
            hidden_size=info.hidden_size,
        )

    async def SampleTokens(
        self, request: generation_pb2.SampleTokensRequest, context: aio.ServicerContext
    ) -> generation_pb2.SampleTokensResponse:
        if not request.prompts:
            raise InvalidArgument.one("prompts", "must not be empty")
        prompts = [list(p.token_ids) for p in request.prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise InvalidArgument.one(f"prompts[{i}].token_ids", "must not be empty")
        n = request.n or 1
        rows = self.limits.score_max_items
        if not n >= 1 or len(prompts) * n > rows:
            raise InvalidArgument.one(
                "n", f"prompts x n is {len(prompts) * n}; at most {rows} (MLXU_SCORE_MAX_ITEMS)"
            )
        sampling = self._sampling(request.sampling)
        if sampling.temperature == 0:  # rollouts sample: 0 is the default, 1.0
            sampling = dataclasses.replace(sampling, temperature=1.0)
        seed = request.seed if request.HasField("seed") else None
        path, adapter = await self._model(request.model, "model.model")
        call = CallBudget(context, float(self.limits.generate_max_seconds))
        await self.admission.acquire()

        def work() -> list[generation.Sampled]:
            try:
                return generation.sample_tokens(
                    self.cache, path, adapter, prompts, n, sampling, seed,
                    should_stop=call.should_stop,
                )  # fmt: skip
            finally:
                self.admission.release()

        try:
            out = await asyncio.to_thread(work)
        except generation.Stopped as exc:
            raise call.stopped(exc) from None
        return generation_pb2.SampleTokensResponse(
            completions=[
                generation_pb2.TokenCompletion(
                    token_ids=c.token_ids,
                    logprobs=c.logprobs,
                    finish_reason=_FINISH[c.finish_reason],
                )
                for c in out
            ],
            policy_version=request.policy_version,
        )
