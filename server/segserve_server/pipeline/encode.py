"""Encode stage: a (H, W) uint8 label map to the mask encodings a request asked for.

The codecs themselves are the client package's (`segserve_client.masks`), so the server writes
exactly what the client decodes; the client installs with grpcio, protobuf and numpy alone.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import numpy as np

from segserve_client import masks
from segserve_server.errors import InvalidArgument

__all__ = ["DEFAULT_ENCODINGS", "MaskEncoding", "check_encodings", "encode_masks"]


class MaskEncoding(enum.Enum):
    SRLE = "srle"
    PNG = "png"
    RAW = "raw"


DEFAULT_ENCODINGS = (MaskEncoding.SRLE,)


def check_encodings(encodings: tuple[MaskEncoding, ...]) -> tuple[MaskEncoding, ...]:
    """The encodings to produce: SRLE when none is asked for; InvalidArgument on a repeat."""
    if not encodings:
        return DEFAULT_ENCODINGS
    if len(set(encodings)) != len(encodings):
        raise InvalidArgument(f"encodings {[e.value for e in encodings]} repeat an encoding")
    return encodings


def encode_masks(
    labels: np.ndarray,
    encodings: Sequence[MaskEncoding],
    *,
    palette: list[tuple[int, int, int]] | None = None,
    zlib_level: int = 1,
) -> list[tuple[MaskEncoding, bytes]]:
    """Each encoding of `labels`, in the order asked; `palette` is embedded in PNGs if given."""
    encoded = []
    for encoding in encodings:
        if encoding is MaskEncoding.SRLE:
            data = masks.encode_srle(labels, zlib_level=zlib_level)
        elif encoding is MaskEncoding.PNG:
            data = masks.encode_png(labels, palette=palette, zlib_level=zlib_level)
        else:
            data = labels.tobytes()
        encoded.append((encoding, data))
    return encoded
