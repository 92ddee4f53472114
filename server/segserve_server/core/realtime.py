"""Real-time streams: one SegmentStream's options, frames and the fate of each frame.

A `StreamSession` turns the frames an adapter reads into work for the core and each frame's
outcome into a `FrameOut`: OK, DROPPED (policy LATEST: a newer frame of the stream was queued
before it started), EXPIRED (older than its max age when its batch formed) or ERROR. The
ordering, flow control, drain and deadline cut are `core.streams.ordered_answers`'; this module
decides what each frame is and records the stream metrics.

Frames of a stream are one flow for the batcher (fair turns with other streams), numbered in
the order read, at priority level 1 (the highest) unless the stream's options or the frame say
otherwise. A frame's max age counts from when the server read it (the client's clock is not
trusted for it); its capture time is only echoed, and measured against where clocks agree.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from segserve_server.core.requests import SegmentInput, SegmentOutput
from segserve_server.core.service import SegmentationCore
from segserve_server.errors import (
    DeadlineExceeded,
    FrameDropped,
    FrameExpired,
    InvalidArgument,
    SegserveError,
)

__all__ = [
    "REALTIME_PRIORITY",
    "Frame",
    "FrameIn",
    "FrameOut",
    "FrameStatus",
    "Policy",
    "StreamOptions",
    "StreamSession",
]

REALTIME_PRIORITY = 1


class Policy(enum.Enum):
    QUEUE = "queue"
    LATEST = "latest"


class FrameStatus(enum.Enum):
    OK = "OK"
    DROPPED = "DROPPED"
    EXPIRED = "EXPIRED"
    ERROR = "ERROR"


@dataclass(frozen=True)
class StreamOptions:
    policy: Policy = Policy.QUEUE
    max_age_s: float | None = None
    priority: int = 0  # 0: REALTIME_PRIORITY


@dataclass(frozen=True)
class FrameIn:
    """One message of a stream as the adapter read it: a frame, options, or both."""

    frame_id: int = 0
    request: SegmentInput | None = None  # None: an options-only message, or `error`
    error: SegserveError | None = None  # the message could not be read as a frame
    options: StreamOptions | None = None
    policy: Policy | None = None  # this frame only
    max_age_s: float | None = None  # this frame only
    capture_time_us: int = 0


@dataclass(frozen=True)
class Frame:
    """A frame as the session accepted it."""

    frame_id: int
    request: SegmentInput | None
    error: SegserveError | None
    policy: Policy
    sequence: int  # the order the stream read it in
    expires_s: float | None  # time.monotonic()
    capture_time_us: int
    receive_time_us: int
    received_s: float  # time.monotonic()


@dataclass(frozen=True)
class FrameOut:
    frame_id: int
    status: FrameStatus
    output: SegmentOutput | None
    error: SegserveError | None
    capture_time_us: int
    receive_time_us: int
    answer_time_us: int


def _now_us() -> int:
    return time.time_ns() // 1000


class StreamSession:
    """The state of one stream: its options and the numbering of its frames."""

    def __init__(self, core: SegmentationCore, *, deadline_s: float | None = None) -> None:
        self._core = core
        self._deadline_s = deadline_s
        self._options = StreamOptions()
        self._sequence = itertools.count()
        self._flow = object()  # this stream's flow for the batcher's fair turns
        self._newest = -1  # the sequence number of the newest frame read

    async def frames(self, messages: AsyncIterator[FrameIn]) -> AsyncIterator[Frame]:
        """The frames among the messages read (options-only messages change the options)."""
        async for message in messages:
            if message.options is not None:
                self._options = message.options
            if message.request is None and message.error is None:
                continue
            yield self._accept(message)

    def _accept(self, message: FrameIn) -> Frame:
        received_s = time.monotonic()
        max_age_s = message.max_age_s or self._options.max_age_s
        frame = Frame(
            frame_id=message.frame_id,
            request=message.request,
            error=message.error,
            policy=message.policy or self._options.policy,
            sequence=(sequence := next(self._sequence)),
            expires_s=received_s + max_age_s if max_age_s else None,
            capture_time_us=message.capture_time_us,
            receive_time_us=_now_us(),
            received_s=received_s,
        )
        self._newest = sequence
        metrics = self._core.metrics
        metrics.stream_frames_received.labels(self._model(frame), frame.policy.value).inc()
        return frame

    def _model(self, frame: Frame) -> str:
        return self._core.model_label(frame.request.model if frame.request else "")

    @staticmethod
    def latest(frame: Frame) -> bool:
        return frame.policy is Policy.LATEST

    async def answer(self, frame: Frame) -> FrameOut:
        """Runs the frame through the core; every failure becomes the frame's answer."""
        if frame.error is not None or frame.request is None:
            error = frame.error or InvalidArgument("frame has no request")
            return self._out(frame, FrameStatus.ERROR, error=error)
        priority = frame.request.admission.priority or self._options.priority
        admission = replace(
            frame.request.admission,
            priority=priority or REALTIME_PRIORITY,
            flow=self._flow,
            sequence=frame.sequence,
            latest=frame.policy is Policy.LATEST,
            expires_s=frame.expires_s,
            superseded=(
                (lambda: self._newest > frame.sequence) if frame.policy is Policy.LATEST else None
            ),
        )
        request = replace(frame.request, admission=admission)
        try:
            output = await self._core.segment(request, self._deadline_s)
        except FrameDropped:
            return self.dropped(frame)
        except FrameExpired as exc:
            return self._out(frame, FrameStatus.EXPIRED, error=exc)
        except SegserveError as exc:
            return self._out(frame, FrameStatus.ERROR, error=exc)
        return self._out(frame, FrameStatus.OK, output=output)

    def dropped(self, frame: Frame) -> FrameOut:
        return self._out(frame, FrameStatus.DROPPED)

    def cut(self, frame: Frame) -> FrameOut:
        """The answer of a frame still unanswered when the stream's deadline came."""
        error = DeadlineExceeded("the stream's deadline came before this frame was answered")
        return self._out(frame, FrameStatus.ERROR, error=error)

    def _out(
        self,
        frame: Frame,
        status: FrameStatus,
        *,
        output: SegmentOutput | None = None,
        error: SegserveError | None = None,
    ) -> FrameOut:
        answer_time_us = _now_us()
        metrics = self._core.metrics
        model, policy = self._model(frame), frame.policy.value
        metrics.stream_frames_answered.labels(model, policy, status.value).inc()
        if status is FrameStatus.OK:
            metrics.stream_frame_latency.labels(model, policy).observe(
                time.monotonic() - frame.received_s
            )
            if frame.capture_time_us > 0 and answer_time_us >= frame.capture_time_us:
                metrics.stream_capture_to_answer.labels(model, policy).observe(
                    (answer_time_us - frame.capture_time_us) / 1e6
                )
        return FrameOut(
            frame.frame_id,
            status,
            output,
            error,
            frame.capture_time_us,
            frame.receive_time_us,
            answer_time_us,
        )
