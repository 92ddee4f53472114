"""Samples wider than 8 bits to the 8-bit pixels a model takes, and the optional format libraries.

16-bit PNG and TIFF, DICOM (after rescale slope/intercept) and GeoTIFF bands are scaled by an
explicit rule (`Scaling`), chosen per request; UNSPECIFIED is the format's documented default
(docs/imaging.md): for 16-bit PNG and TIFF the server's `sixteen_bit_scaling`, by default SHIFT
(the top 8 bits), what segserve always did;
WINDOW for DICOM (the request's window, else the file's, else MINMAX); MINMAX for float samples.

The DICOM and TIFF readers (pydicom, highdicom, tifffile) are the server's `formats` extra,
imported only when such an image arrives: without them those inputs answer FAILED_PRECONDITION
naming the extra (`FormatUnavailable`).
"""

from __future__ import annotations

import enum
import importlib
import math
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from segserve_server.errors import FormatUnavailable, InvalidArgument

__all__ = [
    "EXTRA_HINT",
    "DecodeOptions",
    "Scaling",
    "optional_module",
    "to_uint8",
    "window_to_uint8",
]

EXTRA_HINT = "install the server's `formats` extra: pip install 'segserve[formats]'"


def optional_module(name: str, what: str) -> ModuleType:
    """Imports `name` (a library of the `formats` extra); FormatUnavailable naming the extra
    when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise FormatUnavailable(
            f"{what} needs {name}, which is not installed: {EXTRA_HINT}"
        ) from exc


class Scaling(enum.Enum):
    DEFAULT = "default"  # the format's own default (see the module docstring)
    SHIFT = "shift"
    MINMAX = "minmax"
    WINDOW = "window"


@dataclass(frozen=True)
class DecodeOptions:
    """How an image with wide samples or many bands becomes 8-bit pixels."""

    scaling: Scaling = Scaling.DEFAULT
    window_center: float = 0.0
    window_width: float = 0.0  # 0: not set
    bands: tuple[int, ...] = ()  # TIFF bands, 1-based; (): the default choice
    integer_default: Scaling = Scaling.SHIFT
    """What DEFAULT means for wide integer samples of PNG and TIFF: the server's
    `sixteen_bit_scaling` (SHIFT or MINMAX); DICOM keeps its own windowing rule."""

    def __post_init__(self) -> None:
        if self.integer_default not in (Scaling.SHIFT, Scaling.MINMAX):
            raise InvalidArgument(f"integer_default {self.integer_default} is not SHIFT or MINMAX")
        if not (math.isfinite(self.window_center) and math.isfinite(self.window_width)):
            raise InvalidArgument(
                f"window centre {self.window_center} / width {self.window_width} are not finite"
            )
        if self.window_width < 0:
            raise InvalidArgument(f"window_width {self.window_width} is negative (0: not set)")
        if len(self.bands) not in (0, 1, 3) or any(b < 1 for b in self.bands):
            raise InvalidArgument(
                f"bands {list(self.bands)[:16]} is not one band or three (1-based, as GDAL numbers them)"
            )

    @property
    def has_window(self) -> bool:
        return self.window_width > 0


def window_to_uint8(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's LINEAR VOI function (PS3.3 C.11.2.1.2.1) onto 0..255."""
    if width <= 1:
        return np.where(values > center - 0.5, 255, 0).astype(np.uint8)
    scaled = ((values.astype(np.float32) - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    out: np.ndarray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return out


def _minmax(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return np.zeros(values.shape, np.uint8)
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = (values.astype(np.float32) - low) * (255.0 / (high - low))
    out: np.ndarray = np.clip(np.nan_to_num(np.rint(scaled)), 0, 255).astype(np.uint8)
    return out


def to_uint8(
    values: np.ndarray,
    options: DecodeOptions,
    *,
    default: Scaling,
    shift_bits: int | None = None,
) -> np.ndarray:
    """Samples of any integer or float dtype to uint8 by the request's scaling (`default` for
    Scaling.DEFAULT); uint8 samples come back as they are (scaling is for wider samples).
    SHIFT drops `shift_bits` low bits (default: the dtype's bits beyond 8)."""
    mode = options.scaling if options.scaling is not Scaling.DEFAULT else default
    if mode is Scaling.WINDOW and not options.has_window:
        if options.scaling is Scaling.WINDOW:
            raise InvalidArgument(
                "scaling WINDOW needs window_width > 0 (and window_center) in the request"
            )
        mode = Scaling.MINMAX
    if values.dtype == np.uint8:
        return values
    if mode is Scaling.WINDOW:
        return window_to_uint8(values, options.window_center, options.window_width)
    if mode is Scaling.MINMAX or values.dtype.kind == "f":
        return _minmax(values)
    bits = values.dtype.itemsize * 8
    if values.dtype.kind == "i":  # signed: shift the unsigned range down
        values = values.astype(np.int64) - np.iinfo(values.dtype).min
    shift = max(bits - 8 if shift_bits is None else shift_bits, 0)
    out: np.ndarray = np.clip(values.astype(np.int64) >> shift, 0, 255).astype(np.uint8)
    return out
