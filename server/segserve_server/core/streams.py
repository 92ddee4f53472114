"""One answer per request of a bidirectional stream, in request order, while later ones run.

Shared by both gRPC surfaces (segserve.v1 SegmentStream and the KServe ModelStreamInfer).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["StreamDrained", "ordered_answers"]

R = TypeVar("R")
A = TypeVar("A")


class StreamDrained(Exception):
    """The server began draining before the stream ended: every request read was answered."""


class _Drained:
    pass


async def _next_or_drain(
    requests: AsyncIterator[R], draining: asyncio.Event | None
) -> R | _Drained | None:
    """The next request, None at the end of the stream, or _Drained if the drain comes first."""
    read = asyncio.ensure_future(anext(requests, None))
    if draining is None:
        return await read
    drained = asyncio.ensure_future(draining.wait())
    try:
        done, _ = await asyncio.wait({read, drained}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        drained.cancel()
    if read in done:
        return read.result()
    read.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await read
    return _Drained()


async def ordered_answers(
    requests: AsyncIterator[R],
    answer: Callable[[R], Coroutine[Any, Any, A]],
    *,
    max_inflight: int,
    draining: asyncio.Event | None = None,
) -> AsyncIterator[A]:
    """Yields answer(request) for every request, in request order.

    At most max_inflight requests are read and not yet answered (running, or done and waiting to
    be sent): beyond that reading waits, and gRPC flow control holds the client back, also when
    the client is slow to read. `answer` must not raise: it turns failures into answers. When
    `draining` is set, reading stops, every request read is answered, then StreamDrained.
    """
    slots = asyncio.Semaphore(max_inflight)
    answers: asyncio.Queue[asyncio.Task[A] | None] = asyncio.Queue()
    drained = False

    async def read() -> None:
        nonlocal drained
        try:
            while True:
                request = await _next_or_drain(requests, draining)
                if request is None:
                    return
                if isinstance(request, _Drained):
                    drained = True
                    return
                await slots.acquire()  # given back once the request's answer is sent
                answers.put_nowait(asyncio.create_task(answer(request)))
        finally:
            answers.put_nowait(None)

    reader = asyncio.create_task(read())
    pending: list[asyncio.Task[A]] = []
    try:
        while (task := await answers.get()) is not None:
            pending.append(task)
            result = await task
            pending.remove(task)
            yield result
            slots.release()
        await reader
    finally:
        reader.cancel()
        for task in pending:
            task.cancel()
        while not answers.empty():
            leftover = answers.get_nowait()
            if leftover is not None:
                leftover.cancel()
    if drained:
        raise StreamDrained()
