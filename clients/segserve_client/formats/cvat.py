"""CVAT mask shapes: the run-length `points` of CVAT's API, and the bitmap its detectors return.

CVAT keeps a mask shape (`type: "mask"`) as `points` = run lengths over the shape's bounding box,
row-major, alternating background / foreground and starting with background (a 0 first when the
box's first pixel is set; the last run is left out when it would be background of length 0),
followed by the inclusive box `[x1, y1, x2, y2]` in image pixels. `cvat_mask(mask)` gives exactly
what `cvat_sdk.masks.encode_mask(mask)` gives (an empty mask included: `[1, 0, 0, 0, 0]`, a
1x1 box of background), and `decode_cvat_mask` is `cvat_sdk.masks.decode_mask`.

A serverless (nuclio) detector answers differently: its `mask` field is the flat 0/1 bitmap of
the box, row-major, followed by `[xtl, ytl, xbr, ybr]`; CVAT's lambda manager run-length encodes
it into `points` itself (cvat/apps/lambda_manager/views.py). `cvat_bitmap(mask)` makes that
field; it is larger on the wire, about two bytes of JSON per pixel of the box.

Connectivity: CVAT does not require a mask shape to be connected. Its CamVid import reads a
label map as one mask per class (datumaro's reader: `mask == label_id`), kept as one mask shape
each when "convert masks to polygons" is off. `cvat_masks_per_class` makes one shape per class
by default; with `connectivity=4` or `8` it makes one shape per connected region of each class
(8 matches the outer contours of `cv2.findContours`, which CVAT's mask-to-polygon conversion
uses, and `polygons`). The regions are found from row runs with numpy alone
(`connected_regions`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, TypedDict

import numpy as np
import numpy.typing as npt

from segserve_client.formats._arrays import as_labels, as_mask

__all__ = [
    "CvatShape",
    "connected_regions",
    "cvat_bitmap",
    "cvat_mask",
    "cvat_masks_per_class",
    "decode_cvat_bitmap",
    "decode_cvat_mask",
]

Connectivity = Literal[4, 8]


class CvatShape(TypedDict):
    """One CVAT mask shape: the class and its `points` (run lengths, then x1, y1, x2, y2)."""

    class_id: int
    points: list[int]


def _box(mask: npt.NDArray[np.bool_]) -> tuple[int, int, int, int]:
    """The tight box [x1, x2) x [y1, y2) of a mask; CVAT's 1x1 box at (0, 0) when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return 0, 0, 1, 1
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def cvat_mask(mask: npt.ArrayLike) -> list[int]:
    """A 2-D mask as CVAT mask `points`, exactly as `cvat_sdk.masks.encode_mask` makes them."""
    array = as_mask(mask)
    x1, y1, x2, y2 = _box(array)
    flat = np.ascontiguousarray(array[y1:y2, x1:x2]).reshape(-1)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    lengths = np.diff(bounds)
    runs: list[int] = lengths.tolist()
    if flat[0]:
        runs.insert(0, 0)
    return [*runs, x1, y1, x2 - 1, y2 - 1]


def _split_points(
    points: Sequence[float], height: int, width: int
) -> tuple[Any, int, int, int, int]:
    if len(points) < 5:
        raise ValueError("CVAT mask points have at least one run and the four box coordinates")
    if height <= 0 or width <= 0:
        raise ValueError(f"invalid image size {width}x{height}")
    values = np.asarray(points, dtype=np.float64)
    ints = values.astype(np.int64)
    if np.any(ints != values):
        raise ValueError("CVAT mask points hold integers only")
    x1, y1, x2, y2 = (int(v) for v in ints[-4:])
    if not (0 <= x1 <= x2 < width and 0 <= y1 <= y2 < height):
        raise ValueError(f"invalid CVAT mask box {[x1, y1, x2, y2]} for a {width}x{height} image")
    return ints[:-4], x1, y1, x2 + 1, y2 + 1


def decode_cvat_mask(points: Sequence[float], height: int, width: int) -> npt.NDArray[np.bool_]:
    """CVAT mask `points` back to a (height, width) mask, as `cvat_sdk.masks.decode_mask`."""
    runs, x1, y1, x2, y2 = _split_points(points, height, width)
    if int(runs.min()) < 0:
        raise ValueError("CVAT mask points have a negative run length")
    box = np.repeat((np.arange(runs.size) & 1).astype(np.bool_), runs)
    if box.size != (y2 - y1) * (x2 - x1):
        raise ValueError("the CVAT mask runs do not cover the mask's box")
    full = np.zeros((height, width), dtype=np.bool_)
    full[y1:y2, x1:x2] = box.reshape(y2 - y1, x2 - x1)
    return full


def cvat_bitmap(mask: npt.ArrayLike) -> list[int]:
    """A 2-D mask as a serverless detector's `mask` field: the box's 0/1 pixels, then the box.

    An empty mask gives the same 1x1 box at (0, 0) as `cvat_mask`: `[0, 0, 0, 0, 0]`.
    """
    array = as_mask(mask)
    x1, y1, x2, y2 = _box(array)
    pixels = np.ascontiguousarray(array[y1:y2, x1:x2]).view(np.uint8).tobytes()
    return [*pixels, x1, y1, x2 - 1, y2 - 1]


def decode_cvat_bitmap(mask: Sequence[float], height: int, width: int) -> npt.NDArray[np.bool_]:
    """A serverless detector's `mask` field (box bitmap, then the box) to a (height, width) mask."""
    pixels, x1, y1, x2, y2 = _split_points(mask, height, width)
    if pixels.size != (y2 - y1) * (x2 - x1):
        raise ValueError("the CVAT bitmap does not have one value per pixel of its box")
    full = np.zeros((height, width), dtype=np.bool_)
    full[y1:y2, x1:x2] = (pixels != 0).reshape(y2 - y1, x2 - x1)
    return full


class _RowRuns:
    """The row runs of a label map: row, first column, end column (exclusive) and value."""

    def __init__(self, labels: npt.NDArray[np.integer[Any]]) -> None:
        height, width = labels.shape
        flat = np.ascontiguousarray(labels).reshape(-1)
        starts_run = np.empty(flat.size, dtype=np.bool_)
        starts_run[0] = True
        np.not_equal(flat[1:], flat[:-1], out=starts_run[1:])
        starts_run[::width] = True
        starts = np.flatnonzero(starts_run)
        ends = np.empty_like(starts)
        ends[:-1] = starts[1:]
        ends[-1] = flat.size
        self.height = height
        self.width = width
        self.values = flat[starts]
        self.rows = starts // width
        self.x0 = starts - self.rows * width
        self.x1 = ends - self.rows * width


def _points_of_runs(
    rows: npt.NDArray[np.int64], x0: npt.NDArray[np.int64], x1: npt.NDArray[np.int64]
) -> list[int]:
    """CVAT `points` of the pixels covered by row runs (in row-major order, at least one)."""
    bx1 = int(x0.min())
    bx2 = int(x1.max())
    by1 = int(rows[0])
    by2 = int(rows[-1]) + 1
    box_width = bx2 - bx1
    begin = (rows - by1) * box_width + (x0 - bx1)
    end = begin + (x1 - x0)
    # Runs that touch across the box's row ends (end of one == start of the next) merge.
    joined = end[:-1] == begin[1:]
    bounds = np.empty(2 * begin.size + 2, dtype=np.int64)
    bounds[0] = 0
    bounds[1:-1:2] = begin
    bounds[2:-1:2] = end
    bounds[-1] = box_width * (by2 - by1)
    if joined.any():
        keep = np.ones(bounds.size, dtype=np.bool_)
        where = np.flatnonzero(joined)
        keep[2 + 2 * where] = False
        keep[3 + 2 * where] = False
        bounds = bounds[keep]
    lengths = np.diff(bounds)
    if lengths[-1] == 0:
        lengths = lengths[:-1]
    runs: list[int] = lengths.tolist()
    return [*runs, bx1, by1, bx2 - 1, by2 - 1]


def _run_components(
    rows: npt.NDArray[np.int64],
    x0: npt.NDArray[np.int64],
    x1: npt.NDArray[np.int64],
    width: int,
    connectivity: Connectivity,
) -> npt.NDArray[np.int64]:
    """Connected-component index of each row run (runs sorted row-major), numbered in order of
    each component's first run."""
    count = rows.size
    slack = 0 if connectivity == 4 else 1
    stride = width + 2
    key_start = rows * stride + x0
    key_end = rows * stride + x1
    # Runs of the next row that overlap run a: end > a.x0 - slack and start < a.x1 + slack.
    below = (rows + 1) * stride
    lo = np.searchsorted(key_end, below + x0 - slack, side="right")
    hi = np.searchsorted(key_start, below + x1 + slack, side="left")
    fan = np.maximum(hi - lo, 0)
    total = int(fan.sum())
    parent = np.arange(count, dtype=np.int64)
    if total:
        a = np.repeat(np.arange(count, dtype=np.int64), fan)
        offsets = np.cumsum(fan) - fan
        b = np.repeat(lo, fan) + (np.arange(total, dtype=np.int64) - np.repeat(offsets, fan))
        # Hook the larger root onto the smaller, then flatten the trees, until no edge joins
        # two roots.
        while a.size:
            ra = parent[a]
            rb = parent[b]
            small = np.minimum(ra, rb)
            large = np.maximum(ra, rb)
            live = small != large
            if not live.any():
                break
            a, b, small, large = a[live], b[live], small[live], large[live]
            np.minimum.at(parent, large, small)
            while True:
                grand = parent[parent]
                if np.array_equal(grand, parent):
                    break
                parent = grand
    _, component = np.unique(parent, return_inverse=True)
    return component.astype(np.int64)


def connected_regions(
    mask: npt.ArrayLike, connectivity: Connectivity = 8
) -> tuple[npt.NDArray[np.int32], int]:
    """Labels the connected regions of a 2-D mask (numpy only): (H, W) int32 map, 0 outside the
    mask, 1..n inside in row-major order of each region's first pixel; and n."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity is 4 or 8, got {connectivity}")
    array = as_mask(mask)
    runs = _RowRuns(array.view(np.uint8))
    inside = runs.values != 0
    rows, x0, x1 = runs.rows[inside], runs.x0[inside], runs.x1[inside]
    out = np.zeros(array.shape, dtype=np.int32)
    if rows.size == 0:
        return out, 0
    component = _run_components(rows, x0, x1, runs.width, connectivity)
    # Paint: the runs cover the flat map in order; background runs are 0.
    value = np.zeros(runs.values.size, dtype=np.int32)
    value[inside] = component + 1
    out.reshape(-1)[:] = np.repeat(value, runs.x1 - runs.x0)
    return out, int(component.max()) + 1


def cvat_masks_per_class(
    labels: npt.ArrayLike,
    class_ids: Iterable[int] | None = None,
    *,
    connectivity: Connectivity | None = None,
) -> list[CvatShape]:
    """CVAT mask shapes of a (H, W) label map, from one pass over its row runs.

    `class_ids` None: the classes present, in increasing order; given: those, absent ones left
    out (CVAT has no empty mask shape). `connectivity` None: one shape per class; 4 or 8: one
    shape per connected region of each class, regions in row-major order of their first pixel.
    """
    if connectivity not in (None, 4, 8):
        raise ValueError(f"connectivity is None, 4 or 8, got {connectivity}")
    array = as_labels(labels)
    runs = _RowRuns(array)
    order = np.argsort(runs.values, kind="stable")
    sorted_values = runs.values[order]
    wanted = (
        [int(c) for c in np.unique(sorted_values)]
        if class_ids is None
        else [int(c) for c in class_ids]
    )
    shapes: list[CvatShape] = []
    for class_id in wanted:
        lo = int(np.searchsorted(sorted_values, class_id, side="left"))
        hi = int(np.searchsorted(sorted_values, class_id, side="right"))
        if lo == hi:
            continue
        picked = order[lo:hi]
        rows, x0, x1 = runs.rows[picked], runs.x0[picked], runs.x1[picked]
        if connectivity is None:
            shapes.append({"class_id": class_id, "points": _points_of_runs(rows, x0, x1)})
            continue
        component = _run_components(rows, x0, x1, runs.width, connectivity)
        by_component = np.argsort(component, kind="stable")
        splits = np.flatnonzero(np.diff(component[by_component])) + 1
        for group in np.split(by_component, splits):
            shapes.append(
                {
                    "class_id": class_id,
                    "points": _points_of_runs(rows[group], x0[group], x1[group]),
                }
            )
    return shapes
