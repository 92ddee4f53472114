"""The request and answer types of the core, independent of any API's messages."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from segserve_server.metrics import STAGES
from segserve_server.pipeline.batcher import Admission
from segserve_server.pipeline.decode import RawPixels
from segserve_server.pipeline.encode import (
    DEFAULT_ENCODINGS,
    AnnotationFormat,
    ClassAnnotation,
    MaskEncoding,
    Region,
)
from segserve_server.pipeline.postprocess import Scores
from segserve_server.pipeline.scaling import DecodeOptions, Scaling

__all__ = [
    "Admission",
    "AnnotationFormat",
    "ClassAnnotation",
    "ClassCount",
    "DecodeOptions",
    "MaskEncoding",
    "Region",
    "Scaling",
    "Scores",
    "SegmentInput",
    "SegmentOutput",
    "StageTimings",
    "TensorInput",
    "TensorOutput",
]


@dataclass(frozen=True)
class SegmentInput:
    """One segmentation request: an image in, encoded masks out."""

    model: str
    image: bytes | memoryview | RawPixels
    version: int = 0
    encodings: tuple[MaskEncoding, ...] = DEFAULT_ENCODINGS
    output_model_size: bool = False
    include_pixel_counts: bool = False
    embed_palette: bool = False
    admission: Admission = field(default_factory=Admission)  # priority, queue timeout, ...
    annotations: tuple[AnnotationFormat, ...] = ()  # the annotation tools' formats wanted
    polygon_tolerance_px: float = 0.0
    include_confidence: bool = False  # confidence map, per-class means, review scores
    confidence_threshold: float = 0.5
    ignore_exif_orientation: bool = False  # decode in stored, not display, orientation
    decode_options: DecodeOptions = field(default_factory=DecodeOptions)  # wide samples, bands
    map_coordinates: bool = False  # polygons also in the GeoTIFF source's map coordinates


@dataclass
class StageTimings:
    """Seconds spent per stage, plus the size of the batch the request ran in."""

    decode: float = 0.0
    preprocess: float = 0.0
    queue: float = 0.0
    infer: float = 0.0
    postprocess: float = 0.0
    encode: float = 0.0
    total: float = 0.0
    batch_size: int = 0

    def stages(self) -> Iterator[tuple[str, float]]:
        for stage in STAGES:
            yield stage, getattr(self, stage)


@dataclass(frozen=True)
class ClassCount:
    class_id: int
    name: str
    pixel_count: int


@dataclass
class SegmentOutput:
    width: int
    height: int
    masks: list[tuple[MaskEncoding, bytes]]
    classes: list[ClassCount]
    model: str
    model_version: int
    timings: StageTimings = field(default_factory=StageTimings)
    annotations: list[ClassAnnotation] = field(default_factory=list)
    confidence_png: bytes | None = None  # include_confidence: the map, 8-bit grey PNG
    scores: Scores | None = None


@dataclass(frozen=True)
class TensorInput:
    """A batch of model inputs exactly as config.pbtxt declares them (the raw-tensor route).

    `batch` has the leading batch dim; each item is queued on the model's batcher on its own, so
    the items share batches, queue limits and deadlines with image requests."""

    model: str
    batch: np.ndarray
    version: int = 0
    admission: Admission = field(default_factory=Admission)


@dataclass(frozen=True)
class TensorOutput:
    """The model's outputs for a TensorInput, stacked again, with the version that ran them."""

    model: str
    model_version: int
    output: np.ndarray
    timings: StageTimings
