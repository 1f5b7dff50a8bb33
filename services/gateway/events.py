"""Server-Sent Events over the Watch RPCs: each event's ``id`` is its seq, so a client that
reconnects with ``Last-Event-ID`` (or ``?after_seq=``) gets exactly the events after it.

The stream ends with an ``end`` event once the job or run is over (the Watch RPC closes);
a comment line every ``KEEPALIVE_S`` keeps proxies from closing an idle connection. Closing
the HTTP connection cancels the Watch call and never the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from services.gateway.errors import BackendError

KEEPALIVE_S = 15.0
RETRY_MS = 2000
_DONE = object()


def after_seq(request: Request, query_after: int | None) -> int:
    """Where to resume: the ``Last-Event-ID`` header wins over ``?after_seq=``."""
    raw = request.headers.get("last-event-id")
    if raw is not None and raw.strip():
        try:
            seq = int(raw.strip())
        except ValueError:
            raise BackendError.invalid(
                "Last-Event-ID", "must be an event seq (an integer)"
            ) from None
    else:
        seq = query_after or 0
    if seq < 0:
        raise BackendError.invalid("Last-Event-ID", "must be >= 0")
    return seq


def frame(event: str, data: Any, seq: int | None = None) -> str:
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _pump(source: AsyncIterator[Any], queue: asyncio.Queue) -> None:
    try:
        async for item in source:
            await queue.put(item)
        await queue.put(_DONE)
    except BackendError as e:
        await queue.put(e)


async def sse(
    source: AsyncIterator[Any],
    render: Callable[[Any], tuple[str, int, dict]],
    finished: Callable[[], Awaitable[bool]] | None = None,
    delivered: Callable[[Any], None] | None = None,
) -> AsyncIterator[str]:
    """SSE frames for ``source``'s items; ``render(item)`` -> (event name, seq, JSON data).

    When ``source`` ends, ``finished()`` says whether that was the end of the job or run
    (then an ``end`` event) or a service going away (then the connection just closes, and
    the client reconnects with Last-Event-ID, as EventSource does by itself).
    ``delivered(item)`` runs once the item's frame is written (the event lag metric)."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=64)
    task = asyncio.create_task(_pump(source, queue))
    try:
        yield f"retry: {RETRY_MS}\n\n"
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                yield ": keepalive\n\n"
                continue
            if item is _DONE:
                if finished is None or await finished():
                    yield frame("end", {})
                return
            if isinstance(item, BackendError):
                # Already streaming: the status line is sent, so the error is an event.
                yield frame("error", item.body())
                return
            name, seq, data = render(item)
            yield frame(name, data, seq)
            if delivered is not None:  # resumed here: the server has sent the frame
                delivered(item)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


def response(frames: AsyncIterator[str]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(frames, media_type="text/event-stream", headers=headers)
