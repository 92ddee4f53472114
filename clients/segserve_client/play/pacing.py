"""When each frame of a played stream is due, and whether it went out late (pure functions).

The player is a camera at a fixed rate: frame i of every stream is due `i / fps` seconds after
the start and is never sent before it is due. A frame that cannot go out when due (gRPC flow
control held the sender back: the server is not reading) is still sent, as soon as it can be,
and counted as late-sent when it leaves more than half a frame period after its due time. Its
capture time is its due time, not its send time, so a late send shows in capture-to-answer
latency as it would for a real camera whose frames queue up in the sender. Late frames are
never skipped by the sender: what is dropped is the server's decision (policy "latest"), and
every frame of the schedule gets an answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LATE_FRACTION", "Schedule", "choose_fps", "frame_count"]

LATE_FRACTION = 0.5
"""A frame sent more than this fraction of a frame period after its due time is late-sent."""
DEFAULT_FPS = 30.0


def choose_fps(requested: float | None, native: float | None) -> float:
    """The playback rate: the one asked for, else the video's own (if it says one), else 30."""
    if requested is not None:
        if not requested > 0:
            raise ValueError(f"the frame rate is > 0, got {requested}")
        return requested
    if native is not None and math.isfinite(native) and native > 0:
        return native
    return DEFAULT_FPS


def frame_count(fps: float, source_frames: int, duration_s: float | None) -> int:
    """How many frames one stream plays: the source once (no duration), else every frame due
    before `duration_s` (the source repeats from its first frame when it is shorter)."""
    if source_frames < 1:
        raise ValueError("the source has no frames")
    if duration_s is None:
        return source_frames
    if not duration_s > 0:
        raise ValueError(f"the duration is > 0 s, got {duration_s}")
    # Frames due at 0, 1/fps, ... strictly before duration_s (the epsilon absorbs rounding:
    # 0.1 s at 30 fps is 3 frames, not 4).
    return max(1, math.ceil(duration_s * fps - 1e-9))


@dataclass(frozen=True)
class Schedule:
    """The frames of one stream: `frames` of them at `fps`, cycling over `source_frames`."""

    fps: float
    frames: int
    source_frames: int

    @classmethod
    def create(cls, fps: float, source_frames: int, duration_s: float | None = None) -> Schedule:
        return cls(fps, frame_count(fps, source_frames, duration_s), source_frames)

    @property
    def period_s(self) -> float:
        return 1.0 / self.fps

    @property
    def length_s(self) -> float:
        """From the start to the due time of the frame after the last: the played time."""
        return self.frames / self.fps

    def due_s(self, index: int) -> float:
        """When frame `index` is due, in seconds after the start."""
        return index / self.fps

    def wait_s(self, index: int, elapsed_s: float) -> float:
        """How long to wait, `elapsed_s` after the start, before sending frame `index` (0: now)."""
        return max(0.0, self.due_s(index) - elapsed_s)

    def is_late(self, index: int, sent_s: float) -> bool:
        """Whether frame `index` sent `sent_s` after the start went out late."""
        return sent_s - self.due_s(index) > LATE_FRACTION * self.period_s

    def source_index(self, index: int) -> int:
        """The frame of the source that frame `index` plays."""
        return index % self.source_frames

    def capture_time_us(self, start_time_us: int, index: int) -> int:
        """Frame `index`'s capture time (its due time) on the wall clock of the start."""
        return start_time_us + round(index * 1e6 / self.fps)
