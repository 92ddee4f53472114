"""The batcher's invariants, tested directly with a backend whose batches a test can hold open.

The backend here stands in for a model only to make batch timing deterministic (events as
gates); the real ONNX Runtime path is exercised end to end in test_segment.py.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import numpy as np
import pytest

from segserve_server.backends.base import SyncBackend
from segserve_server.errors import DeadlineExceeded, InferenceFailed, ModelUnavailable, QueueFull
from segserve_server.model_repository import BatchingConfig
from segserve_server.pipeline.batcher import Batcher, plan_batch

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


async def make(backend: GatedBackend, config: BatchingConfig) -> Batcher:
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
    await asyncio.sleep(0.05)
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
    expiring = asyncio.ensure_future(batcher.submit(item(3), deadline_s=time.monotonic() + 0.05))
    alive = asyncio.ensure_future(batcher.submit(item(4)))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    await asyncio.sleep(0.1)  # the deadline passes while the batch ahead is still running
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
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull, match="limit 2"):
        await batcher.submit(item(4))
    stopping = asyncio.ensure_future(batcher.stop())
    await asyncio.sleep(0.01)
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
    await asyncio.sleep(0.01)
    await batcher.stop(timeout_s=0.1)
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
    await asyncio.sleep(0.4)  # meanwhile request 3's deadline passes
    backend.gate.set()
    results = await asyncio.gather(*futures, return_exceptions=True)
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
