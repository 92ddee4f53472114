"""Photometric augmentation beyond brightness/contrast/saturation: hue, blur, noise.

`extra_photometric` works on a float32 RGB crop in 0..255 (H, W, 3), after `data.Augment`'s
jitter; every option at 0 draws no random numbers and leaves the crop untouched, so recipes
without them are unchanged.  Costs on a 256x320 crop, one core: hue ~1 ms (a 3x3 colour matrix,
a rotation about the grey axis in YIQ space), blur ~1 ms, noise ~3 ms.  Needs numpy and OpenCV.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = ["extra_photometric", "hue_matrix"]

_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float64
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def hue_matrix(degrees: float) -> np.ndarray:
    """3x3 float32 matrix M rotating hue by ``degrees``: rgb_out = M @ rgb (greys unchanged)."""
    t = math.radians(degrees)
    rot = np.array(
        [[1.0, 0.0, 0.0], [0.0, math.cos(t), -math.sin(t)], [0.0, math.sin(t), math.cos(t)]]
    )
    matrix: np.ndarray = (_YIQ_TO_RGB @ rot @ _RGB_TO_YIQ).astype(np.float32)
    return matrix


def extra_photometric(
    img: np.ndarray,
    rng: np.random.Generator,
    hue_deg: float = 0.0,
    blur_p: float = 0.0,
    noise: float = 0.0,
) -> np.ndarray:
    """Hue rotation by U(-hue_deg, hue_deg), Gaussian blur (sigma U(0.3, 1.5)) with probability
    ``blur_p``, additive Gaussian noise of sigma U(0, noise); clipped to 0..255."""
    changed = False
    if hue_deg > 0:
        img = img @ hue_matrix(rng.uniform(-hue_deg, hue_deg)).T
        changed = True
    if blur_p > 0 and rng.random() < blur_p:
        img = cv2.GaussianBlur(np.ascontiguousarray(img), (0, 0), rng.uniform(0.3, 1.5))
        changed = True
    if noise > 0:
        sigma = rng.uniform(0.0, noise)
        img = img + rng.normal(0.0, sigma, img.shape).astype(np.float32)
        changed = True
    if not changed:
        return img
    clipped: np.ndarray = np.clip(img, 0.0, 255.0).astype(np.float32)
    return clipped
