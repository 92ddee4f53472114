"""Colouring label maps for people: class colours, colourised maps and overlays on the image.

`colorize` and `overlay` need only numpy. Reading and writing image files (`load_image_rgb`,
`save_image_rgb`) uses OpenCV, imported when called: pip install opencv-python-headless.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TypeAlias

import numpy as np

__all__ = [
    "Colors",
    "color_table",
    "colorize",
    "default_colors",
    "load_image_rgb",
    "overlay",
    "resize_nearest",
    "save_image_rgb",
]

Colors: TypeAlias = np.ndarray | Sequence[tuple[int, int, int]]
"""Class colours indexed by class id: an (N, 3) array or a list of (r, g, b), N <= 256."""


def default_colors(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: (n, 3) uint8 RGB, class 0 black, neighbours far apart."""
    if not 0 <= n <= 256:
        raise ValueError(f"a colour map has 0 to 256 colours, got {n}")
    ids = np.arange(n)
    colors = np.zeros((n, 3), dtype=np.uint8)
    for bit in range(8):
        for channel in range(3):
            colors[:, channel] |= (((ids >> (3 * bit + channel)) & 1) << (7 - bit)).astype(np.uint8)
    return colors


def color_table(colors: Colors | None = None) -> np.ndarray:
    """A (256, 3) uint8 lookup table: `colors` first, default colours for the ids beyond."""
    table = default_colors(256)
    if colors is not None:
        given = np.asarray(colors)
        if given.ndim != 2 or given.shape[1] != 3 or given.shape[0] > 256:
            raise ValueError(f"colours are an (N <= 256, 3) array, got shape {given.shape}")
        if given.size and (given.min() < 0 or given.max() > 255):
            raise ValueError("colour channels are 0..255")
        table[: given.shape[0]] = given
    return table


def _check_labels(labels: np.ndarray) -> None:
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"a label map is a 2-D uint8 array, got {labels.dtype} {labels.shape}")


def colorize(labels: np.ndarray, colors: Colors | None = None) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image of a (H, W) label map, each pixel its class's colour."""
    _check_labels(labels)
    painted: np.ndarray = color_table(colors)[labels]
    return painted


def resize_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes a label map with nearest-neighbour sampling (pixel centres), numpy only."""
    _check_labels(labels)
    if labels.shape == (height, width):
        return labels
    rows = ((np.arange(height) + 0.5) * (labels.shape[0] / height)).astype(np.intp)
    cols = ((np.arange(width) + 0.5) * (labels.shape[1] / width)).astype(np.intp)
    resized: np.ndarray = labels[
        np.minimum(rows, labels.shape[0] - 1)[:, None], np.minimum(cols, labels.shape[1] - 1)
    ]
    return resized


def overlay(
    image_rgb: np.ndarray,
    labels: np.ndarray,
    colors: Colors | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blends the class colours over an (H, W, 3) RGB (or (H, W) grey) uint8 image.

    Each pixel is (1 - alpha) * image + alpha * colour, rounded. A label map of another size (an
    OUTPUT_SIZE_MODEL answer) is first resized to the image with nearest-neighbour sampling.
    """
    if image_rgb.dtype != np.uint8:
        raise ValueError(f"the image must be uint8, got {image_rgb.dtype}")
    if image_rgb.ndim == 2:
        image_rgb = np.repeat(image_rgb[:, :, None], 3, axis=2)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"the image must be (H, W, 3) or (H, W), got shape {image_rgb.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is between 0 and 1, got {alpha}")
    painted = colorize(resize_nearest(labels, *image_rgb.shape[:2]), colors)
    blended = image_rgb * np.float32(1.0 - alpha) + painted * np.float32(alpha)
    return np.rint(blended).astype(np.uint8)


def _cv2() -> ModuleType:
    try:
        import cv2
    except ImportError as exc:
        raise ImportError(
            "reading and writing images needs OpenCV: pip install opencv-python-headless"
        ) from exc
    return cv2


def load_image_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads an image file (JPEG, PNG, WebP, BMP, ...) as (H, W, 3) uint8 RGB, with OpenCV."""
    cv2 = _cv2()
    bgr = cv2.imdecode(np.frombuffer(Path(path).read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{os.fspath(path)} is not an image OpenCV can decode")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def save_image_rgb(path: str | os.PathLike[str], image_rgb: np.ndarray) -> None:
    """Writes an (H, W, 3) uint8 RGB image, its format from the file's suffix, with OpenCV."""
    cv2 = _cv2()
    suffix = Path(path).suffix or ".png"
    try:
        ok, data = cv2.imencode(suffix, np.ascontiguousarray(image_rgb[:, :, ::-1]))
    except cv2.error as exc:
        raise ValueError(f"OpenCV cannot write a {suffix} image: {exc}") from exc
    if not ok:
        raise ValueError(f"OpenCV cannot write a {suffix} image")
    Path(path).write_bytes(data.tobytes())
