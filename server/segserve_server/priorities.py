"""Triton's priority levels and queue policies as a model's config.pbtxt sets them
(`dynamic_batching`), plus segserve's rule against starvation (parameters
segserve.priority_streak_limit). Parsed here, applied by pipeline.scheduling."""

from __future__ import annotations

from dataclasses import dataclass

from tritonclient.grpc import model_config_pb2 as mc

from segserve_server.errors import ModelConfigError

__all__ = ["DEFAULT_STREAK_LIMIT", "PriorityConfig", "QueuePolicy", "parse_priorities"]


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy for the requests of one priority level."""

    timeout_action: str = "REJECT"  # or "DELAY"
    default_timeout_us: int = 0  # 0: no queue timeout
    allow_timeout_override: bool = False  # a request may only shorten the default
    max_queue_size: int = 0  # 0: unbounded

    def timeout_us(self, requested_us: int) -> int:
        """The queue timeout of a request that asked for requested_us (0: none), as Triton
        decides it: the default, or the request's own where overriding is allowed and it is
        shorter (or the default is none)."""
        if (
            self.allow_timeout_override
            and requested_us > 0
            and (self.default_timeout_us == 0 or requested_us < self.default_timeout_us)
        ):
            return requested_us
        return self.default_timeout_us


DEFAULT_STREAK_LIMIT = 8


@dataclass(frozen=True)
class PriorityConfig:
    """Triton's priority levels and queue policies (dynamic_batching), plus segserve's rule
    against starvation (parameters segserve.priority_streak_limit).

    Levels run from 1 (the highest) to `levels`; with `levels` 0 the model has one level and
    every request is on it. A request's priority 0, or one beyond `levels`, is the default level.
    """

    levels: int = 0
    default_level: int = 0
    default_policy: QueuePolicy = QueuePolicy()
    policies: tuple[tuple[int, QueuePolicy], ...] = ()
    streak_limit: int = DEFAULT_STREAK_LIMIT
    """After this many consecutive batches taken from higher levels while a lower level waited,
    the next batch starts with the oldest request of the highest waiting lower level; 0: never
    (strict priority, as Triton)."""

    @property
    def level_count(self) -> int:
        return max(self.levels, 1)

    def level_of(self, priority: int) -> int:
        """The level (1-based) a request of this priority waits on."""
        if self.levels == 0:
            return 1
        if priority < 1 or priority > self.levels:
            return self.default_level
        return priority

    def policy_of(self, level: int) -> QueuePolicy:
        return dict(self.policies).get(level, self.default_policy)


def _queue_policy(policy: mc.ModelQueuePolicy) -> QueuePolicy:
    return QueuePolicy(
        timeout_action="DELAY" if policy.timeout_action == mc.ModelQueuePolicy.DELAY else "REJECT",
        default_timeout_us=policy.default_timeout_microseconds,
        allow_timeout_override=policy.allow_timeout_override,
        max_queue_size=policy.max_queue_size,
    )


def parse_priorities(raw: mc.ModelConfig) -> PriorityConfig:
    """priority_levels, default_priority_level and the queue policies, checked as Triton does."""
    dyn = raw.dynamic_batching
    levels, default = dyn.priority_levels, dyn.default_priority_level
    if levels and not 1 <= default <= levels:
        raise ModelConfigError(
            f"default_priority_level {default} is not in 1..priority_levels ({levels})"
        )
    policies = []
    for level, policy in sorted(dyn.priority_queue_policy.items()):
        if not 1 <= level <= max(levels, 0):
            raise ModelConfigError(
                f"priority_queue_policy names level {level}; priority_levels is {levels}"
            )
        policies.append((level, _queue_policy(policy)))
    key = "segserve.priority_streak_limit"
    text = raw.parameters[key].string_value if key in raw.parameters else None
    try:
        streak = DEFAULT_STREAK_LIMIT if text is None else int(text)
    except ValueError:
        streak = -1
    if streak < 0:
        raise ModelConfigError(
            f"parameter segserve.priority_streak_limit = {text!r} is not a count >= 0"
        )
    return PriorityConfig(
        levels=levels,
        default_level=default if levels else 1,
        default_policy=_queue_policy(dyn.default_queue_policy),
        policies=tuple(policies),
        streak_limit=streak,
    )
