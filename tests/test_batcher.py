"""The batcher's invariants, tested directly with a backend whose batches a test can hold open.

The backends here stand in for a model only to make batch timing deterministic (events as
gates); the real ONNX Runtime path is exercised end to end in test_segment.py. Tests wait for what
they need to have happened (a batch started, requests queued, a deadline passed), never for a
fixed time, and assert nothing about timing.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from segserve_server.backends.base import AsyncBackend, SyncBackend
from segserve_server.errors import DeadlineExceeded, InferenceFailed, ModelUnavailable, QueueFull
from segserve_server.model_repository import BatchingConfig
from segserve_server.pipeline.batcher import Batcher, BatchOutcome, batch_deadline, plan_batch

pytestmark = pytest.mark.timeout(30)


class GatedBackend(SyncBackend):
    """Answers each input x with x * 10; waits for `gate` before each batch; fails on -1 inputs."""

    def __init__(self, wrong_size: bool = False) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.batches: list[list[float]] = []
        self.wrong_size = wrong_size

    @property
    def description(self) -> str:
        return "gated"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append([float(x) for x in batch[:, 0]])
        self.started.set()
        assert self.gate.wait(20)
        if (batch == -1).any():
            raise ValueError("input -1 is poison")
        return (batch * 10)[:-1] if self.wrong_size else batch * 10


def dynamic(max_batch: int = 8, delay_us: int = 0, queue: int = 0, preferred=()) -> BatchingConfig:
    return BatchingConfig(max_batch, tuple(preferred), delay_us, queue, enabled=True)


@pytest.mark.parametrize(
    ("queued", "waited_s", "config", "expected"),
    [
        (0, 0.0, dynamic(), (0, math.inf)),
        (5, 0.0, BatchingConfig(max_batch_size=8), (1, 0.0)),  # no dynamic_batching: one by one
        (3, 0.0, dynamic(8, delay_us=0), (3, 0.0)),  # no delay: run what is there
        (12, 0.0, dynamic(8, delay_us=10_000), (8, 0.0)),  # full batch never waits
        (4, 0.0, dynamic(8, delay_us=10_000, preferred=(2, 4)), (4, 0.0)),  # largest preferred
        (3, 0.004, dynamic(8, delay_us=10_000, preferred=(4,)), (0, 0.006)),  # wait the rest
        (3, 0.010, dynamic(8, delay_us=10_000, preferred=(4,)), (3, 0.0)),  # delay spent
    ],
)
def test_plan_batch(queued, waited_s, config, expected):
    count, wait_s = plan_batch(queued, waited_s, config)
    assert count == expected[0]
    assert wait_s == pytest.approx(expected[1])


async def started(backend: GatedBackend) -> None:
    assert await asyncio.to_thread(backend.started.wait, 10)
    backend.started.clear()


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Waits until condition() holds, yielding to the loop between checks; fails after timeout_s
    (a bound far beyond what any condition here needs, not a timing assertion)."""
    limit = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < limit, f"gave up waiting until {what}"
        await asyncio.sleep(0.001)


async def past(deadline_s: float) -> None:
    """Waits until time.monotonic() has passed deadline_s (the clock the batcher checks)."""
    await until(lambda: time.monotonic() > deadline_s, "the deadline has passed")


async def make(backend: GatedBackend | GatedAsyncBackend, config: BatchingConfig) -> Batcher:
    batcher = Batcher(backend, config, name="test")
    await batcher.start()
    return batcher


def item(value: float) -> np.ndarray:
    return np.full((2,), value, dtype=np.float32)


async def test_queued_requests_form_one_batch_and_get_their_own_outputs():
    backend = GatedBackend()
    batcher = await make(backend, dynamic(8))
    first = asyncio.ensure_future(batcher.submit(item(1)))
    await started(backend)  # batch [1] is running; the rest queue behind it
    rest = [asyncio.ensure_future(batcher.submit(item(v))) for v in (2, 3, 4, 5)]
    await until(lambda: batcher.queue_depth == 4, "all four are queued")
    backend.gate.set()
    outcomes = await asyncio.gather(first, *rest)
    assert backend.batches == [[1.0], [2.0, 3.0, 4.0, 5.0]]
    assert [o.output[0] for o in outcomes] == [10, 20, 30, 40, 50]
    assert [o.batch_size for o in outcomes] == [1, 4, 4, 4, 4]
    await batcher.stop()


async def test_cancelled_and_expired_requests_never_reach_the_backend():
    backend = GatedBackend()
    batcher = await make(backend, dynamic(8))
    blocker = asyncio.ensure_future(batcher.submit(item(1)))
    await started(backend)
    cancelled = asyncio.ensure_future(batcher.submit(item(2)))
    soon = time.monotonic() + 0.25
    expiring = asyncio.ensure_future(batcher.submit(item(3), deadline_s=soon))
    alive = asyncio.ensure_future(batcher.submit(item(4)))
    await until(lambda: batcher.queue_depth == 3, "all three are queued")
    cancelled.cancel()
    await past(soon)  # the deadline passes while the batch ahead is still running
    backend.gate.set()
    assert (await blocker).output[0] == 10
    assert (await alive).output[0] == 40
    with pytest.raises(DeadlineExceeded):
        await expiring
    assert cancelled.cancelled()
    assert backend.batches == [[1.0], [4.0]]
    await batcher.stop()


async def test_a_bad_input_fails_only_itself():
    backend = GatedBackend()
    backend.gate.set()
    batcher = await make(backend, dynamic(8, delay_us=200_000, preferred=(3,)))
    results = await asyncio.gather(
        *(batcher.submit(item(v)) for v in (1, -1, 3)), return_exceptions=True
    )
    assert backend.batches[0] == [1.0, -1.0, 3.0]  # the batch failed, then ran one by one
    assert isinstance(results[0], BatchOutcome) and isinstance(results[2], BatchOutcome)
    assert results[0].output[0] == 10 and results[2].output[0] == 30
    assert isinstance(results[1], InferenceFailed) and "poison" in str(results[1])
    await batcher.stop()


async def test_output_of_the_wrong_size_fails_every_request():
    backend = GatedBackend(wrong_size=True)
    backend.gate.set()
    batcher = await make(backend, dynamic(8, delay_us=200_000, preferred=(2,)))
    results = await asyncio.gather(
        *(batcher.submit(item(v)) for v in (1, 2)), return_exceptions=True
    )
    assert all(isinstance(r, InferenceFailed) for r in results)
    assert "outputs for 1 inputs" in str(results[0])
    await batcher.stop()


async def test_full_queue_and_stopped_batcher_refuse():
    backend = GatedBackend()
    batcher = await make(backend, dynamic(8, queue=2))
    running = asyncio.ensure_future(batcher.submit(item(1)))
    await started(backend)
    queued = [asyncio.ensure_future(batcher.submit(item(v))) for v in (2, 3)]
    await until(lambda: batcher.queue_depth == 2, "the queue is full")
    with pytest.raises(QueueFull, match="limit 2"):
        await batcher.submit(item(4))
    stopping = asyncio.ensure_future(batcher.stop())
    await until(lambda: batcher._closing, "stop() has begun")
    with pytest.raises(ModelUnavailable):
        await batcher.submit(item(5))
    backend.gate.set()
    await stopping  # stop drains: everything accepted is answered
    assert [(await f).output[0] for f in (running, *queued)] == [10, 20, 30]


async def test_stop_with_timeout_fails_what_cannot_finish():
    backend = GatedBackend()
    batcher = await make(backend, dynamic(8))
    running = asyncio.ensure_future(batcher.submit(item(1)))
    await started(backend)
    waiting = asyncio.ensure_future(batcher.submit(item(2)))
    await until(lambda: batcher.queue_depth == 1, "request 2 is queued")
    await batcher.stop(timeout_s=0.1)  # the gate stays shut: this drain can only time out
    backend.gate.set()
    for future in (running, waiting):
        with pytest.raises(ModelUnavailable, match="drain timeout"):
            await future


async def test_one_by_one_retry_skips_requests_that_expired_meanwhile():
    backend = GatedBackend()
    batcher = await make(backend, dynamic(8, delay_us=500_000, preferred=(3,)))
    soon = time.monotonic() + 0.3
    futures = [
        asyncio.ensure_future(batcher.submit(item(v), deadline_s=d))
        for v, d in ((1, None), (-1, None), (3, soon))
    ]
    await started(backend)  # the batch [1, -1, 3] is running and will fail
    assert backend.batches == [[1.0, -1.0, 3.0]]
    await past(soon)  # meanwhile request 3's deadline passes
    backend.gate.set()
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert isinstance(results[0], BatchOutcome)
    assert results[0].output[0] == 10
    assert isinstance(results[1], InferenceFailed)
    assert isinstance(results[2], DeadlineExceeded)
    assert [3.0] not in backend.batches  # the expired request never ran again
    await batcher.stop()


class UnavailableBackend(GatedBackend):
    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append([float(x) for x in batch[:, 0]])
        raise ModelUnavailable("no server left")


async def test_errors_that_are_no_inputs_fault_are_not_retried_one_by_one():
    backend = UnavailableBackend()
    batcher = await make(backend, dynamic(8, delay_us=200_000, preferred=(3,)))
    results = await asyncio.gather(
        *(batcher.submit(item(v)) for v in (1, 2, 3)), return_exceptions=True
    )
    assert backend.batches == [[1.0, 2.0, 3.0]]
    assert all(isinstance(r, ModelUnavailable) for r in results)
    await batcher.stop()


class GatedAsyncBackend(AsyncBackend):
    """An asynchronous backend (as a remote Triton server is): answers x with x * 10 once `gate`
    is set; records each batch, the deadline_s it was given, and the batches cancelled in it."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.batches: list[list[float]] = []
        self.deadlines: list[float | None] = []
        self.cancelled: list[list[float]] = []

    @property
    def description(self) -> str:
        return "gated-async"

    async def infer(self, batch: np.ndarray, deadline_s: float | None) -> np.ndarray:
        values = [float(x) for x in batch[:, 0]]
        self.batches.append(values)
        self.deadlines.append(deadline_s)
        self.started.set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(values)
            raise
        return batch * 10


async def async_started(backend: GatedAsyncBackend) -> None:
    await asyncio.wait_for(backend.started.wait(), 10)
    backend.started.clear()


@pytest.mark.parametrize(
    ("deadlines", "expected"),
    [
        ([], None),
        ([None], None),
        ([5.0], 5.0),
        ([1.0, 3.0, 2.0], 3.0),  # the latest, wherever it is
        ([1.0, None, 3.0], None),  # somebody waits without a deadline
    ],
)
def test_batch_deadline(deadlines, expected):
    assert batch_deadline(deadlines) == expected


async def test_async_backend_gets_each_batchs_latest_deadline_or_none():
    backend = GatedAsyncBackend()
    batcher = await make(backend, dynamic(2))
    now = time.monotonic()
    d1, d2, d3, d4 = now + 100, now + 300, now + 200, now + 400
    first = asyncio.ensure_future(batcher.submit(item(1), deadline_s=d1))
    await async_started(backend)  # batch [1] is running; the rest queue behind it in pairs
    rest = [
        asyncio.ensure_future(batcher.submit(item(v), deadline_s=d))
        for v, d in ((2, d2), (3, d3), (4, d4), (5, None))
    ]
    await until(lambda: batcher.queue_depth == 4, "all four are queued")
    backend.gate.set()
    outcomes = await asyncio.gather(first, *rest)
    assert [o.output[0] for o in outcomes] == [10, 20, 30, 40, 50]
    assert backend.batches == [[1.0], [2.0, 3.0], [4.0, 5.0]]
    assert backend.deadlines == [d1, d2, None]
    assert backend.cancelled == []
    await batcher.stop()


async def test_async_backend_never_gets_requests_that_expired_or_were_cancelled_in_the_queue():
    backend = GatedAsyncBackend()
    batcher = await make(backend, dynamic(8))
    blocker = asyncio.ensure_future(batcher.submit(item(1)))
    await async_started(backend)
    cancelled = asyncio.ensure_future(batcher.submit(item(2)))
    soon = time.monotonic() + 0.25
    expiring = asyncio.ensure_future(batcher.submit(item(3), deadline_s=soon))
    alive = asyncio.ensure_future(batcher.submit(item(4)))
    await until(lambda: batcher.queue_depth == 3, "all three are queued")
    cancelled.cancel()
    await past(soon)  # the deadline passes while the batch ahead is still running
    backend.gate.set()
    assert (await blocker).output[0] == 10
    assert (await alive).output[0] == 40
    with pytest.raises(DeadlineExceeded):
        await expiring
    assert cancelled.cancelled()
    assert backend.batches == [[1.0], [4.0]]
    assert backend.deadlines == [None, None]
    await batcher.stop()


async def test_async_batch_is_cancelled_once_every_caller_has_gone():
    backend = GatedAsyncBackend()
    # Batches run only in pairs (30 s delay otherwise): which requests share a batch is known.
    batcher = await make(backend, dynamic(2, delay_us=30_000_000))
    callers = [asyncio.ensure_future(batcher.submit(item(v))) for v in (1, 2)]
    await async_started(backend)
    assert backend.batches == [[1.0, 2.0]]
    callers[0].cancel()
    callers[1].cancel()
    await until(lambda: batcher.abandoned_batches == 1, "the batch is abandoned")
    assert backend.cancelled == [[1.0, 2.0]]  # the backend's call saw CancelledError
    assert all(caller.cancelled() for caller in callers)
    # The batcher goes on serving: the next batch runs and is answered.
    backend.gate.set()
    outcomes = await asyncio.gather(*(batcher.submit(item(v)) for v in (3, 4)))
    assert [o.output[0] for o in outcomes] == [30, 40]
    assert backend.batches == [[1.0, 2.0], [3.0, 4.0]]
    assert backend.cancelled == [[1.0, 2.0]]
    assert batcher.abandoned_batches == 1
    await batcher.stop()


async def test_async_batch_with_a_caller_left_is_not_cancelled():
    backend = GatedAsyncBackend()
    batcher = await make(backend, dynamic(2, delay_us=30_000_000))
    gone = asyncio.ensure_future(batcher.submit(item(1)))
    staying = asyncio.ensure_future(batcher.submit(item(2)))
    await async_started(backend)
    assert backend.batches == [[1.0, 2.0]]
    gone.cancel()
    await asyncio.wait([gone])  # its cancellation has reached the batch (done callbacks ran)
    assert gone.cancelled()
    assert backend.cancelled == []
    backend.gate.set()
    assert (await staying).output[0] == 20
    assert backend.cancelled == []
    assert batcher.abandoned_batches == 0
    assert backend.batches == [[1.0, 2.0]]
    await batcher.stop()
