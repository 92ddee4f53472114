"""core.streams.ordered_answers tested directly: order, flow control for QUEUE and LATEST
requests, the one-request mailbox, the drain and the deadline cut. Requests are gated by events:
deterministic, no timing assertions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from segserve_server.core.streams import StreamCut, StreamDrained, ordered_answers

pytestmark = pytest.mark.timeout(30)


class Source:
    """Requests 0..count-1, counting how many the pump has pulled."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.pulled = 0

    async def __call__(self) -> AsyncIterator[int]:
        for i in range(self.count):
            self.pulled += 1
            yield i


async def settle() -> None:
    for _ in range(100):
        await asyncio.sleep(0)


async def test_latest_reads_ahead_only_as_far_as_max_unsent():
    gate = asyncio.Event()
    source = Source(50)

    async def answer(request: int) -> str:
        await gate.wait()
        return f"ok {request}"

    answers = ordered_answers(
        source(),
        answer,
        max_inflight=1,
        max_unsent=5,
        latest=lambda r: True,
        dropped=lambda r: f"dropped {r}",
    )
    first = asyncio.ensure_future(anext(answers))
    await settle()
    assert source.pulled == 5  # then reading waits: five read and not yet sent
    gate.set()
    results = [await first] + [a async for a in answers]
    assert len(results) == 50
    assert results[0] == "ok 0"
    # While 0 ran, 1, 2, 3 waited in the mailbox in turn, each replaced by the next.
    assert results[1:4] == ["dropped 1", "dropped 2", "dropped 3"]
    assert results[-1] == "ok 49"
    assert all(r.startswith(("ok", "dropped")) for r in results)


async def test_queue_requests_wait_for_a_place_and_none_is_dropped():
    source = Source(20)
    running = 0
    most = 0

    async def answer(request: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0)
        running -= 1
        return request

    results = [a async for a in ordered_answers(source(), answer, max_inflight=3)]
    assert results == list(range(20))
    assert most <= 3


async def test_drain_answers_everything_read():
    draining = asyncio.Event()
    gate = asyncio.Event()

    async def requests() -> AsyncIterator[int]:
        for i in range(3):
            yield i
        await asyncio.Event().wait()  # the client keeps the stream open

    async def answer(request: int) -> int:
        await gate.wait()
        return request

    answers = ordered_answers(requests(), answer, max_inflight=4, draining=draining)
    first = asyncio.ensure_future(anext(answers))
    await settle()
    draining.set()
    gate.set()
    got = [await first]
    with pytest.raises(StreamDrained):
        async for a in answers:
            got.append(a)
    assert got == [0, 1, 2]


async def test_the_deadline_cut_answers_every_request_read():
    async def requests() -> AsyncIterator[int]:
        for i in range(3):
            yield i
        await asyncio.Event().wait()

    started: list[int] = []

    async def answer(request: int) -> str:
        started.append(request)
        await asyncio.Event().wait()  # never finishes on its own
        return "never"

    got: list[str] = []
    with pytest.raises(StreamCut):
        async for a in ordered_answers(
            requests(),
            answer,
            max_inflight=2,
            cut=lambda r: f"cut {r}",
            cut_at_s=time.monotonic() + 0.2,
        ):
            got.append(a)
    assert got == ["cut 0", "cut 1", "cut 2"]  # 2 never got a place, and is answered too
    assert started == [0, 1]
