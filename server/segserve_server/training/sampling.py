"""Crop placement for training: uniform, or centred on a pixel of a rarely seen class.

CamVid's thin classes (Pole, SignSymbol, Fence, Pedestrian, Bicyclist) cover about 1 % of the
pixels each, so a uniform 256x320 crop often holds none of them.  With probability ``rare_p``,
`crop_origin` instead draws a class among those present in the (scaled) label map, with
probability proportional to ``class_weights`` (weight 0: never drawn), then a pixel of that class
uniformly, and centres the crop on it (clamped to the image).  Needs numpy only; the random
numbers come from the caller's generator, so a run stays reproducible and resumable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["crop_origin", "rare_centre"]


def rare_centre(
    label: np.ndarray, class_weights: Sequence[float], rng: np.random.Generator
) -> tuple[int, int] | None:
    """(y, x) of a pixel of a class drawn by ``class_weights`` among those in ``label``.

    None when no class with a positive weight is present (the caller falls back to uniform).
    """
    weights = np.asarray(class_weights, dtype=np.float64)
    counts = np.bincount(label.ravel(), minlength=weights.size)[: weights.size]
    w = np.where(counts > 0, weights, 0.0)
    total = w.sum()
    if total <= 0:
        return None
    cls = int(rng.choice(weights.size, p=w / total))
    ys, xs = np.nonzero(label == cls)
    i = int(rng.integers(ys.size))
    return int(ys[i]), int(xs[i])


def crop_origin(
    label: np.ndarray,
    crop: tuple[int, int],
    rng: np.random.Generator,
    rare_p: float = 0.0,
    class_weights: Sequence[float] = (),
) -> tuple[int, int]:
    """Top-left (y, x) of a ``crop`` = (h, w) window inside ``label`` (at least that large).

    ``rare_p`` = 0 draws no extra random numbers, so the uniform crops are those of a run
    without the option.
    """
    ch, cw = crop
    height, width = label.shape
    if rare_p > 0 and len(class_weights) and rng.random() < rare_p:
        centre = rare_centre(label, class_weights, rng)
        if centre is not None:
            cy, cx = centre
            return (
                int(np.clip(cy - ch // 2, 0, height - ch)),
                int(np.clip(cx - cw // 2, 0, width - cw)),
            )
    y = int(rng.integers(0, height - ch + 1))
    x = int(rng.integers(0, width - cw + 1))
    return y, x
