"""The transport-agnostic core: one segmentation request from image bytes to encoded masks.

Every image API surface (segserve.v1 gRPC, and the image route of the KServe v2 / Triton port)
converts its messages to SegmentInput, awaits SegmentationCore.segment, and converts
SegmentOutput back; the Triton raw-tensor route goes to the model's batcher directly. Decoding,
preprocessing, postprocessing and encoding run in a thread pool (they release the GIL); the
event loop only routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import cv2
import numpy as np

from segserve_client import masks
from segserve_server.core.models import ModelManager, ModelVersion
from segserve_server.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidArgument,
    SegserveError,
)
from segserve_server.metrics import STAGES, Metrics
from segserve_server.model_repository import ModelConfig
from segserve_server.pipeline import decode, postprocess
from segserve_server.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
UNKNOWN_MODEL_LABEL = "_unknown"


class MaskEncoding(enum.Enum):
    SRLE = "srle"
    PNG = "png"
    RAW = "raw"


DEFAULT_ENCODINGS = (MaskEncoding.SRLE,)


@dataclass(frozen=True)
class SegmentInput:
    """One segmentation request, independent of the API it came through."""

    model: str
    image: bytes | memoryview | decode.RawPixels
    version: int = 0
    encodings: tuple[MaskEncoding, ...] = DEFAULT_ENCODINGS
    output_model_size: bool = False
    include_pixel_counts: bool = False
    embed_palette: bool = False


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


class _Stopwatch:
    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed


def check_encodings(encodings: tuple[MaskEncoding, ...]) -> tuple[MaskEncoding, ...]:
    if not encodings:
        return DEFAULT_ENCODINGS
    if len(set(encodings)) != len(encodings):
        raise InvalidArgument(f"encodings {[e.value for e in encodings]} repeat an encoding")
    return encodings


class SegmentationCore:
    """Owns the models and the worker pool; segments images for every API surface."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.models = ModelManager(settings, self.metrics)
        self._limits = decode.ImageLimits(settings.max_image_pixels, settings.max_image_side)

    async def start(self) -> None:
        cv2.setNumThreads(1)  # requests run in parallel in the pool; no nested thread pools
        self._pool = ThreadPoolExecutor(
            self.settings.worker_threads, thread_name_prefix="segserve-cpu"
        )
        await self.models.load_all()

    async def stop(self, timeout_s: float | None = None) -> None:
        """Answers the requests accepted so far, then releases models and threads."""
        await self.models.stop(timeout_s)
        self._pool.shutdown(wait=True, cancel_futures=False)

    async def _in_pool(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args)
        )

    async def segment(
        self, request: SegmentInput, deadline_s: float | None = None
    ) -> SegmentOutput:
        """Segments one image; raises SegserveError subclasses. deadline_s is time.monotonic()."""
        started = time.perf_counter()
        # Unknown names share one label: clients must not be able to mint metric series.
        label = request.model if request.model in self.models.models else UNKNOWN_MODEL_LABEL
        try:
            with self.counted(label):
                try:
                    with self._deadline_errors(deadline_s):
                        async with asyncio.timeout_at(loop_deadline(deadline_s)):
                            output = await self._segment(request, deadline_s)
                except (SegserveError, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    log.exception("segment of model %s failed unexpectedly", request.model)
                    raise InferenceFailed(f"internal error: {type(exc).__name__}: {exc}") from exc
        finally:
            self.metrics.request_latency.labels(label).observe(time.perf_counter() - started)
        output.timings.total = time.perf_counter() - started
        for stage, seconds in output.timings.stages():
            self.metrics.stage_latency.labels(label, stage).observe(seconds)
        return output

    @contextlib.contextmanager
    def counted(self, label: str) -> Iterator[None]:
        """Counts one request of model `label`: in flight while inside, then by status code."""
        code = "OK"
        self.metrics.inflight.labels(label).inc()
        try:
            yield
        except SegserveError as exc:
            code = exc.code.name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            self.metrics.inflight.labels(label).dec()
            self.metrics.requests.labels(label, code).inc()

    @contextlib.contextmanager
    def _deadline_errors(self, deadline_s: float | None) -> Iterator[None]:
        try:
            yield
        except TimeoutError as exc:
            raise DeadlineExceeded("deadline exceeded before the mask was ready") from exc

    async def _segment(self, request: SegmentInput, deadline_s: float | None) -> SegmentOutput:
        if deadline_s is not None and time.monotonic() >= deadline_s:
            raise DeadlineExceeded("deadline had already passed when the request arrived")
        encodings = check_encodings(request.encodings)
        model = self.models.get(request.model, request.version)
        assert model.config is not None and model.batcher is not None
        timings = StageTimings()
        tensor, width, height = await self._in_pool(self._prepare, request.image, model, timings)
        outcome = await model.batcher.submit(tensor, deadline_s)
        timings.queue, timings.infer, timings.batch_size = (
            outcome.queue_s,
            outcome.infer_s,
            outcome.batch_size,
        )
        if request.output_model_size:
            width, height = model.config.input_width, model.config.input_height
        output = await self._in_pool(
            self._finish, outcome.output, model.config, width, height, encodings, request, timings
        )
        output.model_version = model.version
        return output

    def _prepare(
        self,
        image: bytes | memoryview | decode.RawPixels,
        model: ModelVersion,
        timings: StageTimings,
    ) -> tuple[np.ndarray, int, int]:
        """Decode and preprocess, in a worker thread. Returns the tensor and the original size."""
        config = model.config
        assert config is not None and model.preprocessor is not None
        watch = _Stopwatch()
        if isinstance(image, decode.RawPixels):
            decoded = decode.from_raw(image, self._limits)
        else:
            min_size = (
                (config.input_width, config.input_height)
                if self.settings.jpeg_dct_scaling
                else None
            )
            decoded = decode.decode(
                image,
                self._limits,
                order="BGR" if config.channel_order == "BGR" else "RGB",
                min_size=min_size,
            )
        timings.decode = watch.lap()
        tensor = model.preprocessor(decoded)
        timings.preprocess = watch.lap()
        return tensor, decoded.original_width, decoded.original_height

    def _finish(
        self,
        model_output: np.ndarray,
        config: ModelConfig,
        width: int,
        height: int,
        encodings: tuple[MaskEncoding, ...],
        request: SegmentInput,
        timings: StageTimings,
    ) -> SegmentOutput:
        """Postprocess and encode, in a worker thread."""
        output = finish_output(
            model_output,
            config,
            width,
            height,
            encodings,
            include_pixel_counts=request.include_pixel_counts,
            embed_palette=request.embed_palette,
            zlib_level=self.settings.png_compression_level,
        )
        timings.postprocess, timings.encode = output.timings.postprocess, output.timings.encode
        output.timings = timings
        return output


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
) -> SegmentOutput:
    """One image's model output to its answer: label map at width x height, classes, masks.

    Sets the postprocess and encode seconds of the returned timings.
    """
    watch = _Stopwatch()
    _check_output_shape(model_output, config)
    model_labels = postprocess.to_label_map(model_output, config)
    labels = postprocess.resize_labels(model_labels, width, height)
    names = [c.name for c in config.classes]
    if include_pixel_counts:
        counts = postprocess.class_pixel_counts(labels, len(names))
        classes = [ClassCount(int(i), names[i], int(counts[i])) for i in np.flatnonzero(counts)]
    else:
        present = postprocess.classes_present(model_labels, labels, len(names))
        classes = [ClassCount(int(i), names[i], 0) for i in present]
    timings = StageTimings(postprocess=watch.lap())
    encoded = []
    for encoding in encodings:
        if encoding is MaskEncoding.SRLE:
            data = masks.encode_srle(labels, zlib_level=zlib_level)
        elif encoding is MaskEncoding.PNG:
            palette = config.palette if embed_palette else None
            data = masks.encode_png(labels, palette=palette, zlib_level=zlib_level)
        else:
            data = labels.tobytes()
        encoded.append((encoding, data))
    timings.encode = watch.lap()
    return SegmentOutput(width, height, encoded, classes, config.name, 0, timings)


def _check_output_shape(model_output: np.ndarray, config: ModelConfig) -> None:
    """One image's output must be what config.pbtxt declares: labels (H, W) or scores (C, H, W)."""
    size = (config.input_height, config.input_width)
    expected = size if config.outputs_labels else (len(config.classes), *size)
    if model_output.shape != expected:
        raise InferenceFailed(
            f"model {config.name} returned an output of shape {model_output.shape} per image; "
            f"its config declares {expected}"
        )


def loop_deadline(deadline_s: float | None) -> float | None:
    """asyncio's loop clock is time.monotonic() on every platform segserve runs on."""
    if deadline_s is None:
        return None
    return asyncio.get_running_loop().time() + (deadline_s - time.monotonic())
