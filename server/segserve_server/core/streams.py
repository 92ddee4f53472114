"""One answer per request of a bidirectional stream, in request order, while later ones run.

Shared by both stream APIs (segserve.v1 SegmentStream and the KServe ModelStreamInfer). The
rules, for every request read:

- Order: answers go out in the order requests were read, each exactly once.
- Flow control: at most `max_inflight` requests are processed at once. A QUEUE request keeps
  its place until its answer has been sent, so at most max_inflight requests are read and not
  yet sent, and a client that stops reading soon stops the server reading; when every place is
  taken, reading waits with the request in hand (gRPC flow control then holds the client back).
- Latest frame wins (`latest(request)`, stream policy LATEST): reading does not wait for a
  place. A LATEST request that finds none waits in a one-request mailbox; a newer one replaces
  it, and the replaced one is answered `dropped(request)` at once. A LATEST request gives its
  place back as soon as its answer is ready. Requests read and not yet sent are bounded by
  `max_unsent`: past it, reading waits.
- Drain (`draining` set): reading stops, every request read is answered, then StreamDrained.
- Deadline (`cut_at_s`, time.monotonic(), set shortly before the call's deadline): reading
  stops, every request not answered yet is answered `cut(request)` and its work cancelled, the
  answers are sent while the transport still carries them, then StreamCut.

`answer` must not raise: it turns failures into answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["StreamCut", "StreamDrained", "ordered_answers"]

R = TypeVar("R")
A = TypeVar("A")


class StreamDrained(Exception):
    """The server began draining before the stream ended: every request read was answered."""


class StreamCut(Exception):
    """The call's deadline was near: every request read was answered (cut ones as such)."""


@dataclass(eq=False)
class _Entry(Generic[R, A]):
    request: R
    answer: asyncio.Future[A]
    release_on_send: bool
    task: asyncio.Task[None] | None = None


async def _wait(event: asyncio.Event, condition: Callable[[], bool]) -> None:
    """Waits until condition() holds, re-checked each time `event` is set."""
    while not condition():
        event.clear()
        if condition():
            return
        await event.wait()


@dataclass(eq=False)
class _Pump(Generic[R, A]):
    answer: Callable[[R], Coroutine[Any, Any, A]]
    free: int
    latest: Callable[[R], bool]
    dropped: Callable[[R], A] | None
    entries: deque[_Entry[R, A]] = field(default_factory=deque)
    mailbox: _Entry[R, A] | None = None
    place_freed: asyncio.Event = field(default_factory=asyncio.Event)
    entry_changed: asyncio.Event = field(default_factory=asyncio.Event)
    sent: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self, entry: _Entry[R, A]) -> None:
        """Runs the entry's request on a place already taken for it."""

        async def run() -> None:
            result = await self.answer(entry.request)
            if not entry.answer.done():
                entry.answer.set_result(result)
            if not entry.release_on_send:
                self.release()

        entry.task = asyncio.create_task(run())
        entry.answer.add_done_callback(lambda _: self.entry_changed.set())

    def release(self) -> None:
        """A place is free: the mailbox's request takes it, else it is counted free."""
        waiting, self.mailbox = self.mailbox, None
        if waiting is not None and not waiting.answer.done():
            self.start(waiting)
        else:
            self.free += 1
            self.place_freed.set()

    def take(self, request: R) -> _Entry[R, A] | None:
        """Queues the request's answer and starts it if a place is free. Returns the entry if
        it must wait for a place (a QUEUE request), else None."""
        latest = self.latest(request)
        entry = _Entry[R, A](request, asyncio.get_running_loop().create_future(), not latest)
        self.entries.append(entry)
        self.entry_changed.set()
        if self.free > 0:
            self.free -= 1
            self.start(entry)
            return None
        if not latest or self.dropped is None:
            return entry
        replaced, self.mailbox = self.mailbox, entry
        if replaced is not None and not replaced.answer.done():
            replaced.answer.set_result(self.dropped(replaced.request))
            self.entry_changed.set()
        return None

    def cut_all(self, cut: Callable[[R], A]) -> None:
        self.mailbox = None
        for entry in self.entries:
            if not entry.answer.done():
                entry.answer.set_result(cut(entry.request))
            if entry.task is not None:
                entry.task.cancel()

    def cancel_all(self) -> None:
        for entry in self.entries:
            if entry.task is not None:
                entry.task.cancel()
            entry.answer.cancel()


_END: Any = object()


async def ordered_answers(
    requests: AsyncIterator[R],
    answer: Callable[[R], Coroutine[Any, Any, A]],
    *,
    max_inflight: int,
    draining: asyncio.Event | None = None,
    max_unsent: int = 256,
    latest: Callable[[R], bool] = lambda request: False,
    dropped: Callable[[R], A] | None = None,
    cut: Callable[[R], A] | None = None,
    cut_at_s: float | None = None,
) -> AsyncIterator[A]:
    """Yields answer(request) (or dropped / cut) for every request, in request order; see the
    module doc for flow control, LATEST, the drain and the deadline cut."""
    loop = asyncio.get_running_loop()
    pump = _Pump[R, A](answer, max_inflight, latest, dropped)
    max_unsent = max(max_unsent, max_inflight + 1)  # QUEUE: one more, waiting for a place
    stop: asyncio.Future[type[Exception]] = loop.create_future()

    def stop_with(why: type[Exception]) -> None:
        if not stop.done():
            stop.set_result(why)
            pump.entry_changed.set()
            pump.place_freed.set()
            pump.sent.set()

    drained = asyncio.ensure_future(draining.wait()) if draining is not None else None
    if drained is not None:
        drained.add_done_callback(lambda _: stop_with(StreamDrained))
    timer = (
        loop.call_later(max(0.0, cut_at_s - time.monotonic()), stop_with, StreamCut)
        if cut_at_s is not None and cut is not None
        else None
    )

    def cutting() -> bool:
        return stop.done() and stop.result() is StreamCut

    async def read() -> None:
        while True:
            await _wait(pump.sent, lambda: len(pump.entries) < max_unsent or stop.done())
            if stop.done():
                return
            reading: asyncio.Future[Any] = asyncio.ensure_future(anext(requests, _END))
            await asyncio.wait([reading, stop], return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await reading
                return
            request = reading.result()
            if request is _END:
                return
            waiting = pump.take(request)
            if waiting is not None:  # read, so it is answered even if the stream stops now
                await _wait(pump.place_freed, lambda: pump.free > 0 or cutting())
                if not cutting():
                    pump.free -= 1
                    pump.start(waiting)

    reader = asyncio.create_task(read())
    reader.add_done_callback(lambda _: pump.entry_changed.set())
    why: type[Exception] | None = None
    try:
        while True:
            if pump.entries:
                entry = pump.entries[0]
                if not entry.answer.done():
                    if cutting():
                        assert cut is not None
                        pump.cut_all(cut)
                    else:
                        await _wait(
                            pump.entry_changed,
                            lambda head=entry.answer: head.done() or cutting(),  # type: ignore[misc]
                        )
                        continue
                pump.entries.popleft()
                yield entry.answer.result()
                if entry.release_on_send and entry.task is not None:
                    pump.release()
                pump.sent.set()
                continue
            if reader.done():
                break
            await _wait(pump.entry_changed, lambda: bool(pump.entries) or reader.done())
        await reader
        why = stop.result() if stop.done() else None
    finally:
        if timer is not None:
            timer.cancel()
        if drained is not None:
            drained.cancel()
        reader.cancel()
        pump.cancel_all()
    if why is not None:
        raise why()
