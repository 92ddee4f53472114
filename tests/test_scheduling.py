"""The scheduling rules tested directly: Triton's priority levels and queue policies, fair turns
between flows (streams), and segserve's rule that bulk work is never starved outright."""

from __future__ import annotations

import pytest

from segserve_server.errors import QueueFull
from segserve_server.model_repository import PriorityConfig, QueuePolicy
from segserve_server.pipeline.scheduling import PriorityQueue, Queued


def config(levels: int = 2, default: int = 2, streak: int = 0, **policy: object) -> PriorityConfig:
    return PriorityConfig(
        levels=levels,
        default_level=default,
        default_policy=QueuePolicy(**policy),  # type: ignore[arg-type]
        streak_limit=streak,
    )


def push(queue: PriorityQueue[str], name: str, level: int, flow: object = None, at: float = 0.0,
         timeout_at: float | None = None) -> None:  # fmt: skip
    queue.push(Queued(name, level, flow if flow is not None else name, at, timeout_at))


def names(batch: list[Queued[str]]) -> list[str]:
    return [q.item for q in batch]


def test_level_of_follows_triton():
    c = config(levels=3, default=2)
    assert [c.level_of(p) for p in (0, 1, 2, 3, 4, 99)] == [2, 1, 2, 3, 2, 2]
    single = PriorityConfig()
    assert [single.level_of(p) for p in (0, 1, 7)] == [1, 1, 1]


def test_higher_levels_first_then_fifo():
    queue = PriorityQueue[str](config())
    for i, level in enumerate([2, 2, 1, 2, 1]):
        push(queue, f"r{i}", level, at=i)
    assert names(queue.pop_batch(3)) == ["r2", "r4", "r0"]
    assert names(queue.pop_batch(8)) == ["r1", "r3"]
    assert len(queue) == 0


def test_each_level_has_its_own_queue_limit():
    queue = PriorityQueue[str](config(max_queue_size=2))
    push(queue, "bulk-a", 2)
    push(queue, "bulk-b", 2)
    with pytest.raises(QueueFull, match="priority level 2 \\(limit 2\\)"):
        queue.check_room(2, "model m")
    queue.check_room(1, "model m")  # a full bulk level never refuses real-time work
    per_level = PriorityConfig(
        levels=2,
        default_level=2,
        policies=((1, QueuePolicy(max_queue_size=1)),),
    )
    other = PriorityQueue[str](per_level)
    push(other, "rt", 1)
    with pytest.raises(QueueFull):
        other.check_room(1, "model m")
    for i in range(100):
        push(other, f"bulk{i}", 2)  # level 2: the default policy, unbounded
    other.check_room(2, "model m")


def test_flows_take_turns_within_a_level():
    """One camera sending fast cannot starve another: flows alternate, oldest flow first."""
    queue = PriorityQueue[str](config(levels=0, default=1))
    for i in range(4):
        push(queue, f"a{i}", 1, flow="camera-a", at=i)
    push(queue, "b0", 1, flow="camera-b", at=10)
    push(queue, "b1", 1, flow="camera-b", at=11)
    push(queue, "u0", 1, at=12)  # a unary request: a flow of its own
    order = []
    while len(queue):
        order += names(queue.pop_batch(1))
    assert order == ["a0", "b0", "u0", "a1", "b1", "a2", "a3"]


def test_bulk_is_never_starved_outright():
    """Strict priority while real-time work keeps coming, except that after `streak` batches
    taken from level 1 while level 2 waited, one batch starts with level 2's next request."""
    queue = PriorityQueue[str](config(streak=3))
    for i in range(3):
        push(queue, f"bulk{i}", 2, at=i)
    served = []
    for batch_number in range(12):
        push(queue, f"rt{batch_number}", 1, at=100 + batch_number)
        served.append(names(queue.pop_batch(1))[0])
    assert served == [
        "rt0", "rt1", "rt2", "bulk0",
        "rt3", "rt4", "rt5", "bulk1",
        "rt6", "rt7", "rt8", "bulk2",
    ]  # fmt: skip
    assert names(queue.pop_batch(8)) == ["rt9", "rt10", "rt11"]


def test_strict_priority_when_the_rule_is_off():
    queue = PriorityQueue[str](config(streak=0))
    push(queue, "bulk", 2)
    for i in range(20):
        push(queue, f"rt{i}", 1, at=i)
        assert names(queue.pop_batch(1)) == [f"rt{i}"]
    assert names(queue.pop_batch(1)) == ["bulk"]


def test_a_batch_that_reaches_lower_levels_resets_the_streak():
    queue = PriorityQueue[str](config(streak=2))
    push(queue, "bulk0", 2)
    push(queue, "bulk1", 2)
    push(queue, "rt0", 1)
    assert names(queue.pop_batch(1)) == ["rt0"]  # streak 1
    push(queue, "rt1", 1)
    assert names(queue.pop_batch(4)) == ["rt1", "bulk0", "bulk1"]  # took bulk: streak 0
    push(queue, "bulk2", 2)
    push(queue, "rt2", 1)
    assert names(queue.pop_batch(1)) == ["rt2"]


def test_queue_timeouts_reject_or_delay_as_the_policy_says():
    reject = PriorityQueue[str](config(levels=0, default=1, timeout_action="REJECT"))
    push(reject, "late", 1, at=0, timeout_at=1.0)
    push(reject, "on-time", 1, at=0, timeout_at=5.0)
    assert reject.next_timeout_s() == 1.0
    assert names(reject.apply_timeouts(now_s=2.0)) == ["late"]
    assert names(reject.pop_batch(8)) == ["on-time"]

    delay = PriorityQueue[str](config(levels=2, default=2, timeout_action="DELAY"))
    push(delay, "late", 1, at=0, timeout_at=1.0)
    push(delay, "rt", 1, at=1)
    push(delay, "bulk", 2, at=2)
    assert delay.apply_timeouts(now_s=2.0) == []  # delayed, not rejected
    assert delay.next_timeout_s() is None
    # Behind the on-time requests of its level, still ahead of every lower level.
    assert names(delay.pop_batch(8)) == ["rt", "late", "bulk"]


def test_request_timeouts_override_only_where_allowed():
    assert QueuePolicy(default_timeout_us=500).timeout_us(100) == 500
    allowed = QueuePolicy(default_timeout_us=500, allow_timeout_override=True)
    assert allowed.timeout_us(100) == 100
    assert allowed.timeout_us(900) == 500  # may only shorten it
    assert allowed.timeout_us(0) == 500
    assert QueuePolicy(allow_timeout_override=True).timeout_us(300) == 300
    assert QueuePolicy().timeout_us(300) == 0


def test_keep_removes_and_keeps_turn_order():
    queue = PriorityQueue[str](config(levels=0, default=1))
    for name, flow in [("a0", "a"), ("b0", "b"), ("a1", "a"), ("b1", "b"), ("c0", "c")]:
        push(queue, name, 1, flow=flow)
    removed = queue.keep(lambda q: q.item != "b0")
    assert names(removed) == ["b0"]
    order = []
    while len(queue):
        order += names(queue.pop_batch(1))
    assert order == ["a0", "b1", "c0", "a1"]
