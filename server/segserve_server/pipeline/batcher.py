"""The dynamic batcher: one per loaded model version, in front of its backend.

Invariants (each tested in tests/test_batcher.py):
- every accepted request's future is resolved exactly once (set-if-not-done);
- requests cancelled by their caller, or whose deadline has passed, are dropped before a batch
  runs and never reach the backend;
- a batch that fails is retried request by request, so one bad input fails only itself;
- a batch's output must have one entry per input, or every request in it fails with INTERNAL;
- the batch body cannot leave a request hanging: whatever happens, its futures are resolved.
Synchronous backends run in the batcher's threads; asynchronous ones (remote Triton servers) are
awaited on the loop, and their errors keep their status (UNAVAILABLE when no server is left).
An asynchronous backend gets, per batch, the latest deadline of its requests (the time somebody
still waits), and a batch in flight there is cancelled as soon as every one of its callers has
gone (cancelled or expired): work nobody waits for does not hold a server.
A drain (stop) runs everything accepted; when its budget runs out, `abandon` fails what is still
running or queued with UNAVAILABLE, and only a batcher that held something logs it.
Loop-bound objects (queue wake-up event, semaphore, task) are created in start().
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from segserve_server.backends.base import AsyncBackend, Backend, SyncBackend
from segserve_server.errors import (
    DeadlineExceeded,
    FrameDropped,
    FrameExpired,
    InferenceFailed,
    ModelUnavailable,
    QueueFull,
    QueueTimeout,
    SegserveError,
)
from segserve_server.model_repository import BatchingConfig
from segserve_server.pipeline.scheduling import (
    Admission,
    PriorityQueue,
    Queued,
    batch_deadline,
    plan_batch,
)

__all__ = ["Admission", "BatchOutcome", "Batcher", "batch_deadline", "plan_batch"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchOutcome:
    """One request's share of a batch run."""

    output: np.ndarray
    queue_s: float
    infer_s: float
    batch_size: int
    level: int = 1  # the priority level it waited on


@dataclass(eq=False)
class _Pending:
    tensor: np.ndarray
    future: asyncio.Future[BatchOutcome]
    enqueued_s: float
    deadline_s: float | None
    admission: Admission = field(default_factory=Admission)
    level: int = 1


def _stack(tensors: list[np.ndarray]) -> np.ndarray:
    """The batch of `tensors`; a batch of one contiguous tensor is a view, not a copy."""
    if len(tensors) == 1 and tensors[0].flags.c_contiguous:
        return tensors[0][np.newaxis]
    return np.stack(tensors)


def _resolve(future: asyncio.Future[BatchOutcome], outcome: BatchOutcome) -> None:
    if not future.done():
        future.set_result(outcome)


def _fail(future: asyncio.Future[BatchOutcome], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class Batcher:
    """Queues single-image tensors and runs them through `backend` in batches."""

    def __init__(
        self,
        backend: Backend,
        config: BatchingConfig,
        *,
        name: str,
        instances: int = 1,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._backend = backend
        self._name = name
        self._instances = instances
        self._on_batch = on_batch
        # A backend may know that larger batches do not pay on its device (ONNX Runtime's CPU
        # lanes); explicitly preferred batch sizes still win.
        limit = backend.batch_size_limit
        if limit and not config.preferred_batch_sizes and limit < config.max_batch_size:
            config = dataclasses.replace(config, max_batch_size=limit)
        self._config = config
        self._queue = PriorityQueue[_Pending](config.priority)
        self._closing = False
        self._started = False
        self.abandoned_batches = 0  # async batches cancelled in flight: every caller had gone
        self._busy_flows: set[Hashable] = set()  # LATEST flows with a request in a running batch

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def batching(self) -> BatchingConfig:
        """The batching that really applies: the config's, capped by the backend's
        batch_size_limit (ONNX Runtime's CPU lanes run one image each)."""
        return self._config

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._free_slots = self._instances  # batches that may start now
        self._executor = ThreadPoolExecutor(
            self._instances, thread_name_prefix=f"infer-{self._name}"
        )
        self._batches: dict[asyncio.Task[None], list[_Pending]] = {}
        self._loop_task = asyncio.create_task(self._form_batches(), name=f"batcher-{self._name}")
        self._loop_task.add_done_callback(self._loop_ended)
        self._started = True

    async def submit(
        self,
        tensor: np.ndarray,
        deadline_s: float | None = None,
        admission: Admission | None = None,
    ) -> BatchOutcome:
        """Queues one input (without batch dim) and waits for its output (without batch dim)."""
        admission = admission or Admission()
        if not self._started or self._closing:
            raise ModelUnavailable(f"model {self._name} is not accepting requests (draining)")
        now = time.monotonic()
        if deadline_s is not None and now >= deadline_s:
            raise DeadlineExceeded(f"deadline passed before request was queued for {self._name}")
        if admission.expires_s is not None and now >= admission.expires_s:
            raise FrameExpired(f"frame was older than its max age before {self._name} queued it")
        if admission.latest and admission.flow is not None:
            self._supersede(admission)
        level = self._config.priority.level_of(admission.priority)
        try:
            self._queue.check_room(level, f"model {self._name}")
        except QueueFull:
            self._drop_dead()
            self._queue.check_room(level, f"model {self._name}")
        timeout_us = self._queue.policy(level).timeout_us(admission.timeout_us)
        future: asyncio.Future[BatchOutcome] = asyncio.get_running_loop().create_future()
        future.add_done_callback(self._wake_if_cancelled)
        pending = _Pending(tensor, future, now, deadline_s, admission, level)
        flow = admission.flow if admission.flow is not None else pending
        timeout_at_s = now + timeout_us / 1e6 if timeout_us else None
        self._queue.push(Queued(pending, level, flow, now, timeout_at_s))
        self._wakeup.set()
        return await future

    def _supersede(self, admission: Admission) -> None:
        """LATEST: the flow's older queued requests are dropped; if a newer one is already
        queued (frames can finish decoding out of order), this one is."""
        flow, sequence = admission.flow, admission.sequence

        def same_flow(q: Queued[_Pending]) -> bool:
            return q.flow == flow and q.item.admission.latest

        if any(same_flow(q) and q.item.admission.sequence > sequence for q in self._queue):
            raise FrameDropped(f"a newer frame of the stream was queued first for {self._name}")
        for older in self._queue.keep(lambda q: not same_flow(q)):
            _fail(
                older.item.future,
                FrameDropped(f"superseded by a newer frame of its stream in {self._name}'s queue"),
            )

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """If the batch-forming loop ever crashes, no request may wait for it forever."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("model %s: batcher loop crashed", self._name, exc_info=task.exception())
        self._closing = True
        for queued in self._queue.keep(lambda q: False):
            _fail(queued.item.future, InferenceFailed(f"model {self._name}: batcher failed"))

    def _wake_if_cancelled(self, future: asyncio.Future[BatchOutcome]) -> None:
        """A caller gave up: wake the loop so the request leaves the queue now, not at its turn."""
        if future.cancelled():
            self._wakeup.set()

    async def stop(self, timeout_s: float | None = None) -> int:
        """Stops accepting; runs everything queued, then stops. After timeout_s, fails the rest
        (UNAVAILABLE) and logs it, if anything was left. Returns how many requests it failed."""
        if not self._started:
            return 0
        self._closing = True
        self._wakeup.set()
        started_s = time.monotonic()
        failed = 0
        try:
            async with asyncio.timeout(timeout_s):
                await self._loop_task
                if self._batches:
                    await asyncio.gather(*self._batches, return_exceptions=True)
        except TimeoutError:
            failed = self.abandon(
                ModelUnavailable(
                    f"model {self._name} stopped before answering: drain timeout of "
                    f"{timeout_s:g} s ran out; retry on another replica"
                ),
                waited_s=time.monotonic() - started_s,
            )
        finally:
            self._loop_task.cancel()
            for task in list(self._batches):
                task.cancel()
            self._executor.shutdown(wait=False, cancel_futures=True)
            await self._backend.aclose()
        return failed

    def busy(self) -> tuple[int, int]:
        """(requests in running batches, requests queued) that still wait for their answer."""
        running = sum(not p.future.done() for batch in self._batches.values() for p in batch)
        queued = sum(not q.item.future.done() for q in self._queue)
        return running, queued

    def abandon(self, error: SegserveError, *, waited_s: float) -> int:
        """A drain's budget ran out: stops accepting and fails, with `error`, every request
        still waiting, running or queued, now (while their callers can still be answered).
        Logs it (with waited_s, the time the drain waited) only if there was one. Returns how
        many requests it failed."""
        if not self._started:
            return 0
        self._closing = True
        self._wakeup.set()
        running, queued = self.busy()
        if running or queued:
            log.warning(
                "model %s: %d request(s) in running batches and %d queued still unanswered "
                "after %.1fs; failing them (UNAVAILABLE)",
                self._name,
                running,
                queued,
                waited_s,
            )
        for task, batch in list(self._batches.items()):
            for pending in batch:
                _fail(pending.future, error)
            task.cancel()
        for left in self._queue.keep(lambda q: False):
            _fail(left.item.future, error)
        return running + queued

    def _alive(self, pending: _Pending, now: float) -> bool:
        """False for a request whose caller went away, whose deadline passed, or (a frame) that
        passed its max age; the last two are failed."""
        if pending.future.done():
            return False
        if pending.deadline_s is not None and now >= pending.deadline_s:
            _fail(pending.future, DeadlineExceeded(f"deadline passed in {self._name}'s queue"))
            return False
        expires_s = pending.admission.expires_s
        if expires_s is not None and now >= expires_s:
            _fail(pending.future, FrameExpired(f"frame passed its max age in {self._name}'s queue"))
            return False
        return True

    def _next_expiry_s(self) -> float | None:
        """When the next queued request's queue timeout, max age or deadline passes: it is
        answered then, not when a batch happens to form."""
        times = [self._queue.next_timeout_s()]
        for queued in self._queue:
            times += [queued.item.deadline_s, queued.item.admission.expires_s]
        return min((s for s in times if s is not None), default=None)

    def _drop_dead(self) -> None:
        """Removes requests whose caller went away, whose deadline or max age passed."""
        if self._queue:
            now = time.monotonic()
            self._queue.keep(lambda q: self._alive(q.item, now))

    async def _form_batches(self) -> None:
        while True:
            await self._wait_for_slot()
            batch = await self._next_batch()
            if batch is None:
                self._free_slots += 1
                return
            task = asyncio.create_task(self._run(batch))
            self._batches[task] = batch
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.pop(task, None)
        self._free_slots += 1
        self._wakeup.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("model %s: batch task failed", self._name, exc_info=task.exception())

    async def _sleep(self, wait_s: float, now: float) -> None:
        """Until the loop is woken (a request, a cancellation, a free slot), wait_s passes, or
        the next queued request's timeout, max age or deadline comes."""
        next_s = self._next_expiry_s()
        if next_s is not None:
            wait_s = min(wait_s, max(0.0, next_s - now))
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(None if math.isinf(wait_s) else wait_s):
                await self._wakeup.wait()

    def _expire(self, now: float) -> None:
        """Answers the queued requests that are over: gone, past their deadline or max age,
        or (REJECT) past their queue timeout; DELAY ones move back."""
        self._drop_dead()
        for late in self._queue.apply_timeouts(now):
            _fail(
                late.item.future,
                QueueTimeout(
                    f"queue timeout passed in {self._name}'s queue (its queue policy: "
                    "timeout_action REJECT)"
                ),
            )

    async def _wait_for_slot(self) -> None:
        """Takes a batch slot; while none is free, queued requests still expire on time."""
        while True:
            now = time.monotonic()
            self._expire(now)
            if self._free_slots > 0:
                self._free_slots -= 1
                return
            await self._sleep(math.inf, now)

    async def _next_batch(self) -> list[_Pending] | None:
        while True:
            now = time.monotonic()
            self._expire(now)
            if self._closing and not self._queue:
                return None
            ready = [q for q in self._queue if self._eligible(q)]
            oldest_wait_s = now - min(q.enqueued_s for q in ready) if ready else 0.0
            count, wait_s = plan_batch(len(ready), oldest_wait_s, self._config)
            if count:
                batch = [q.item for q in self._queue.pop_batch(count, self._eligible)]
                self._busy_flows.update(
                    p.admission.flow
                    for p in batch
                    if p.admission.latest and p.admission.flow is not None
                )
                return batch
            await self._sleep(wait_s, now)

    def _eligible(self, queued: Queued[_Pending]) -> bool:
        """A LATEST stream runs one frame at a time: while one of its frames runs, its next
        waits queued (where a newer frame still supersedes it), then runs alone, on every core
        a backend gives a lone request. The next to run is so always the newest."""
        return not (queued.item.admission.latest and queued.flow in self._busy_flows)

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            await self._run_batch(batch)
        finally:
            for pending in batch:
                if pending.admission.latest:
                    self._busy_flows.discard(pending.admission.flow)
            self._wakeup.set()

    async def _run_batch(self, batch: list[_Pending]) -> None:
        try:
            await self._run_once(batch)
        except SegserveError as exc:
            # Only a failed inference may be one bad input's fault; UNAVAILABLE (no server left),
            # RESOURCE_EXHAUSTED and the like would fail one by one just the same.
            if len(batch) == 1 or not isinstance(exc, InferenceFailed):
                for pending in batch:
                    _fail(pending.future, exc)
            else:
                log.warning(
                    "model %s: batch of %d failed (%s); retrying one by one",
                    self._name,
                    len(batch),
                    exc,
                )
                for pending in batch:
                    try:
                        await self._run_once([pending])
                    except SegserveError as single_exc:
                        _fail(pending.future, single_exc)
        finally:
            for pending in batch:
                _fail(
                    pending.future,
                    InferenceFailed(f"model {self._name}: batch ended without an answer"),
                )

    async def _run_once(self, batch: list[_Pending]) -> None:
        now = time.monotonic()
        batch = [p for p in batch if self._alive(p, now)]
        if not batch:
            return
        started = time.monotonic()
        tensors = [p.tensor for p in batch]
        backend = self._backend
        if isinstance(backend, AsyncBackend):
            maybe = await self._infer_async(backend, batch)
            if maybe is None:
                return  # every caller went away while it ran
            outputs = maybe
        else:
            loop = asyncio.get_running_loop()
            outputs = await loop.run_in_executor(self._executor, self._infer, backend, tensors)
        infer_s = time.monotonic() - started
        for pending, output in zip(batch, outputs, strict=True):
            _resolve(
                pending.future,
                BatchOutcome(
                    output, started - pending.enqueued_s, infer_s, len(batch), pending.level
                ),
            )
        if self._on_batch is not None:
            try:
                self._on_batch(len(batch), infer_s)
            except Exception:  # metrics must never fail requests already answered
                log.exception("model %s: on_batch callback failed", self._name)

    @contextlib.contextmanager
    def _backend_errors(self, count: int) -> Iterator[None]:
        """A backend's SegserveErrors keep their code; anything else fails the batch (INTERNAL)."""
        try:
            yield
        except SegserveError:
            raise
        except Exception as exc:
            raise InferenceFailed(
                f"model {self._name} failed on a batch of {count}: {exc}"
            ) from exc

    def _infer(self, backend: SyncBackend, tensors: list[np.ndarray]) -> np.ndarray:
        """Runs in the model's executor: stacks the inputs, runs the backend, checks the size."""
        with self._backend_errors(len(tensors)):
            outputs = np.asarray(backend.infer(_stack(tensors)))
        return self._checked(outputs, len(tensors))

    async def _infer_async(self, backend: AsyncBackend, batch: list[_Pending]) -> np.ndarray | None:
        """An asynchronous backend's batch, awaited on the loop with the batch's deadline.

        Returns None if the call was cancelled because every caller of the batch had gone.
        """
        deadline_s = batch_deadline([p.deadline_s for p in batch])
        call = asyncio.ensure_future(backend.infer(np.stack([p.tensor for p in batch]), deadline_s))

        def caller_gone(_: asyncio.Future[BatchOutcome]) -> None:
            if all(p.future.done() for p in batch):
                call.cancel()

        for pending in batch:
            pending.future.add_done_callback(caller_gone)
        try:
            with self._backend_errors(len(batch)):
                outputs = await call
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if call.cancelled() and (task is None or not task.cancelling()):
                self.abandoned_batches += 1
                return None
            raise
        finally:
            for pending in batch:
                pending.future.remove_done_callback(caller_gone)
            if not call.done():
                call.cancel()
        return self._checked(outputs, len(batch))

    def _checked(self, outputs: np.ndarray, count: int) -> np.ndarray:
        if outputs.shape[:1] != (count,):
            raise InferenceFailed(
                f"model {self._name} returned {outputs.shape[:1]} outputs for {count} inputs"
            )
        return outputs
