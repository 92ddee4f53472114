"""Tiled inference: an image larger than the model is cut into overlapping tiles and stitched.

Chosen per model (config.pbtxt's segserve.tiling, model_repository.TilingConfig). The image is
first brought to the model's resolution, the *canvas*: resized by 1 / segserve.tile_scale (no
resize at scale 1). A canvas no larger than the model input in either direction is not tiled
(resized to the input as before). Otherwise it is cut into tiles of exactly the input's size,
spread evenly along each axis so that neighbours overlap by at least segserve.tile_overlap_px
and the last tile ends at the canvas's edge; an axis shorter than the input is padded (edge
pixels repeated) and the padding cropped off again.

Each tile is one request on the model's batcher: tiles batch with each other and with other
requests, with the image's priority and deadline. At most `inflight_tiles` are prepared or
queued at once, and their outputs are stitched in raster order into a band of rows, so a huge
image never holds all its tile tensors or a full-size score volume.

Stitching (`blend_rule`):
- "scores" (a scores model): per pixel, the tiles' softmax probabilities averaged with weights
  that fall linearly from 1 to 0 across each overlap (a cross-fade; 1 along the image's edges),
  then argmax; confidence is 255 × the blended maximum.
- "confidence" (labels with a confidence output): the label of the tile with the highest
  weight × confidence (the earlier tile on a tie); confidence is that tile's.
- "centre" (labels only, or segserve.tile_blend "centre"): the label of the tile whose centre
  is nearest, per axis (the earlier tile on a tie): each tile's overlaps cut halfway.
A pixel covered by one tile only always gets that tile's answer, so with zero overlap a tiled
answer equals the tiles' own answers exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import cv2
import numpy as np

from segserve_server.core.model_state import ReadyVersion
from segserve_server.errors import FrameDropped
from segserve_server.model_repository import ModelConfig
from segserve_server.pipeline import postprocess
from segserve_server.pipeline.batcher import Admission, BatchOutcome
from segserve_server.pipeline.decode import DecodedImage
from segserve_server.pipeline.preprocess import Preprocessor

__all__ = [
    "Stitcher",
    "Tile",
    "TilePlan",
    "TiledImage",
    "TiledResult",
    "axis_cuts",
    "axis_starts",
    "axis_weights",
    "blend_rule",
    "inflight_tiles",
    "plan_tiles",
    "prepare_canvas",
    "run_tiles",
    "tiled_postprocessed",
]

T = TypeVar("T")


def axis_starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Tile starts along one axis: the fewest tiles of `tile` px overlapping by at least
    `overlap` px that cover `length`, spread evenly (the first at 0, the last ending at length)."""
    if length <= tile:
        return (0,)
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    return tuple(round(i * (length - tile) / (count - 1)) for i in range(count))


def axis_cuts(starts: tuple[int, ...], tile: int, length: int) -> tuple[int, ...]:
    """Where each tile's own pixels begin and end (len(starts) + 1 bounds): pixel x is tile i's
    when its centre is nearest to x's centre; on a tie the earlier tile's."""
    inner = tuple((a + b + tile - 1) // 2 + 1 for a, b in itertools.pairwise(starts))
    return (0, *inner, max(length, tile))


def axis_weights(starts: tuple[int, ...], index: int, tile: int) -> np.ndarray:
    """Tile `index`'s blending weights along one axis: a linear ramp across each overlap with a
    neighbour (neighbours' ramps add up to 1), 1 elsewhere, never 0."""
    position = np.arange(tile, dtype=np.float32) + 0.5
    weights = np.ones(tile, dtype=np.float32)
    start = starts[index]
    if index > 0 and (before := starts[index - 1] + tile - start) > 0:
        weights = np.minimum(weights, position / before)
    if index + 1 < len(starts) and (after := start + tile - starts[index + 1]) > 0:
        weights = np.minimum(weights, (tile - position) / after)
    return weights


@dataclass(frozen=True)
class Tile:
    """One tile: its place in the grid and on the (padded) canvas."""

    index: int
    row: int
    col: int
    x: int
    y: int


@dataclass(frozen=True)
class TilePlan:
    """The tile grid of one canvas (canvas_* before padding to at least one tile)."""

    canvas_width: int
    canvas_height: int
    tile_width: int
    tile_height: int
    xs: tuple[int, ...]
    ys: tuple[int, ...]

    @property
    def padded_width(self) -> int:
        return max(self.canvas_width, self.tile_width)

    @property
    def padded_height(self) -> int:
        return max(self.canvas_height, self.tile_height)

    @property
    def count(self) -> int:
        return len(self.xs) * len(self.ys)

    def tiles(self) -> Iterator[Tile]:
        """Raster order: row by row, left to right."""
        for row, y in enumerate(self.ys):
            for col, x in enumerate(self.xs):
                yield Tile(row * len(self.xs) + col, row, col, x, y)


def plan_tiles(width: int, height: int, config: ModelConfig) -> TilePlan | None:
    """The plan for an image of width × height, or None when it is not tiled (tiling off, or a
    canvas no larger than the model input)."""
    tiling = config.tiling
    if not tiling.enabled:
        return None
    canvas_w = max(1, round(width / tiling.scale))
    canvas_h = max(1, round(height / tiling.scale))
    tile_w, tile_h = config.input_width, config.input_height
    if canvas_w <= tile_w and canvas_h <= tile_h:
        return None
    return TilePlan(
        canvas_w,
        canvas_h,
        tile_w,
        tile_h,
        axis_starts(canvas_w, tile_w, tiling.overlap_px),
        axis_starts(canvas_h, tile_h, tiling.overlap_px),
    )


def blend_rule(config: ModelConfig) -> str:
    """ "scores", "confidence" or "centre": how this model's tiles are stitched."""
    if config.tiling.blend == "centre":
        return "centre"
    if not config.outputs_labels:
        return "scores"
    return "confidence" if config.confidence_output is not None else "centre"


def inflight_tiles(config: ModelConfig) -> int:
    """Tiles of one image prepared or queued at once: two full batches, at least 2."""
    return max(2, 2 * config.batching.max_batch_size)


@dataclass(frozen=True)
class TiledImage:
    """A decoded image on its way through tiles: the padded canvas and its plan."""

    canvas: np.ndarray  # (padded_height, padded_width, 3 or 1) in `order`
    order: Any
    plan: TilePlan
    width: int  # the original image's (display) size
    height: int


def prepare_canvas(decoded: DecodedImage, config: ModelConfig) -> TiledImage | None:
    """The canvas of a decoded image, or None when it is not tiled (see plan_tiles)."""
    width, height = decoded.original_width, decoded.original_height
    plan = plan_tiles(width, height, config)
    if plan is None:
        return None
    pixels = decoded.pixels
    if pixels.shape[1::-1] != (plan.canvas_width, plan.canvas_height):
        shrink = plan.canvas_width < pixels.shape[1]
        pixels = cv2.resize(
            pixels,
            (plan.canvas_width, plan.canvas_height),
            interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
        )
    pad_w, pad_h = plan.padded_width - plan.canvas_width, plan.padded_height - plan.canvas_height
    if pad_w or pad_h:
        pixels = cv2.copyMakeBorder(pixels, 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE)
    return TiledImage(pixels, decoded.order, plan, width, height)


def _tile_tensor(image: TiledImage, tile: Tile, preprocessor: Preprocessor) -> np.ndarray:
    plan = image.plan
    crop = image.canvas[tile.y : tile.y + plan.tile_height, tile.x : tile.x + plan.tile_width]
    return preprocessor(DecodedImage(crop, image.order, plan.tile_width, plan.tile_height, "tile"))


class Stitcher:
    """Joins tile outputs, given in raster order, into the canvas's labels (and confidence).

    "scores" and "confidence" keep per-pixel state for the rows of the current tile row only
    (the band); rows above the next tile row are final when it starts."""

    def __init__(self, plan: TilePlan, config: ModelConfig, *, confidence: bool) -> None:
        self._plan, self._config, self._rule = plan, config, blend_rule(config)
        size = (plan.padded_height, plan.padded_width)
        self.labels = np.zeros(size, dtype=np.uint8)
        self.confidence = np.zeros(size, dtype=np.uint8) if confidence else None
        self._x_cuts = axis_cuts(plan.xs, plan.tile_width, plan.canvas_width)
        self._y_cuts = axis_cuts(plan.ys, plan.tile_height, plan.canvas_height)
        self._wx = [axis_weights(plan.xs, i, plan.tile_width) for i in range(len(plan.xs))]
        self._wy = [axis_weights(plan.ys, i, plan.tile_height) for i in range(len(plan.ys))]
        self._top = 0
        self._row = -1
        # scores: (C + 2, rows, W): weighted probabilities, the weights' sum, tiles covering
        self._band: np.ndarray | None = None
        self._next = 0

    def add(self, tile: Tile, output: np.ndarray) -> None:
        """Stitches one tile's model output (as the batcher returns it)."""
        if tile.index != self._next:
            raise ValueError(f"tile {tile.index} given out of order (expected {self._next})")
        self._next += 1
        postprocess.check_output_shape(output, self._config)
        if self._rule == "centre":
            self._add_centre(tile, output)
            return
        if tile.row != self._row:
            self._start_row(tile)
        weights = self._wy[tile.row][:, None] * self._wx[tile.col][None, :]
        if self._rule == "scores":
            self._add_scores(tile, output, weights)
        else:
            self._add_confidence(tile, output, weights)

    def finish(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The canvas's labels and confidence (None unless asked for), padding cropped."""
        if self._rule == "scores" and self._band is not None:
            self._flush(self._top + self._band.shape[1])
        rows, cols = self._plan.canvas_height, self._plan.canvas_width
        confidence = None if self.confidence is None else self.confidence[:rows, :cols]
        return self.labels[:rows, :cols], confidence

    def _window(self, tile: Tile) -> tuple[slice, slice]:
        plan = self._plan
        return slice(tile.y, tile.y + plan.tile_height), slice(tile.x, tile.x + plan.tile_width)

    def _add_centre(self, tile: Tile, output: np.ndarray) -> None:
        y0, y1 = self._y_cuts[tile.row], self._y_cuts[tile.row + 1]
        x0, x1 = self._x_cuts[tile.col], self._x_cuts[tile.col + 1]
        own = (slice(y0 - tile.y, y1 - tile.y), slice(x0 - tile.x, x1 - tile.x))
        config = self._config
        values = postprocess.label_output(output, config)
        part = values[(slice(None), *own)] if values.ndim == 3 else values[own]
        self.labels[y0:y1, x0:x1] = postprocess.to_label_map(part, config)
        if self.confidence is not None:
            if config.confidence_output is not None:
                self.confidence[y0:y1, x0:x1] = output[1][own]
            elif not config.outputs_labels:
                self.confidence[y0:y1, x0:x1] = postprocess.softmax_confidence(part)

    def _start_row(self, tile: Tile) -> None:
        """A new tile row: rows above it are final; the band moves down to cover it."""
        plan = self._plan
        top, bottom = tile.y, tile.y + plan.tile_height
        if self._rule == "scores":
            planes = len(self._config.classes) + 2
            if self._band is not None:
                self._flush(top)
            band = np.zeros((planes, bottom - top, plan.padded_width), dtype=np.float32)
        else:
            band = np.zeros((1, bottom - top, plan.padded_width), dtype=np.float32)
        if self._band is not None:
            kept = self._band[:, top - self._top :]
            band[:, : kept.shape[1]] = kept
        self._band, self._top, self._row = band, top, tile.row

    def _add_scores(self, tile: Tile, output: np.ndarray, weights: np.ndarray) -> None:
        assert self._band is not None
        scores = output.astype(np.float32, copy=False)
        probs = np.exp(scores - scores.max(axis=0))
        probs *= weights / probs.sum(axis=0)
        rows, cols = self._window(tile)
        band = self._band[:, rows.start - self._top : rows.stop - self._top, cols]
        band[:-2] += probs
        band[-2] += weights
        # Where no other tile has been, the tile's own argmax (exact, not a float blend).
        first = band[-1] == 0
        self.labels[rows, cols][first] = postprocess.to_label_map(output, self._config)[first]
        band[-1] += 1

    def _flush(self, stop: int) -> None:
        """Scores: rows [top, stop) of the band are final: argmax (and confidence) written."""
        assert self._band is not None
        count = stop - self._top
        if count <= 0:
            return
        part = self._band[:, :count]
        shared = part[-1] > 1  # covered by one tile only: its own argmax, set in _add_scores
        labels = self.labels[self._top : stop]
        labels[shared] = part[:-2].argmax(axis=0).astype(np.uint8)[shared]
        if self.confidence is not None:
            share = part[:-2].max(axis=0) / np.maximum(part[-2], 1e-12)
            self.confidence[self._top : stop] = np.rint(255.0 * share).astype(np.uint8)

    def _add_confidence(self, tile: Tile, output: np.ndarray, weights: np.ndarray) -> None:
        assert self._band is not None
        labels = postprocess.to_label_map(output[0], self._config)
        score = weights * output[1]
        rows, cols = self._window(tile)
        best = self._band[0, rows.start - self._top : rows.stop - self._top, cols]
        better = score > best
        best[better] = score[better]
        self.labels[rows, cols][better] = labels[better]
        if self.confidence is not None:
            self.confidence[rows, cols][better] = output[1][better]


@dataclass
class TiledResult:
    """A tiled image's canvas labels and confidence, and what its tiles cost."""

    labels: np.ndarray
    confidence: np.ndarray | None
    tiles: int
    preprocess_s: float = 0.0
    queue_s: float = 0.0  # the longest any tile waited
    infer_s: float = 0.0  # the tiles' shares of their batches' run time, summed
    stitch_s: float = 0.0
    batch_size: int = 0  # the largest batch a tile ran in


async def run_tiles(
    image: TiledImage,
    model: ReadyVersion,
    *,
    deadline_s: float | None,
    admission: Admission,
    confidence: bool,
    in_pool: Callable[..., Awaitable[Any]],
    on_outcome: Callable[[BatchOutcome], None] = lambda outcome: None,
) -> TiledResult:
    """Runs every tile of `image` through the model's batcher and stitches them; numpy work
    runs in `in_pool`. At most inflight_tiles(config) tiles are prepared or queued at once."""
    config = model.config
    stitcher = Stitcher(image.plan, config, confidence=confidence)
    result = TiledResult(stitcher.labels, None, image.plan.count)
    # One flow for all tiles: they take turns with other requests' flows as one request does.
    # Never LATEST: sibling tiles must not supersede each other (a newer frame still does,
    # checked before each tile).
    shared = dataclasses.replace(
        admission, flow=admission.flow if admission.flow is not None else object(), latest=False
    )

    async def one(tile: Tile) -> BatchOutcome:
        if admission.superseded is not None and admission.superseded():
            raise FrameDropped("a newer frame of the stream came before this one's tiles ran")
        started = time.perf_counter()
        tensor = await in_pool(_tile_tensor, image, tile, model.preprocessor)
        result.preprocess_s += time.perf_counter() - started
        return await model.batcher.submit(tensor, deadline_s, shared)

    async def stitch(tile: Tile, task: asyncio.Task[BatchOutcome]) -> None:
        outcome = await task
        on_outcome(outcome)
        result.queue_s = max(result.queue_s, outcome.queue_s)
        result.infer_s += outcome.infer_s / max(outcome.batch_size, 1)
        result.batch_size = max(result.batch_size, outcome.batch_size)
        started = time.perf_counter()
        await in_pool(stitcher.add, tile, outcome.output)
        result.stitch_s += time.perf_counter() - started

    window: deque[tuple[Tile, asyncio.Task[BatchOutcome]]] = deque()
    limit = inflight_tiles(config)
    try:
        for tile in image.plan.tiles():
            if len(window) >= limit:
                await stitch(*window.popleft())
            window.append((tile, asyncio.ensure_future(one(tile))))
        while window:
            await stitch(*window.popleft())
    finally:
        for _, task in window:
            task.cancel()
        for _, task in window:
            with contextlib.suppress(BaseException):  # its image has already failed
                await task
    started = time.perf_counter()
    result.labels, result.confidence = stitcher.finish()
    result.stitch_s += time.perf_counter() - started
    return result


def tiled_postprocessed(
    result: TiledResult,
    config: ModelConfig,
    width: int,
    height: int,
    *,
    count_pixels: bool,
) -> postprocess.Postprocessed:
    """The stitched canvas as the answer's Postprocessed at (width, height), as
    postprocess.postprocess makes it for one model-sized output (its time added to stitch_s)."""
    started = time.perf_counter()
    labels = postprocess.resize_labels(result.labels, width, height)
    classes = len(config.classes)
    if count_pixels:
        counts = postprocess.class_pixel_counts(labels, classes)
        present = [(int(i), int(counts[i])) for i in np.flatnonzero(counts)]
    else:
        found = postprocess.classes_present(result.labels, labels, classes)
        present = [(int(i), 0) for i in found]
    confidence = None
    if result.confidence is not None:
        confidence = postprocess.resize_labels(result.confidence, width, height)
    result.stitch_s += time.perf_counter() - started
    return postprocess.Postprocessed(labels, present, result.labels, confidence, result.confidence)
