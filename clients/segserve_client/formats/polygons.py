"""Polygons of masks, for tools that take polygon shapes (CVAT, COCO, Label Studio), and back.

Contour tracing and filling need OpenCV (`opencv-python-headless`, which the server has); it is
imported inside the functions, so the rest of the client works without it.

A region is one 8-connected piece of a mask: `{"outer": [[x, y], ...], "holes": [[[x, y], ...],
...]}`, from `cv2.findContours(..., cv2.RETR_CCOMP, ...)`: the outer boundary and the boundaries
of its holes, each a closed ring of integer pixel coordinates (the first point is not repeated).
As in OpenCV, both rings pass through the centres of the mask's own boundary pixels: the outer
ring through the region's outermost pixels, a hole's ring through the region's pixels around the
hole. A piece inside a hole is a region of its own. `tolerance_px` > 0 simplifies each ring with
`cv2.approxPolyDP` (Douglas-Peucker, the largest distance of a dropped boundary pixel from the
ring); 0 keeps every corner of the boundary (`cv2.CHAIN_APPROX_SIMPLE`: only the points of
straight horizontal, vertical and diagonal steps are left out).

`rasterize(regions, height, width)` draws regions back with the same convention (fill the
outer ring and draw it; clear each hole's ring and draw the ring itself back). At tolerance 0
it gives back the mask exactly: every class of the 101 CamVid val maps, and random and noise
masks in the tests. At tolerance 1 px, on those CamVid maps (480x360), the IoU over all classes
of a map is 0.980 at worst (mean 0.986); classes of 10,000 pixels or more keep 0.973 at worst,
thin ones (poles, signs) lose most (0.59 at worst); on a map upscaled to 1920x1080, 0.996.
Tools fill polygons with their own rules, so their masks may differ from these at the edges.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt

__all__ = [
    "ClassPolygons",
    "Region",
    "polygons",
    "polygons_per_class",
    "rasterize",
]


class Region(TypedDict):
    """One connected piece of a mask: its outer ring and the rings of its holes."""

    outer: list[list[int]]
    holes: list[list[list[int]]]


class ClassPolygons(TypedDict):
    """The regions of one class of a label map."""

    class_id: int
    regions: list[Region]


def _cv2() -> ModuleType:
    try:
        import cv2
    except ImportError as exc:
        raise ImportError(
            "segserve_client.formats.polygons needs OpenCV: pip install opencv-python-headless"
        ) from exc
    return cv2


def _ring(cv2: ModuleType, contour: npt.NDArray[Any], tolerance_px: float) -> list[list[int]]:
    if tolerance_px > 0 and len(contour) > 2:
        contour = cv2.approxPolyDP(contour, tolerance_px, True)
    ring: list[list[int]] = contour.reshape(-1, 2).tolist()
    return ring


def _regions(
    cv2: ModuleType, mask: npt.NDArray[np.uint8], tolerance_px: float, offset: tuple[int, int]
) -> list[Region]:
    contours, hierarchy = cv2.findContours(
        mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE, offset=offset
    )
    if hierarchy is None:
        return []
    links = hierarchy.reshape(-1, 4).tolist()  # next, previous, first child, parent
    regions: list[Region] = []
    for index, (_, _, child, parent) in enumerate(links):
        if parent != -1:
            continue
        holes = []
        while child != -1:
            holes.append(_ring(cv2, contours[child], tolerance_px))
            child = links[child][0]
        regions.append({"outer": _ring(cv2, contours[index], tolerance_px), "holes": holes})
    return regions


def _check_tolerance(tolerance_px: float) -> None:
    if not tolerance_px >= 0:
        raise ValueError(f"tolerance_px is >= 0, got {tolerance_px}")


def polygons(mask: npt.ArrayLike, tolerance_px: float = 1.0) -> list[Region]:
    """The regions of a 2-D mask (bool, or non-zero = set) as polygons with holes."""
    _check_tolerance(tolerance_px)
    cv2 = _cv2()
    array = np.asarray(mask)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"a mask is a non-empty 2-D array, got shape {array.shape}")
    binary = np.ascontiguousarray(array != 0 if array.dtype != np.bool_ else array).view(np.uint8)
    return _regions(cv2, binary, tolerance_px, (0, 0))


def polygons_per_class(
    labels: npt.ArrayLike, class_ids: Iterable[int] | None = None, tolerance_px: float = 1.0
) -> list[ClassPolygons]:
    """The regions of each class of a (H, W) label map.

    `class_ids` None: the classes present, in increasing order; given: those, absent ones with
    no regions. Each class is traced inside its own bounding box.
    """
    _check_tolerance(tolerance_px)
    cv2 = _cv2()
    array = np.asarray(labels)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"a label map is a non-empty 2-D array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"a label map holds integer class ids, got {array.dtype}")
    array = np.ascontiguousarray(array)
    if array.dtype == np.uint8:
        present = np.flatnonzero(np.bincount(array.reshape(-1), minlength=256))
    else:
        present = np.unique(array)
    wanted = [int(c) for c in present] if class_ids is None else [int(c) for c in class_ids]
    result: list[ClassPolygons] = []
    for class_id in wanted:
        mask = array == class_id
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            result.append({"class_id": class_id, "regions": []})
            continue
        band = mask[rows[0] : rows[-1] + 1]
        cols = np.flatnonzero(band.any(axis=0))
        crop = np.ascontiguousarray(band[:, cols[0] : cols[-1] + 1]).view(np.uint8)
        offset = (int(cols[0]), int(rows[0]))
        result.append({"class_id": class_id, "regions": _regions(cv2, crop, tolerance_px, offset)})
    return result


def _points(ring: npt.ArrayLike, origin: tuple[int, int]) -> npt.NDArray[np.int32]:
    points = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
    shifted = np.rint(points - np.asarray(origin, dtype=np.float64)).astype(np.int32)
    return shifted.reshape(-1, 1, 2)


def rasterize(regions: Iterable[Region], height: int, width: int) -> npt.NDArray[np.bool_]:
    """Draws regions (from `polygons`) into a (height, width) mask; outside points are clipped."""
    if height <= 0 or width <= 0:
        raise ValueError(f"invalid mask size {width}x{height}")
    cv2 = _cv2()
    out = np.zeros((height, width), dtype=np.uint8)
    for region in regions:
        outer = np.asarray(region["outer"], dtype=np.float64).reshape(-1, 2)
        if outer.size == 0:
            continue
        x0 = max(int(np.floor(outer[:, 0].min())), 0)
        y0 = max(int(np.floor(outer[:, 1].min())), 0)
        x1 = min(int(np.ceil(outer[:, 0].max())) + 1, width)
        y1 = min(int(np.ceil(outer[:, 1].max())) + 1, height)
        if x1 <= x0 or y1 <= y0:
            continue
        # Each region on a canvas of its own: clearing a hole must not clear a piece drawn
        # earlier inside it.
        canvas = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
        ring = _points(outer, (x0, y0))
        cv2.fillPoly(canvas, [ring], 1)
        cv2.polylines(canvas, [ring], True, 1)
        holes = [_points(hole, (x0, y0)) for hole in region["holes"] if len(hole)]
        if holes:
            cv2.fillPoly(canvas, holes, 0)
            cv2.polylines(canvas, holes, True, 1)
        out[y0:y1, x0:x1] |= canvas
    return out.view(np.bool_)
