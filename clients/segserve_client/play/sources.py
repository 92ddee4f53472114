"""What the stream player plays: the frames of a video file or of a folder of images, read and
encoded before the clock starts, so that sending a frame costs the player no decoding.

A folder's images (.png, .jpg, .jpeg, .bmp, .webp) are played in file-name order and sent as the
files are. CamVid names its frames `<sequence>_<frame>.png` (`0001TP_006690.png`): the part
before the first `_` is the sequence, and `sequence` keeps one. A video's frames are decoded
with OpenCV (cv2.VideoCapture) and sent as JPEG. OpenCV is imported only when needed: to read a
video, and to decode frames for the overlay video.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from segserve_client.bench.images import IMAGE_SUFFIXES
from segserve_client.play.pacing import choose_fps, frame_count

__all__ = [
    "Source",
    "decode_rgb",
    "load_source",
    "opencv",
    "select_images",
    "sequence_of",
    "sequences",
]


def opencv() -> ModuleType:
    try:
        import cv2
    except ImportError as exc:
        raise ImportError(
            "reading videos and writing the overlay video need OpenCV: "
            "pip install opencv-python-headless"
        ) from exc
    return cv2


def sequence_of(name: str) -> str:
    """The sequence of a CamVid-style file name: "0001TP_006690.png" -> "0001TP" ("" for a
    name with no `_`)."""
    stem = Path(name).stem
    return stem.split("_", 1)[0] if "_" in stem else ""


def sequences(names: Iterable[str]) -> list[str]:
    """The sequences of these file names, sorted, each once."""
    return sorted({sequence_of(n) for n in names} - {""})


def select_images(names: Iterable[str], sequence: str | None = None) -> list[str]:
    """The image file names among `names`, in name order, only those of `sequence` if given."""
    images = sorted(n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES)
    if sequence is not None:
        images = [n for n in images if sequence_of(n) == sequence]
    return images


@dataclass(frozen=True)
class Source:
    """Encoded frames to play, in order. `native_fps` is a video's own rate (None: unknown)."""

    kind: str  # "video" or "images"
    path: str
    frames: list[bytes]
    names: list[str]
    native_fps: float | None = None
    sequence: str | None = None

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "path": self.path,
            "frames": len(self.frames),
            "sequence": self.sequence,
            "native_fps": self.native_fps,
        }


def load_source(
    path: Path,
    *,
    sequence: str | None = None,
    fps: float | None = None,
    duration_s: float | None = None,
    jpeg_quality: int = 90,
) -> Source:
    """The frames of a folder of images or a video file: only as many as a play of
    `duration_s` at `fps` (None: the video's own rate, else 30) needs; all without a duration.

    Raises FileNotFoundError for a missing path, ValueError for a source with no frames.
    """

    def limit(native_fps: float | None) -> int:
        if duration_s is None:
            return 0
        return frame_count(choose_fps(fps, native_fps), 2**62, duration_s)

    if path.is_dir():
        return _load_folder(path, sequence, limit(None))
    if not path.is_file():
        raise FileNotFoundError(f"no such video file or image folder: {path}")
    if sequence is not None:
        raise ValueError("--sequence picks the frames of an image folder, not of a video")
    return _load_video(path, limit, jpeg_quality)


def _load_folder(folder: Path, sequence: str | None, limit: int) -> Source:
    names = [p.name for p in folder.iterdir() if p.is_file()]
    chosen = select_images(names, sequence)
    if not chosen:
        if sequence is not None:
            found = ", ".join(sequences(select_images(names))) or "none"
            raise ValueError(f"no images of sequence {sequence!r} in {folder} (sequences: {found})")
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    if limit > 0:
        chosen = chosen[:limit]
    frames = [(folder / name).read_bytes() for name in chosen]
    return Source("images", str(folder), frames, chosen, None, sequence)


def _load_video(path: Path, limit_of: Callable[[float | None], int], jpeg_quality: int) -> Source:
    cv2 = opencv()
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise ValueError(f"OpenCV cannot open {path} as a video")
        native = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        limit = limit_of(native if native > 0 else None)
        frames: list[bytes] = []
        while limit <= 0 or len(frames) < limit:
            ok, bgr = capture.read()
            if not ok:
                break
            encoded_ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
            if not encoded_ok:
                raise ValueError(f"frame {len(frames)} of {path} does not encode as JPEG")
            frames.append(data.tobytes())
    finally:
        capture.release()
    if not frames:
        raise ValueError(f"{path} has no frames OpenCV can decode")
    names = [f"frame {i}" for i in range(len(frames))]
    return Source("video", str(path), frames, names, native if native > 0 else None)


def decode_rgb(data: bytes) -> np.ndarray:
    """An encoded frame as (H, W, 3) uint8 RGB (OpenCV)."""
    cv2 = opencv()
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("a frame of the source does not decode")
    return np.ascontiguousarray(bgr[:, :, ::-1])
