"""The images the bench sends: a folder of real images (default: CamVid's val frames), as they
are or resized and re-encoded as JPEG, all read and prepared before the clock starts.

Resizing needs OpenCV (pip install opencv-python-headless), imported only when asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "CAMVID_ENV",
    "IMAGE_SUFFIXES",
    "ImageSet",
    "default_image_folder",
    "load_images",
    "parse_size",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
CAMVID_ENV = "SEGSERVE_CAMVID"


def default_image_folder() -> Path:
    """CamVid's val frames: $SEGSERVE_CAMVID/val, else ../shared/data/camvid/val from here."""
    root = os.environ.get(CAMVID_ENV)
    return (Path(root) if root else Path.cwd().parent / "shared" / "data" / "camvid") / "val"


@dataclass(frozen=True)
class ImageSet:
    """Encoded images, all of one preparation: `size` is "original" or "WxH" (JPEG re-encoded)."""

    size: str
    images: list[bytes]
    folder: str
    jpeg_quality: int | None

    def describe(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "count": len(self.images),
            "mean_bytes": round(float(np.mean([len(i) for i in self.images]))),
            "folder": self.folder,
            "jpeg_quality": self.jpeg_quality,
        }


def _cv2() -> ModuleType:
    """OpenCV, or an ImportError saying how to install it (also used for the chart)."""
    try:
        import cv2
    except ImportError as exc:
        raise ImportError(
            "resizing images and drawing charts need OpenCV: pip install opencv-python-headless"
        ) from exc
    return cv2


def parse_size(text: str) -> tuple[int, int] | None:
    """ "original" -> None; "1920x1080" -> (1920, 1080)."""
    if text == "original":
        return None
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image size {text!r} is not 'original' or WIDTHxHEIGHT") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {text!r} must be positive")
    return width, height


def load_images(
    folder: Path, size: str = "original", *, jpeg_quality: int = 90, limit: int = 0
) -> ImageSet:
    """The images of `folder` (sorted by name, at most `limit` if > 0), as they are or resized
    to `size` (WxH, bilinear) and encoded as JPEG at `jpeg_quality`."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit > 0:
        files = files[:limit]
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    target = parse_size(size)
    if target is None:
        return ImageSet("original", [p.read_bytes() for p in files], str(folder), None)
    cv2 = _cv2()
    images: list[bytes] = []
    for path in files:
        pixels = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if pixels is None:
            raise ValueError(f"{path} does not decode")
        resized = cv2.resize(pixels, target, interpolation=cv2.INTER_LINEAR)
        ok, data = cv2.imencode(".jpg", resized, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        if not ok:
            raise ValueError(f"{path} does not encode as JPEG")
        images.append(data.tobytes())
    return ImageSet(f"{target[0]}x{target[1]}", images, str(folder), jpeg_quality)
