"""Input checks shared by the format codecs: a 2-D mask, a 2-D integer label map."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["as_labels", "as_mask"]


def as_mask(mask: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """A non-empty 2-D bool mask (non-zero is True), or ValueError."""
    array = np.asarray(mask)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"a mask is a non-empty 2-D array, got shape {array.shape}")
    if array.dtype != np.bool_:
        array = array != 0
    return array


def as_labels(labels: npt.ArrayLike) -> npt.NDArray[np.integer[Any]]:
    """A non-empty 2-D integer label map, or ValueError."""
    array = np.asarray(labels)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"a label map is a non-empty 2-D array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"a label map holds integer class ids, got {array.dtype}")
    return array
