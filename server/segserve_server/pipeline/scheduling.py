"""When a batch runs and which queued requests form it: Triton's dynamic-batcher timing
(`plan_batch`), its priority levels and queue policies, fair turns between the streams of one
level, and segserve's rule against starvation.

- Levels: requests wait on their priority level (1 is the highest); a batch takes from the
  highest level that has requests, then the next, until it is full (strict priority, as
  Triton's dynamic batcher).
- Queue policy per level (Triton's ModelQueuePolicy): `max_queue_size` bounds each level on its
  own, so a full bulk level never refuses a real-time request; a request whose queue timeout
  passes is rejected (`REJECT`) or moved behind the on-time requests of its level (`DELAY`;
  still ahead of every lower level).
- Fair turns: within a level, requests are grouped by flow (one flow per stream; every unary
  request is a flow of its own) and the flows take turns, oldest first, so one camera cannot
  starve another.
- No starvation (segserve's rule; Triton's priority is strict): after `streak_limit`
  consecutive batches taken from higher levels while a lower level waited, the next batch
  starts with the next request (in its level's turn order) of the highest waiting lower level. Under sustained real-time
  overload, bulk work still gets one of every streak_limit + 1 batches; 0 turns the rule off.

Pure bookkeeping, no clock and no loop: the batcher owns time, futures and the backend.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from segserve_server.errors import QueueFull
from segserve_server.model_repository import BatchingConfig, PriorityConfig, QueuePolicy

__all__ = ["Admission", "PriorityQueue", "Queued", "batch_deadline", "plan_batch"]

T = TypeVar("T")


@dataclass(frozen=True)
class Admission:
    """How a request joins its model's queue (pipeline.scheduling has the rules)."""

    priority: int = 0
    """Triton's priority (1 is the highest); 0, or a level the model lacks: its default level."""
    timeout_us: int = 0
    """Triton's request `timeout`: a queue timeout, where the level's policy allows overrides."""
    flow: Hashable | None = None
    """Requests of one flow (a stream) take turns with other flows; None: a flow of its own."""
    sequence: int = 0
    """The request's place in its flow (frames: the order they were read)."""
    latest: bool = False
    """Stream policy LATEST: supersedes the flow's older queued requests (FrameDropped)."""
    expires_s: float | None = None
    """A frame's max age, on time.monotonic(): past it when its batch forms, FrameExpired."""
    superseded: Callable[[], bool] | None = field(default=None, compare=False)
    """LATEST: true once a newer frame of the flow has been read; checked before decoding, so
    that a frame already out of date costs no decode."""


@dataclass(eq=False)
class Queued(Generic[T]):
    """One queued request: the batcher's item and what scheduling needs to know of it."""

    item: T
    level: int
    flow: Hashable
    enqueued_s: float
    timeout_at_s: float | None = None  # the queue policy's timeout (time.monotonic())
    delayed: bool = False


@dataclass(eq=False)
class _Level(Generic[T]):
    number: int
    policy: QueuePolicy
    flows: OrderedDict[Hashable, deque[Queued[T]]] = field(default_factory=OrderedDict)
    delayed: deque[Queued[T]] = field(default_factory=deque)
    size: int = 0

    def push(self, queued: Queued[T]) -> None:
        if queued.delayed:
            self.delayed.append(queued)
        else:
            self.flows.setdefault(queued.flow, deque()).append(queued)
        self.size += 1

    def pop(self, eligible: Callable[[Queued[T]], bool]) -> Queued[T] | None:
        """The next eligible flow's oldest request (flows take turns), then the delayed ones
        in order; None if no request of the level is eligible."""
        for flow, waiting in self.flows.items():
            if eligible(waiting[0]):
                queued = waiting.popleft()
                if waiting:
                    self.flows.move_to_end(flow)
                else:
                    del self.flows[flow]
                self.size -= 1
                return queued
        for index, queued in enumerate(self.delayed):
            if eligible(queued):
                del self.delayed[index]
                self.size -= 1
                return queued
        return None

    def __iter__(self) -> Iterator[Queued[T]]:
        for waiting in self.flows.values():
            yield from waiting
        yield from self.delayed

    def keep(self, wanted: Callable[[Queued[T]], bool]) -> list[Queued[T]]:
        """Keeps the requests `wanted` accepts, in their order; returns the others."""
        kept: list[Queued[T]] = []
        removed: list[Queued[T]] = []
        for queued in self:
            (kept if wanted(queued) else removed).append(queued)
        if removed:  # pushed back in the same order: flows keep their turns
            self.flows.clear()
            self.delayed.clear()
            self.size = 0
            for queued in kept:
                self.push(queued)
        return removed


class PriorityQueue(Generic[T]):
    """The requests waiting for a batch, by level and flow (see the module doc)."""

    def __init__(self, config: PriorityConfig) -> None:
        self._config = config
        self._levels = [
            _Level[T](number, config.policy_of(number))
            for number in range(1, config.level_count + 1)
        ]
        self._streak = 0

    def __len__(self) -> int:
        return sum(level.size for level in self._levels)

    def __iter__(self) -> Iterator[Queued[T]]:
        for level in self._levels:
            yield from level

    def level_size(self, level: int) -> int:
        return self._levels[level - 1].size

    def policy(self, level: int) -> QueuePolicy:
        return self._levels[level - 1].policy

    def check_room(self, level: int, what: str) -> None:
        """QueueFull if the level is at its policy's max_queue_size."""
        limit = self._levels[level - 1].policy.max_queue_size
        size = self._levels[level - 1].size
        if limit and size >= limit:
            where = f" at priority level {level}" if self._config.levels else ""
            raise QueueFull(f"{what} has {size} requests queued{where} (limit {limit})")

    def push(self, queued: Queued[T]) -> None:
        self._levels[queued.level - 1].push(queued)

    def keep(self, wanted: Callable[[Queued[T]], bool]) -> list[Queued[T]]:
        """Keeps the requests `wanted` accepts; returns the others, removed."""
        removed: list[Queued[T]] = []
        for level in self._levels:
            removed.extend(level.keep(wanted))
        return removed

    def oldest_enqueued_s(self) -> float | None:
        return min((q.enqueued_s for q in self), default=None)

    def next_timeout_s(self) -> float | None:
        """When the next queue timeout passes, among the requests not yet delayed."""
        return min(
            (q.timeout_at_s for q in self if q.timeout_at_s is not None and not q.delayed),
            default=None,
        )

    def apply_timeouts(self, now_s: float) -> list[Queued[T]]:
        """Requests whose queue timeout has passed: REJECT ones are removed and returned, DELAY
        ones move behind the on-time requests of their level."""

        def timed_out(q: Queued[T]) -> bool:
            return q.timeout_at_s is not None and not q.delayed and now_s >= q.timeout_at_s

        rejected: list[Queued[T]] = []
        for level in self._levels:
            late = level.keep(lambda q: not timed_out(q))
            for queued in late:
                if level.policy.timeout_action == "DELAY":
                    queued.delayed = True
                    level.push(queued)
                else:
                    rejected.append(queued)
        return rejected

    def eligible_count(self, eligible: Callable[[Queued[T]], bool]) -> int:
        return sum(1 for q in self if eligible(q))

    def pop_batch(
        self, count: int, eligible: Callable[[Queued[T]], bool] = lambda q: True
    ) -> list[Queued[T]]:
        """The next batch of up to `count` eligible requests (see the module doc for the
        order); requests `eligible` refuses stay queued in their place."""
        batch: list[Queued[T]] = []
        waiting = [level for level in self._levels if any(eligible(q) for q in level)]
        if not waiting:
            return batch
        limit = self._config.streak_limit
        lower_waited = len(waiting) > 1
        if limit and lower_waited and self._streak >= limit:
            turn = waiting[1].pop(eligible)  # the starvation rule's turn
            if turn is not None:
                batch.append(turn)
        for level in waiting:
            while len(batch) < count and (queued := level.pop(eligible)) is not None:
                batch.append(queued)
        took_lower = any(q.level != waiting[0].number for q in batch)
        self._streak = self._streak + 1 if lower_waited and not took_lower else 0
        return batch


def plan_batch(queued: int, oldest_wait_s: float, config: BatchingConfig) -> tuple[int, float]:
    """Decides what to do with `queued` waiting requests, the oldest having waited `oldest_wait_s`.

    Returns (n, 0.0) to run a batch of the n oldest requests now, or (0, wait_s) to wait up to
    wait_s seconds (or until another request arrives) and decide again. The policy follows
    Triton's dynamic batcher: without dynamic_batching every request runs alone; with it, a batch
    runs as soon as it reaches the largest preferred size (or max_batch_size), and otherwise once
    its oldest request has waited max_queue_delay, with everything that is queued.
    """
    if queued <= 0:
        return 0, math.inf
    if not config.enabled:
        return 1, 0.0
    full = config.max_batch_size
    target = max(config.preferred_batch_sizes) if config.preferred_batch_sizes else full
    if queued >= target:
        return target, 0.0
    delay_s = config.max_queue_delay_us / 1e6
    if oldest_wait_s >= delay_s:
        return min(queued, full), 0.0
    return 0, delay_s - oldest_wait_s


def batch_deadline(deadlines: list[float | None]) -> float | None:
    """The time until which somebody waits for a batch: its latest request deadline, or None if
    any request has none."""
    if not deadlines or any(d is None for d in deadlines):
        return None
    return max(d for d in deadlines if d is not None)
