"""The load loops of the bench: closed loop (N callers, each sending its next image when the
previous answer is in) and open loop (Poisson arrivals at a given rate; latency counts from each
arrival's scheduled time, so a slow server cannot hide its queue), of unary calls or stream
frames. `measure` runs one point, `run_bench` every point on every image set.

Every point is bounded in time (`Limits.duration_s`) and count (`Limits.max_requests`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

from segserve_client.bench.images import ImageSet
from segserve_client.bench.results import CLIENT_OVERLOAD, CallFailed, Recorder
from segserve_client.bench.targets import FrameStream, Target

__all__ = [
    "Limits",
    "Load",
    "measure",
    "run_bench",
]

_Prepared = TypeVar("_Prepared")


@dataclass(frozen=True)
class Load:
    """One measured point: closed loop at `concurrency` or open loop at `rate_rps`."""

    mode: str  # "unary" or "stream"
    concurrency: int | None = None
    rate_rps: float | None = None

    @property
    def label(self) -> str:
        if self.rate_rps is not None:
            return f"{self.mode} open {self.rate_rps:g}/s"
        return f"{self.mode} closed x{self.concurrency}"


@dataclass(frozen=True)
class Limits:
    """Bounds of every point: measured seconds, calls, open calls (open loop), stream window."""

    duration_s: float = 10.0
    max_requests: int = 100_000
    max_outstanding: int = 256
    stream_window: int = 1
    drain_s: float = 30.0


class _Feed(Generic[_Prepared]):
    """Hands out prepared requests round robin until the time or count bound is reached."""

    def __init__(self, prepared: Sequence[_Prepared], limits: Limits, offset: int = 0) -> None:
        self._prepared = prepared
        self._next = offset
        self._sent = 0
        self._max = limits.max_requests
        self.deadline = time.perf_counter() + limits.duration_s

    def take(self) -> _Prepared | None:
        if self._sent >= self._max or time.perf_counter() >= self.deadline:
            return None
        self._sent += 1
        self._next += 1
        return self._prepared[self._next % len(self._prepared)]


async def _closed_unary(
    target: Target[_Prepared], feed: _Feed[_Prepared], concurrency: int, rec: Recorder
) -> None:
    async def caller() -> None:
        while (request := feed.take()) is not None:
            started = time.perf_counter()
            try:
                reply = await target.call(request)
            except CallFailed as exc:
                rec.failed(exc.code)
            else:
                rec.ok(time.perf_counter() - started, reply)

    await asyncio.gather(*(caller() for _ in range(concurrency)))


async def _closed_stream(
    target: Target[_Prepared], feed: _Feed[_Prepared], streams: int, window: int, rec: Recorder
) -> None:
    async def one_stream() -> None:
        stream = target.stream()
        sent: deque[float] = deque()
        slots = asyncio.Semaphore(window)

        async def writer() -> None:
            try:
                while True:
                    await slots.acquire()
                    request = feed.take()
                    if request is None:
                        break
                    sent.append(time.perf_counter())
                    await stream.send(request)
            finally:
                await stream.done_sending()

        async def reader() -> None:
            while (answer := await stream.receive()) is not None:
                started = sent.popleft()
                if isinstance(answer, CallFailed):
                    rec.failed(answer.code)
                else:
                    rec.ok(time.perf_counter() - started, answer)
                slots.release()

        try:
            await asyncio.gather(writer(), reader())
        except CallFailed as exc:
            rec.failed(exc.code)  # the stream itself failed; the frames in flight are lost
            for _ in sent:
                rec.failed(exc.code)
        finally:
            stream.cancel()

    await asyncio.gather(*(one_stream() for _ in range(streams)))


async def _open_loop(
    target: Target[_Prepared],
    feed: _Feed[_Prepared],
    load: Load,
    limits: Limits,
    rec: Recorder,
    rng: random.Random,
) -> None:
    """Poisson arrivals; each call's latency counts from its scheduled arrival time."""
    assert load.rate_rps is not None
    open_calls: set[asyncio.Task[None]] = set()
    stream = target.stream() if load.mode == "stream" else None
    sent: deque[float] = deque()

    async def unary(request: _Prepared, scheduled: float) -> None:
        try:
            reply = await target.call(request)
        except CallFailed as exc:
            rec.failed(exc.code)
        else:
            rec.ok(time.perf_counter() - scheduled, reply)

    async def read_answers(frame_stream: FrameStream[_Prepared]) -> None:
        with contextlib.suppress(CallFailed):
            while (answer := await frame_stream.receive()) is not None:
                scheduled = sent.popleft()
                if isinstance(answer, CallFailed):
                    rec.failed(answer.code)
                else:
                    rec.ok(time.perf_counter() - scheduled, answer)
        for _ in sent:
            rec.failed("CANCELLED")
        sent.clear()

    reader = asyncio.create_task(read_answers(stream)) if stream is not None else None
    scheduled = time.perf_counter()
    try:
        while True:
            scheduled += rng.expovariate(load.rate_rps)
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            request = feed.take()
            if request is None:
                break
            if len(open_calls) + len(sent) >= limits.max_outstanding:
                rec.failed(CLIENT_OVERLOAD)
                continue
            if stream is not None:
                sent.append(scheduled)
                await stream.send(request)
            else:
                task = asyncio.create_task(unary(request, scheduled))
                open_calls.add(task)
                task.add_done_callback(open_calls.discard)
        if stream is not None:
            await stream.done_sending()
        pending = [*open_calls, *([reader] if reader is not None else [])]
        if pending:
            _, late = await asyncio.wait(pending, timeout=limits.drain_s)
            for task in late:  # still unanswered after drain_s: given up
                task.cancel()
                for _ in range(len(sent) if task is reader else 1):
                    rec.failed("CANCELLED")
    finally:
        if stream is not None:
            stream.cancel()
        if reader is not None:
            reader.cancel()


async def measure(
    target: Target[_Prepared],
    prepared: Sequence[_Prepared],
    load: Load,
    limits: Limits,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Runs one point and returns its summary (with the load that made it)."""
    rec = Recorder()
    feed = _Feed(prepared, limits, offset=seed)
    started = time.perf_counter()
    if load.rate_rps is not None:
        await _open_loop(target, feed, load, limits, rec, random.Random(seed))
    elif load.mode == "stream":
        assert load.concurrency is not None
        await _closed_stream(target, feed, load.concurrency, limits.stream_window, rec)
    else:
        assert load.concurrency is not None
        await _closed_unary(target, feed, load.concurrency, rec)
    elapsed_s = time.perf_counter() - started
    return {"load": {**asdict(load), "label": load.label}, **rec.summary(elapsed_s)}


async def run_bench(
    target: Target[_Prepared],
    image_sets: Sequence[ImageSet],
    loads: Sequence[Load],
    limits: Limits,
    *,
    warmup_s: float = 2.0,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every load on every image set, each after a short warm-up at its own load."""
    points: list[dict[str, Any]] = []
    for image_set in image_sets:
        prepared = [target.prepare(image) for image in image_set.images]
        for index, load in enumerate(loads):
            if warmup_s > 0:
                warm = dataclasses.replace(limits, duration_s=warmup_s)
                await measure(target, prepared, load, warm, seed=index + 1000)
            point = await measure(target, prepared, load, limits, seed=index)
            point["images"] = image_set.describe()
            points.append(point)
            if on_point is not None:
                on_point(point)
    return points
