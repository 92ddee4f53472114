"""The batcher with priorities, flows, LATEST and max age, with a backend that runs one batch
per step the test allows: deterministic, no timing assertions."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from segserve_server.backends.base import SyncBackend
from segserve_server.errors import FrameDropped, FrameExpired, QueueFull, QueueTimeout
from segserve_server.model_repository import BatchingConfig, PriorityConfig, QueuePolicy
from segserve_server.pipeline.batcher import Admission, Batcher, BatchOutcome
from tests.test_batcher import item, past, until

pytestmark = pytest.mark.timeout(30)


class SteppedBackend(SyncBackend):
    """Answers x with x * 10; each batch waits for one step the test releases."""

    def __init__(self) -> None:
        self.steps = threading.Semaphore(0)
        self.batches: list[list[float]] = []
        self.running = threading.Event()

    @property
    def description(self) -> str:
        return "stepped"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append([float(x) for x in batch[:, 0]])
        self.running.set()
        assert self.steps.acquire(timeout=20)
        return batch * 10


def batching(streak: int = 8, max_batch: int = 1, **policy: object) -> BatchingConfig:
    priority = PriorityConfig(
        levels=2,
        default_level=2,
        default_policy=QueuePolicy(**policy),  # type: ignore[arg-type]
        streak_limit=streak,
    )
    return BatchingConfig(max_batch, (), 0, 0, enabled=True, priority=priority)


async def make(backend: SteppedBackend, config: BatchingConfig) -> Batcher:
    batcher = Batcher(backend, config, name="m")
    await batcher.start()
    return batcher


async def running(backend: SteppedBackend) -> None:
    assert await asyncio.to_thread(backend.running.wait, 10)
    backend.running.clear()


def submit(batcher: Batcher, value: float, **admission: object) -> asyncio.Future[BatchOutcome]:
    return asyncio.ensure_future(batcher.submit(item(value), None, Admission(**admission)))  # type: ignore[arg-type]


async def step(backend: SteppedBackend, count: int) -> None:
    """Lets `count` batches run, one after another."""
    for _ in range(count):
        backend.steps.release()
        await running(backend)


async def test_real_time_work_runs_ahead_of_a_full_bulk_queue():
    """A level-1 request behind a full bulk level waits for the running batch only."""
    backend = SteppedBackend()
    batcher = await make(backend, batching(max_queue_size=4))
    blocker = submit(batcher, 1, priority=2)
    await running(backend)
    bulk = [submit(batcher, v, priority=2) for v in (2, 3, 4, 5)]
    await until(lambda: batcher.queue_depth == 4, "the bulk level is full")
    with pytest.raises(QueueFull):
        await batcher.submit(item(6), None, Admission(priority=2))
    realtime = submit(batcher, 100, priority=1)  # its own level: room there
    await until(lambda: batcher.queue_depth == 5, "the real-time request is queued")
    await step(backend, 1)  # the blocker ends; the next batch is the real-time one
    assert backend.batches[-1] == [100.0]
    backend.steps.release(5)
    await asyncio.gather(blocker, realtime, *bulk)
    assert backend.batches == [[1.0], [100.0], [2.0], [3.0], [4.0], [5.0]]
    await batcher.stop()


async def test_bulk_gets_a_batch_after_the_streak_limit():
    backend = SteppedBackend()
    batcher = await make(backend, batching(streak=2))
    blocker = submit(batcher, 0, priority=1)
    await running(backend)
    bulk = submit(batcher, 50, priority=2)
    realtime = [submit(batcher, v, priority=1) for v in (1, 2, 3, 4)]
    await until(lambda: batcher.queue_depth == 5, "all are queued")
    backend.steps.release(6)
    await asyncio.gather(blocker, bulk, *realtime)
    # Strict priority for two batches while bulk waited, then bulk's turn.
    assert backend.batches == [[0.0], [1.0], [2.0], [50.0], [3.0], [4.0]]
    await batcher.stop()


async def test_two_cameras_share_the_model_fairly():
    backend = SteppedBackend()
    batcher = await make(backend, batching())
    blocker = submit(batcher, 0, priority=1)
    await running(backend)
    a = [submit(batcher, v, priority=1, flow="a", sequence=i) for i, v in enumerate((1, 2, 3))]
    b = [submit(batcher, v, priority=1, flow="b", sequence=i) for i, v in enumerate((11, 12))]
    await until(lambda: batcher.queue_depth == 5, "both cameras' frames are queued")
    backend.steps.release(6)
    await asyncio.gather(blocker, *a, *b)
    assert backend.batches == [[0.0], [1.0], [11.0], [2.0], [12.0], [3.0]]
    await batcher.stop()


async def test_latest_supersedes_the_flows_older_queued_frames():
    backend = SteppedBackend()
    batcher = await make(backend, batching())
    blocker = submit(batcher, 0, priority=1)
    await running(backend)
    frames = [submit(batcher, v, flow="cam", sequence=i, latest=True) for i, v in enumerate((1, 2, 3))]  # fmt: skip
    other = submit(batcher, 9, flow="other-cam", sequence=0, latest=True)
    await until(lambda: frames[1].done(), "frame 2 replaced frame 1... and was replaced")
    assert batcher.queue_depth == 2  # the newest frame of each camera
    stale = submit(batcher, 0.5, flow="cam", sequence=0, latest=True)  # read before frame 3
    with pytest.raises(FrameDropped):
        await stale
    backend.steps.release(3)
    results = await asyncio.gather(*frames, other, return_exceptions=True)
    assert [type(r).__name__ for r in results] == [
        "FrameDropped", "FrameDropped", "BatchOutcome", "BatchOutcome",
    ]  # fmt: skip
    await blocker
    assert backend.batches == [[0.0], [3.0], [9.0]]
    await batcher.stop()


async def test_a_frame_past_its_max_age_never_runs_and_is_answered_when_it_expires():
    """EXPIRED, never run; answered when its max age passes even if no batch forms for a long
    time (the batcher wakes at the next expiry)."""
    backend = SteppedBackend()
    config = BatchingConfig(4, (4,), 30_000_000, 0, enabled=True)  # waits 30 s for 4
    batcher = await make(backend, config)
    expiring = submit(batcher, 1, expires_s=time.monotonic() + 0.2)
    with pytest.raises(FrameExpired):
        await expiring
    with pytest.raises(FrameExpired):
        await batcher.submit(item(2), None, Admission(expires_s=time.monotonic() - 1))
    assert backend.batches == []
    await batcher.stop(timeout_s=1)


async def test_queue_timeout_rejects_or_delays():
    backend = SteppedBackend()
    batcher = await make(
        backend,
        batching(default_timeout_us=0, allow_timeout_override=True, timeout_action="REJECT"),
    )
    blocker = submit(batcher, 0, priority=1)
    await running(backend)
    late = submit(batcher, 1, priority=2, timeout_us=100_000)
    with pytest.raises(QueueTimeout):
        await late
    ignored = PriorityConfig(levels=2, default_level=2)  # no override allowed: timeout ignored
    assert ignored.policy_of(2).timeout_us(100_000) == 0
    backend.steps.release(1)
    await blocker
    assert backend.batches == [[0.0]]
    await batcher.stop()

    delayed_backend = SteppedBackend()
    delaying = await make(
        delayed_backend,
        batching(default_timeout_us=100_000, timeout_action="DELAY", streak=0),
    )
    blocker = submit(delaying, 0, priority=1)
    await running(delayed_backend)
    queued_at = time.monotonic()
    old = submit(delaying, 1, priority=1)
    await past(queued_at + 0.11)  # its 100 ms queue timeout has passed
    fresh = submit(delaying, 2, priority=1)
    await until(lambda: delaying.queue_depth == 2, "both are queued")
    delayed_backend.steps.release(3)
    await asyncio.gather(blocker, old, fresh)
    assert delayed_backend.batches == [[0.0], [2.0], [1.0]]  # the delayed one after the on-time
    await delaying.stop()


async def test_a_latest_stream_runs_one_frame_at_a_time_and_the_newest_next():
    """Two batch slots: while frame 1 of camera A runs, its frames 2 and 3 wait queued (3
    supersedes 2) although a slot is free, and camera B's frame takes that slot; when frame 1
    ends, the newest, 3, runs."""
    backend = SteppedBackend()
    batcher = Batcher(backend, batching(), name="m", instances=2)
    await batcher.start()
    first = submit(batcher, 1, flow="a", sequence=1, latest=True)
    await running(backend)
    second = submit(batcher, 2, flow="a", sequence=2, latest=True)
    await until(lambda: batcher.queue_depth == 1, "frame 2 waits although a slot is free")
    other = submit(batcher, 9, flow="b", sequence=1, latest=True)
    await running(backend)  # camera B's frame took the second slot
    third = submit(batcher, 3, flow="a", sequence=3, latest=True)
    with pytest.raises(FrameDropped):
        await second
    assert backend.batches == [[1.0], [9.0]]
    backend.steps.release(3)
    await asyncio.gather(first, other, third)
    assert backend.batches == [[1.0], [9.0], [3.0]]
    await batcher.stop()


async def test_frames_of_several_streams_share_a_batch():
    backend = SteppedBackend()
    batcher = await make(backend, batching(max_batch=4))
    blocker = submit(batcher, 0)
    await running(backend)
    frames = [
        submit(batcher, v, priority=1, flow=flow, sequence=i)
        for i, (flow, v) in enumerate([("a", 1), ("a", 2), ("b", 11), ("b", 12)])
    ]
    await until(lambda: batcher.queue_depth == 4, "both cameras' frames are queued")
    backend.steps.release(2)
    outcomes = await asyncio.gather(*frames)
    await blocker
    assert backend.batches == [[0.0], [1.0, 11.0, 2.0, 12.0]]  # one batch, the flows in turn
    assert all(o.batch_size == 4 for o in outcomes)
    await batcher.stop()
