"""Real-time streams on the client: a stream's options, frames with their own capture times and
overrides, and the fate of each frame (`FrameStatus`, `FrameTiming`, `FrameSkipped`).

Every answer of a SegmentStream says what became of its frame: OK (a `Segmentation`), ERROR (a
`FrameFailed`), DROPPED (policy "latest": a newer frame of the stream superseded it before it
started) or EXPIRED (older than its max age when its batch formed). DROPPED and EXPIRED frames
never ran and are not errors: they come back as `FrameDropped` / `FrameExpired`, both
`FrameSkipped`, never raised. Each result carries a `FrameTiming`: the frame's capture time
(the client's clock, echoed by the server), when the server read and answered it (the server's
clock) and when the client read the answer (the client's clock again).

This module needs only the generated protobuf code; `segserve_client.types` builds on it.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from segserve.v1 import segserve_pb2 as pb

if TYPE_CHECKING:
    from segserve_client.types import ImageInput

__all__ = [
    "POLICIES",
    "FrameDropped",
    "FrameExpired",
    "FrameSkipped",
    "FrameStatus",
    "FrameTimes",
    "FrameTiming",
    "StreamFrame",
    "StreamOptions",
    "now_us",
    "stream_policy",
]

POLICIES: dict[str, pb.StreamPolicy] = {
    "queue": pb.STREAM_POLICY_QUEUE,
    "latest": pb.STREAM_POLICY_LATEST,
}
_UINT32_MAX = 2**32 - 1


def now_us() -> int:
    """Microseconds since the Unix epoch (the clock of capture_time_us)."""
    return time.time_ns() // 1000


def stream_policy(value: str | int) -> pb.StreamPolicy:
    """The StreamPolicy of "queue" / "latest" (any case) or of its protobuf number."""
    if isinstance(value, str) and value.lower() in POLICIES:
        return POLICIES[value.lower()]
    if isinstance(value, int) and not isinstance(value, bool):
        for number in POLICIES.values():
            if number == value:
                return number
    raise ValueError(f"unknown stream policy {value!r}; expected one of {', '.join(POLICIES)}")


def _max_age_ms(value: int | None, what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT32_MAX:
        raise ValueError(f"{what} is None or a whole number of ms >= 0 (0: none), got {value!r}")
    return value


def _priority(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT32_MAX:
        raise ValueError(f"{what} is a priority level >= 0 (1: the highest), got {value!r}")
    return value


class FrameStatus(enum.StrEnum):
    """The fate of one frame of a stream (a str: `status == "OK"` works)."""

    OK = "OK"
    DROPPED = "DROPPED"
    EXPIRED = "EXPIRED"
    ERROR = "ERROR"

    @classmethod
    def from_proto(cls, number: int) -> FrameStatus | None:
        """The status of a FrameStatus number; None for UNSPECIFIED and unknown numbers."""
        return _STATUSES.get(number)


_STATUSES: dict[int, FrameStatus] = {
    pb.FRAME_STATUS_OK: FrameStatus.OK,
    pb.FRAME_STATUS_DROPPED: FrameStatus.DROPPED,
    pb.FRAME_STATUS_EXPIRED: FrameStatus.EXPIRED,
    pb.FRAME_STATUS_ERROR: FrameStatus.ERROR,
}


@dataclass(frozen=True)
class FrameTiming:
    """One frame's fate and times, in microseconds since the Unix epoch (0: not known).

    `capture_time_us` and `arrival_time_us` are on the client's clock (the capture time as sent,
    echoed by the server; the arrival when the client read the answer), `receive_time_us` and
    `answer_time_us` on the server's (when it read the frame and when it answered it).
    """

    frame_id: int
    status: FrameStatus
    capture_time_us: int
    receive_time_us: int
    answer_time_us: int
    arrival_time_us: int

    @property
    def server_us(self) -> int | None:
        """The time the frame spent in the server (answer - receive), if both are known."""
        if self.receive_time_us <= 0 or self.answer_time_us <= 0:
            return None
        return self.answer_time_us - self.receive_time_us

    @property
    def capture_to_answer_us(self) -> int | None:
        """From capture to the client reading the answer, both on the client's clock."""
        if self.capture_time_us <= 0 or self.arrival_time_us <= 0:
            return None
        return self.arrival_time_us - self.capture_time_us

    @classmethod
    def from_proto(
        cls, response: pb.SegmentStreamResponse, status: FrameStatus, arrival_time_us: int
    ) -> FrameTiming:
        return cls(
            frame_id=response.frame_id,
            status=status,
            capture_time_us=response.capture_time_us,
            receive_time_us=response.receive_time_us,
            answer_time_us=response.answer_time_us,
            arrival_time_us=arrival_time_us,
        )


class FrameTimes:
    """A stream result's capture, receive and answer times, from its `frame` attribute (a
    FrameTiming, or None: 0 for each)."""

    def _timing(self) -> FrameTiming | None:
        timing: FrameTiming | None = getattr(self, "frame", None)
        return timing

    @property
    def capture_time_us(self) -> int:
        timing = self._timing()
        return timing.capture_time_us if timing else 0

    @property
    def receive_time_us(self) -> int:
        timing = self._timing()
        return timing.receive_time_us if timing else 0

    @property
    def answer_time_us(self) -> int:
        timing = self._timing()
        return timing.answer_time_us if timing else 0


@dataclass(frozen=True)
class FrameSkipped(FrameTimes):
    """A frame the server answered without running it (DROPPED or EXPIRED); not an error.

    `details` is the server's message, if it gave one.
    """

    frame: FrameTiming
    details: str = ""

    @property
    def frame_id(self) -> int:
        return self.frame.frame_id

    @property
    def status(self) -> FrameStatus:
        return self.frame.status

    def __str__(self) -> str:
        return f"frame {self.frame_id}: {self.status}" + (
            f": {self.details}" if self.details else ""
        )


@dataclass(frozen=True)
class FrameDropped(FrameSkipped):
    """Policy "latest": a newer frame of the stream superseded this one before it started."""


@dataclass(frozen=True)
class FrameExpired(FrameSkipped):
    """The frame was older than its max age (since the server read it) when its batch formed."""


@dataclass(frozen=True)
class StreamOptions:
    """A stream's policy, max age (ms, 0: none) and priority level (0: the server's stream
    level, 1), sent as StreamOptions on the first frame of the stream."""

    policy: pb.StreamPolicy = pb.STREAM_POLICY_QUEUE
    max_age_ms: int = 0
    priority: int = 0

    @classmethod
    def create(
        cls, policy: str | int = "queue", max_age_ms: int | None = None, priority: int = 0
    ) -> StreamOptions:
        """Checks the options; raises ValueError naming the bad one."""
        return cls(
            policy=stream_policy(policy),
            max_age_ms=_max_age_ms(max_age_ms, "max_age_ms"),
            priority=_priority(priority, "priority"),
        )

    def proto(self) -> pb.StreamOptions:
        return pb.StreamOptions(
            policy=self.policy, max_age_ms=self.max_age_ms, priority=self.priority
        )


@dataclass(frozen=True)
class StreamFrame:
    """One frame of a stream, with what a (frame_id, image) pair cannot say.

    `capture_time_us`: when it was captured, in microseconds since the Unix epoch on the
    client's clock (None: when the client sends it). `policy` ("queue" / "latest") and
    `max_age_ms` (> 0) apply to this frame only (None: the stream's; the protocol cannot lift the
    stream's max age for one frame). `priority`: this frame's priority level (0: the stream's).
    """

    frame_id: int
    image: ImageInput | pb.Image
    capture_time_us: int | None = None
    policy: str | int | None = None
    max_age_ms: int | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.frame_id, bool) or not 0 <= self.frame_id < 2**64:
            raise ValueError(f"a frame id is a uint64, got {self.frame_id!r}")
        if self.capture_time_us is not None and not 0 <= self.capture_time_us < 2**63:
            raise ValueError(f"capture_time_us is >= 0 microseconds, got {self.capture_time_us}")
        if self.policy is not None:
            stream_policy(self.policy)
        _max_age_ms(self.max_age_ms, "a frame's max_age_ms")
        _priority(self.priority, "a frame's priority")

    def fill(self, message: pb.SegmentStreamRequest) -> None:
        """Sets this frame's capture time, policy, max age and priority on its message (whose
        request is already built)."""
        message.capture_time_us = now_us() if self.capture_time_us is None else self.capture_time_us
        if self.policy is not None:
            message.policy = stream_policy(self.policy)
        message.max_age_ms = self.max_age_ms or 0
        if self.priority:
            message.request.priority = self.priority
