"""COCO run-length masks: pycocotools' compressed RLE, encoded and decoded with numpy alone.

A COCO RLE is `{"size": [h, w], "counts": str}`. The counts are run lengths over the mask in
column-major (Fortran) order, alternating background / foreground and starting with background
(so a mask whose first pixel is set starts with a 0). The string is maskApi.c's `rleToString`:
from the fourth count on, each count is stored as the difference to the count two places before;
each value is then written as a little-endian base-32 signed number, 5 bits per character, bit
0x20 of a character meaning "more characters follow", every character offset by 48 (so "0" to
"o"). `coco_rle(mask)` gives what `pycocotools.mask.encode(np.asfortranarray(mask))` gives, with
`counts` as `str` (pycocotools gives `bytes`; `decode_coco_rle` and pycocotools accept both).

`coco_rle_per_class(labels)` makes one RLE per class of a label map from a single pass over the
column-major label map, with the area and the bounding box `[x, y, w, h]` that
`pycocotools.mask.area` and `pycocotools.mask.toBbox` give (as ints; an empty mask has area 0 and
bbox [0, 0, 0, 0]).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt

from segserve_client.formats._arrays import as_labels, as_mask

__all__ = [
    "CocoClassMask",
    "CocoRle",
    "coco_counts",
    "coco_rle",
    "coco_rle_per_class",
    "counts_from_string",
    "counts_to_string",
    "decode_coco_rle",
]

# A count takes at most 12 characters here (60 bits): far beyond any image size.
_MAX_CHARS = 12


class CocoRle(TypedDict):
    """A compressed COCO RLE as COCO JSON carries it."""

    size: list[int]
    counts: str


class CocoClassMask(TypedDict):
    """One class of a label map: its RLE, its pixel count and its box [x, y, width, height]."""

    class_id: int
    rle: CocoRle
    area: int
    bbox: list[int]


def _runs_of_flat(flat: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    """Alternating run lengths of a flat bool array, starting with a (possibly empty) False run."""
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.empty(changes.size + 2, dtype=np.int64)
    bounds[0] = 0
    bounds[1:-1] = changes
    bounds[-1] = flat.size
    lengths = np.diff(bounds)
    if flat[0]:
        lengths = np.concatenate(([0], lengths))
    return lengths


def coco_counts(mask: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """The uncompressed COCO counts of a 2-D mask (column-major, starting with background)."""
    array = as_mask(mask)
    return _runs_of_flat(array.T.reshape(-1))


def counts_to_string(counts: npt.ArrayLike) -> str:
    """maskApi.c `rleToString`: counts (non-negative ints) to the compressed COCO string."""
    cnts = np.asarray(counts, dtype=np.int64).reshape(-1)
    if cnts.size == 0:
        return ""
    x = cnts.copy()
    x[3:] -= cnts[1:-2]
    # Characters per value: the fewest k with -2**(5k-1) <= x < 2**(5k-1).
    k = np.ones(x.size, dtype=np.int64)
    limit = 16
    chars = 1
    biggest = max(int(x.max()), -int(x.min()) - 1)
    while biggest >= limit:
        k += (x >= limit) | (x < -limit)
        limit <<= 5
        chars += 1
        if chars > _MAX_CHARS:
            raise ValueError("a COCO count is too large")
    shifts = 5 * np.arange(chars, dtype=np.int64)
    digits = (x[:, None] >> shifts) & 0x1F
    digits |= np.where(np.arange(chars) < (k - 1)[:, None], 0x20, 0)
    digits += 48
    used = np.arange(chars) < k[:, None]
    return digits[used].astype(np.uint8).tobytes().decode("ascii")


def counts_from_string(text: str | bytes) -> npt.NDArray[np.int64]:
    """maskApi.c `rleFrString`: the compressed COCO string back to its counts."""
    data = text.encode("ascii") if isinstance(text, str) else bytes(text)
    if not data:
        return np.zeros(0, dtype=np.int64)
    chars = np.frombuffer(data, dtype=np.uint8).astype(np.int64) - 48
    if int(chars.min()) < 0 or int(chars.max()) > 63:
        raise ValueError("a COCO RLE string holds only the characters '0' to 'o'")
    more = (chars & 0x20) != 0
    if more[-1]:
        raise ValueError("the COCO RLE string ends inside a count")
    ends = np.flatnonzero(~more)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    widths = ends - starts + 1
    if int(widths.max()) > _MAX_CHARS:
        raise ValueError("a COCO count in the string is too large")
    position = np.arange(chars.size, dtype=np.int64) - np.repeat(starts, widths)
    x = np.add.reduceat((chars & 0x1F) << (5 * position), starts)
    negative = (chars[ends] & 0x10) != 0
    x[negative] -= np.left_shift(1, 5 * widths[negative])
    counts = x.copy()
    counts[1::2] = np.cumsum(x[1::2])
    counts[2::2] = np.cumsum(x[2::2])
    return counts


def _rle_from_counts(counts: npt.NDArray[np.int64], height: int, width: int) -> CocoRle:
    return {"size": [height, width], "counts": counts_to_string(counts)}


def coco_rle(mask: npt.ArrayLike) -> CocoRle:
    """A 2-D mask (bool, or non-zero = set) as a compressed COCO RLE, as pycocotools encodes it."""
    array = as_mask(mask)
    height, width = array.shape
    return _rle_from_counts(_runs_of_flat(array.T.reshape(-1)), height, width)


def decode_coco_rle(rle: Mapping[str, Any]) -> npt.NDArray[np.bool_]:
    """A COCO RLE (compressed string or bytes, or uncompressed list of counts) to a (h, w) mask.

    The mask is column-major (Fortran order), as `pycocotools.mask.decode` returns it.
    """
    size = rle["size"]
    height, width = int(size[0]), int(size[1])
    if height < 0 or width < 0:
        raise ValueError(f"invalid COCO RLE size {size}")
    raw = rle["counts"]
    if isinstance(raw, str | bytes | bytearray | memoryview):
        counts = counts_from_string(bytes(raw) if not isinstance(raw, str) else raw)
    else:
        counts = np.asarray(raw, dtype=np.int64).reshape(-1)
    if counts.size and int(counts.min()) < 0:
        raise ValueError("a COCO RLE has a negative count")
    total = int(counts.sum())
    if total != height * width:
        raise ValueError(f"the COCO RLE counts cover {total} pixels, not {height}x{width}")
    values = (np.arange(counts.size) & 1).astype(np.bool_)
    # Column-major, as pycocotools returns it (np.ascontiguousarray for row-major).
    return np.repeat(values, counts).reshape(width, height).T


def coco_rle_per_class(
    labels: npt.ArrayLike, class_ids: Iterable[int] | None = None
) -> list[CocoClassMask]:
    """One COCO RLE per class of a (H, W) label map, with its area and bbox [x, y, w, h].

    `class_ids` None: the classes present, in increasing order. Given: those classes in that
    order, an absent one as an empty mask (counts [H*W], area 0, bbox [0, 0, 0, 0]).
    """
    array = as_labels(labels)
    height, width = array.shape
    total = height * width
    flat = np.ascontiguousarray(array.T).reshape(-1)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.empty(changes.size + 1, dtype=np.int64)
    starts[0] = 0
    starts[1:] = changes
    ends = np.empty_like(starts)
    ends[:-1] = changes
    ends[-1] = total
    values = flat[starts]
    # Runs grouped by class, each group in pixel order (a stable sort keeps it).
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    present = np.unique(sorted_values)
    wanted: Sequence[int] = (
        [int(c) for c in present] if class_ids is None else [int(c) for c in class_ids]
    )
    result: list[CocoClassMask] = []
    for class_id in wanted:
        lo = int(np.searchsorted(sorted_values, class_id, side="left"))
        hi = int(np.searchsorted(sorted_values, class_id, side="right"))
        if lo == hi:
            empty = np.array([total], dtype=np.int64)
            result.append(
                {
                    "class_id": class_id,
                    "rle": _rle_from_counts(empty, height, width),
                    "area": 0,
                    "bbox": [0, 0, 0, 0],
                }
            )
            continue
        runs = order[lo:hi]
        run_starts = starts[runs]
        run_ends = ends[runs]
        bounds = np.empty(2 * runs.size + 2, dtype=np.int64)
        bounds[0] = 0
        bounds[1:-1:2] = run_starts
        bounds[2:-1:2] = run_ends
        bounds[-1] = total
        counts = np.diff(bounds)
        if counts[-1] == 0:
            counts = counts[:-1]
        first_cols = run_starts // height
        last_cols = (run_ends - 1) // height
        x0 = int(first_cols[0])
        x1 = int(last_cols[-1])
        if np.any(first_cols != last_cols):
            # A run that crosses from one column to the next covers the last and first rows.
            y0, y1 = 0, height - 1
        else:
            y0 = int((run_starts % height).min())
            y1 = int(((run_ends - 1) % height).max())
        result.append(
            {
                "class_id": class_id,
                "rle": _rle_from_counts(counts, height, width),
                "area": int((run_ends - run_starts).sum()),
                "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
            }
        )
    return result
