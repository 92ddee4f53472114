"""One image's model output to its answer: postprocess (labels at the image's size, classes
present, confidence and review scores), then encode (masks, the annotation tools' formats, the
confidence PNG), each timed. The core calls it for every image; benchmarks call it directly."""

from __future__ import annotations

import time

import numpy as np

from segserve_client import masks
from segserve_server.core.requests import ClassCount, SegmentOutput, StageTimings
from segserve_server.model_repository import ModelConfig
from segserve_server.pipeline import postprocess
from segserve_server.pipeline.encode import (
    AnnotationFormat,
    MaskEncoding,
    encode_annotations,
    encode_masks,
)

__all__ = ["Stopwatch", "finish_output"]


class Stopwatch:
    """Wall-clock laps of a request's stages."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed


def finish_output(
    model_output: np.ndarray,
    config: ModelConfig,
    width: int,
    height: int,
    encodings: tuple[MaskEncoding, ...],
    *,
    include_pixel_counts: bool = False,
    embed_palette: bool = False,
    zlib_level: int = 1,
    annotations: tuple[AnnotationFormat, ...] = (),
    polygon_tolerance_px: float = 0.0,
    confidence_threshold: float | None = None,
    done: postprocess.Postprocessed | None = None,
    source: bytes | memoryview | None = None,
    map_coordinates: bool = False,
) -> SegmentOutput:
    """One image's model output to its answer: postprocess (unless `done`: the device
    pipeline's), then encode. With a confidence_threshold, also the confidence map and the
    review scores. `source`: the encoded image, for the masks that reference it (DICOM SEG,
    GeoTIFF) and, with map_coordinates, polygons in its map coordinates.

    Sets the postprocess and encode seconds of the returned timings.
    """
    watch = Stopwatch()
    done = done or postprocess.postprocess(
        model_output,
        config,
        width,
        height,
        count_pixels=include_pixel_counts,
        confidence=confidence_threshold is not None,
    )
    names = [c.name for c in config.classes]
    classes = [ClassCount(class_id, names[class_id], count) for class_id, count in done.present]
    scores = None
    if confidence_threshold is not None and done.model_confidence is not None:
        scores = postprocess.review_scores(
            done.model_labels, done.model_confidence, confidence_threshold
        )
    timings = StageTimings(postprocess=watch.lap())
    palette = config.palette if embed_palette else None
    encoded = encode_masks(
        done.labels,
        encodings,
        palette=palette,
        zlib_level=zlib_level,
        source=source,
        class_names=names,
        model=config.name,
    )
    affine = None
    if map_coordinates and source is not None and annotations:
        from segserve_server.pipeline.formats_geotiff import map_affine

        affine = map_affine(source, done.labels.shape[1], done.labels.shape[0])
    tools = encode_annotations(
        done.labels, annotations, polygon_tolerance_px=polygon_tolerance_px, map_affine=affine
    )
    confidence_png = (
        masks.encode_png(done.confidence, zlib_level=zlib_level)
        if done.confidence is not None
        else None
    )
    timings.encode = watch.lap()
    return SegmentOutput(
        width, height, encoded, classes, config.name, 0, timings, tools, confidence_png, scores
    )
