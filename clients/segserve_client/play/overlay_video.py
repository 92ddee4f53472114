"""The overlay video of a played stream: one video frame per frame sent, at the playback rate.

A frame answered OK shows its own segmentation blended over it. A frame with no segmentation
(DROPPED, EXPIRED or ERROR) repeats the last overlay shown, as a display of the newest answer
would; frames before the first OK answer show the plain frame. The video is written after the
play (from the first stream's answers), so it costs the paced sender nothing. It needs OpenCV.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from segserve_client.overlay import overlay
from segserve_client.play.sources import decode_rgb, opencv
from segserve_client.types import Segmentation

__all__ = ["overlay_plan", "write_overlay_video"]


def overlay_plan(frames: int, ok_frames: Collection[int]) -> list[int | None]:
    """For each frame 0..frames-1, the frame whose segmentation it shows: itself if it was
    answered OK, else the last earlier OK frame, else None (the plain frame)."""
    plan: list[int | None] = []
    last: int | None = None
    for index in range(frames):
        if index in ok_frames:
            last = index
        plan.append(last)
    return plan


def write_overlay_video(
    path: Path,
    images: Sequence[bytes],
    answers: Mapping[int, Segmentation],
    fps: float,
    colors: np.ndarray,
    alpha: float = 0.5,
) -> int:
    """Writes the MP4 ('mp4v') of frames `images` (encoded, in send order) with the OK
    `answers` by frame index; returns the number of video frames written."""
    cv2 = opencv()
    plan = overlay_plan(len(images), answers.keys())
    first = decode_rgb(images[0])
    size = (first.shape[1], first.shape[0])
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise ValueError(f"OpenCV cannot write an mp4v video to {path}")
    shown: np.ndarray | None = None
    try:
        for index, source in enumerate(plan):
            if source == index:
                rgb = decode_rgb(images[index])
                shown = overlay(rgb, answers[index].labels, colors, alpha=alpha)
            elif source is None:
                shown = decode_rgb(images[index])
            assert shown is not None  # a repeat always follows a shown overlay
            picture = shown
            if (picture.shape[1], picture.shape[0]) != size:
                picture = cv2.resize(picture, size, interpolation=cv2.INTER_LINEAR)
            writer.write(np.ascontiguousarray(picture[:, :, ::-1]))
    finally:
        writer.release()
    return len(plan)
