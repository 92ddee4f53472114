"""CamVid (11-class SegNet version) loading, augmentation and class statistics.

Layout expected under ``root`` (see ``../shared/data/camvid/README.md``)::

    train/ trainannot/   367 RGB frames and 8-bit label PNGs (same file names)
    val/   valannot/     101 frames, used for model selection and reporting

Label ids are 0..10 (see :data:`CLASS_NAMES`); 11 is void and is ignored in the
loss and the metrics (the metrics are :mod:`segserve_server.training.scores`', the same as
``segserve eval``'s).  Frames are 480x360 (W x H).

Images are fed to the networks as float32 RGB in 0..1 scale, normalised with
:data:`MEAN` / :data:`STD` (the ImageNet statistics); the training checkpoint
records both so the service can reproduce the preprocessing.

The data set is CC BY-NC 4.0 (personal and research use); weights trained on it
inherit those terms.  Cite Brostow, Fauqueur, Cipolla, "Semantic object classes
in video: a high-definition ground truth database", Pattern Recognition Letters
2009.  The files are read in place and never copied into the repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .photometric import extra_photometric
from .sampling import crop_origin

__all__ = [
    "CLASS_COLORS",
    "CLASS_NAMES",
    "IGNORE_INDEX",
    "MEAN",
    "NATIVE_SIZE",
    "NUM_CLASSES",
    "STD",
    "Augment",
    "class_weights",
    "load_split",
    "load_splits",
    "normalize",
    "resize_pair",
    "split_files",
]

CLASS_NAMES: tuple[str, ...] = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)  # fmt: skip
#: RGB colour per class id, from the data set README (void is 0,0,0).
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_INDEX = 11
#: Normalisation (RGB order, pixel values scaled to 0..1 first): ImageNet statistics.
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: CamVid frame size as (height, width).
NATIVE_SIZE: tuple[int, int] = (360, 480)

_MEAN = np.array(MEAN, dtype=np.float32) * 255.0
_INV_STD = 1.0 / (np.array(STD, dtype=np.float32) * 255.0)


def split_files(root: str | Path, split: str, limit: int = 0) -> list[Path]:
    """The frames of a split, sorted by name; only the first ``limit`` if ``limit`` > 0."""
    files = sorted((Path(root) / split).glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no PNG frames in {Path(root) / split}")
    return files[:limit] if limit > 0 else files


def load_split(root: str | Path, split: str, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Read a split into memory: RGB uint8 (N, H, W, 3) and labels uint8 (N, H, W).

    ``limit`` > 0 reads only the first ``limit`` frames (by name).
    """
    root = Path(root)
    files = split_files(root, split, limit)
    images, labels = [], []
    for f in files:
        bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
        lab = cv2.imread(str(root / f"{split}annot" / f.name), cv2.IMREAD_GRAYSCALE)
        if bgr is None or lab is None:
            raise OSError(f"cannot read {f} or its label")
        if lab.shape != bgr.shape[:2]:
            raise ValueError(f"{f.name}: label size {lab.shape} != image size {bgr.shape[:2]}")
        images.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        labels.append(lab)
    return np.stack(images), np.stack(labels)


def load_splits(
    root: str | Path, splits: tuple[str, ...], limit: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Several splits concatenated in the order given (e.g. train + val for final weights)."""
    parts = [load_split(root, s, limit) for s in splits]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def normalize(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8/float (..., H, W, 3) in 0..255 -> normalised float32 (..., 3, H, W)."""
    x = (rgb.astype(np.float32) - _MEAN) * _INV_STD
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def resize_pair(
    image: np.ndarray, label: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Resize image (bilinear) and label (nearest) to ``size`` = (height, width)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image, label
    return (
        cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR),
        cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST),
    )


@dataclass
class Augment:
    """Random scale, random crop (void-padded), horizontal flip and colour jitter.

    ``rare_p``: probability of a crop centred on a pixel of a class drawn by ``rare_weights``
    (one weight per class id; see :mod:`.sampling`).  ``hue_deg``, ``blur_p``, ``noise``: the
    photometric extras of :mod:`.photometric`.  All at 0 (the defaults) give the original recipe,
    random numbers included.
    """

    crop: tuple[int, int] = (256, 320)
    scale: tuple[float, float] = (0.6, 1.6)
    jitter: float = 0.25  # max relative change of brightness, contrast and saturation
    rare_p: float = 0.0
    rare_weights: tuple[float, ...] = ()
    hue_deg: float = 0.0
    blur_p: float = 0.0
    noise: float = 0.0

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """One RGB uint8 (H, W, 3) + label (H, W) -> normalised (3, h, w) float32 + int64 (h, w)."""
        s = rng.uniform(*self.scale)
        h, w = (round(image.shape[0] * s), round(image.shape[1] * s))
        image, label = resize_pair(image, label, (h, w))
        ch, cw = self.crop
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        if ph or pw:
            image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=0)
            label = cv2.copyMakeBorder(label, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=IGNORE_INDEX)
        y, x = crop_origin(label, (ch, cw), rng, self.rare_p, self.rare_weights)
        img = image[y : y + ch, x : x + cw].astype(np.float32)
        lab = label[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        if self.jitter > 0:
            img = self._colour(img, rng)
        img = extra_photometric(img, rng, self.hue_deg, self.blur_p, self.noise)
        return normalize(img), lab.astype(np.int64)

    def _colour(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        b, c, s = 1.0 + rng.uniform(-self.jitter, self.jitter, size=3)
        img = img * b
        mean = img.mean()
        img = (img - mean) * c + mean
        gray = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        img = (img - gray[..., None]) * s + gray[..., None]
        clipped: np.ndarray = np.clip(img, 0.0, 255.0)
        return clipped


def class_weights(labels: np.ndarray, mode: str = "sqrt-median") -> np.ndarray:
    """Per-class loss weights from training labels (void ignored).

    ``median``: median-frequency balancing (Eigen & Fergus; SegNet): with
    freq(c) = pixels of c / pixels of the images that contain c,
    weight(c) = median(freq) / freq(c).  ``sqrt-median``: its square root, which
    tempers the up to ~70x spread on CamVid.  ``none``: all ones.
    """
    if mode == "none":
        return np.ones(NUM_CLASSES, dtype=np.float32)
    counts = np.zeros(NUM_CLASSES, dtype=np.float64)
    present = np.zeros(NUM_CLASSES, dtype=np.float64)
    for lab in labels:
        c = np.bincount(lab.ravel(), minlength=IGNORE_INDEX + 1)[:NUM_CLASSES]
        counts += c
        present += (c > 0) * lab.size
    if mode not in ("median", "sqrt-median"):
        raise ValueError(f"unknown class-weight mode {mode!r}")
    seen = counts > 0
    freq = counts[seen] / present[seen]
    w = np.ones(NUM_CLASSES)  # classes absent from the labels keep weight 1
    w[seen] = np.median(freq) / freq
    if mode == "sqrt-median":
        w = np.sqrt(w)
    return w.astype(np.float32)
