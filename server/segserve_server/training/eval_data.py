"""The labelled data set of `segserve eval`: which folders, which image/label pairs, label maps.

DATASET is either the image folder itself, whose labels are `--labels-dir` or, by default, the
sibling `<folder>annot` (CamVid: val + valannot), or a root holding `--images-dir` and
`--labels-dir` (default val and valannot). A label has the image's file name (or `<stem>.png`
for a JPEG image) and holds one class id per pixel, as an 8-bit single-channel PNG.

`EvalError`, the error of every `segserve eval` step, is defined here (the other eval modules
build on this one) and re-exported by `evaluate`.

Needs numpy and OpenCV.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "IMAGE_SUFFIXES",
    "EvalError",
    "Sample",
    "list_samples",
    "read_label",
    "resolve_dataset",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class EvalError(Exception):
    """The evaluation cannot run or had to stop; the message says why."""


@dataclass(frozen=True)
class Sample:
    """An image file and its label file."""

    image: Path
    label: Path


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def _relative(root: Path, given: str) -> Path:
    path = Path(given)
    if path.is_absolute():
        return path
    for candidate in (root / path, root.parent / path, path):
        if candidate.is_dir():
            return candidate
    return root / path


def resolve_dataset(
    dataset: str | Path, images_dir: str | None = None, labels_dir: str | None = None
) -> tuple[Path, Path]:
    """(image folder, label folder) of DATASET; see the module docstring for the rules."""
    root = Path(dataset)
    if not root.is_dir():
        raise EvalError(f"data set {str(root)!r} is not a folder")
    if images_dir is not None:
        images = _relative(root, images_dir)
    elif _has_images(root):
        images = root
    elif (root / "val").is_dir():
        images = root / "val"
    else:
        raise EvalError(
            f"{root} holds no images and no val/ folder; point DATASET at the image folder "
            "or give --images-dir"
        )
    if labels_dir is not None:
        labels = _relative(root, labels_dir)
    else:
        labels = images.parent / f"{images.name}annot"
    if not images.is_dir():
        raise EvalError(f"image folder {images} does not exist")
    if not labels.is_dir():
        raise EvalError(
            f"label folder {labels} does not exist; give --labels-dir (labels are PNGs of "
            "class ids with the images' file names)"
        )
    return images, labels


def list_samples(images: Path, labels: Path, limit: int = 0) -> list[Sample]:
    """Image/label pairs by file name, sorted; every image must have its label."""
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EvalError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images}")
    samples, missing = [], []
    for image in files:
        label = labels / image.name
        if not label.is_file():
            label = labels / f"{image.stem}.png"
        if label.is_file():
            samples.append(Sample(image, label))
        else:
            missing.append(image.name)
    if missing:
        raise EvalError(
            f"{len(missing)} of {len(files)} images have no label in {labels} (first: {missing[0]})"
        )
    return samples[:limit] if limit > 0 else samples


def read_label(path: Path) -> np.ndarray:
    """A (H, W) uint8 map of class ids."""
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise EvalError(f"label {path} does not decode as an image")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise EvalError(
            f"label {path} is {label.dtype} with shape {label.shape}; labels are 8-bit "
            "single-channel maps of class ids (not colour-coded)"
        )
    return label
