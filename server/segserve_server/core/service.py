"""SegmentationCore: the one request path behind every API surface.

Every adapter converts its messages to a `SegmentInput` (an image) or a `TensorInput` (raw model
inputs) and awaits `segment` or `infer_tensors`. Here and only here a request is checked against
its deadline, counted (in flight, then by status code), timed (end to end and per stage) and run
down the pipeline: decode → preprocess → batcher → backend → postprocess → encode. Decoding,
preprocessing, postprocessing and encoding run in a thread pool (they release the GIL); the
event loop only routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TypeVar

import cv2
import numpy as np

from segserve_server.auth import authorize_model
from segserve_server.core import tiling
from segserve_server.core.answers import Stopwatch, finish_output
from segserve_server.core.models import ModelManager, ReadyVersion
from segserve_server.core.requests import (
    Admission,
    SegmentInput,
    SegmentOutput,
    StageTimings,
    TensorInput,
    TensorOutput,
)
from segserve_server.errors import (
    ConfidenceUnavailable,
    DeadlineExceeded,
    FrameDropped,
    InferenceFailed,
    InvalidArgument,
    SegserveError,
)
from segserve_server.metrics import Metrics
from segserve_server.model_repository import ModelConfig
from segserve_server.pipeline import decode, postprocess
from segserve_server.pipeline.batcher import BatchOutcome
from segserve_server.pipeline.encode import (
    MaskEncoding,
    check_annotation_formats,
    check_encodings,
)
from segserve_server.pipeline.scaling import Scaling
from segserve_server.settings import Settings

__all__ = [
    "UNKNOWN_MODEL_LABEL",
    "SegmentationCore",
    "gather_or_cancel",
    "loop_deadline",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
UNKNOWN_MODEL_LABEL = "_unknown"


class SegmentationCore:
    """Owns the models and the worker pool; serves images and tensors for every API surface."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.models = ModelManager(settings, self.metrics)
        self._limits = decode.ImageLimits(settings.max_image_pixels, settings.max_image_side)
        self._auth_required = bool(settings.auth_tokens_file or settings.auth_tokens)
        self._integer_scaling = Scaling(settings.sixteen_bit_scaling)

    async def start(self) -> None:
        cv2.setNumThreads(1)  # requests run in parallel in the pool; no nested thread pools
        self._pool = ThreadPoolExecutor(
            self.settings.worker_threads, thread_name_prefix="segserve-cpu"
        )
        await self.models.load_all()
        self.models.start_polling()

    def abandon(self, message: str, *, waited_s: float) -> int:
        """A drain's budget ran out: fails every request the models still hold (running or
        queued) with UNAVAILABLE `message`, now, while their calls can still be answered, and
        refuses new ones. Returns how many were failed (see ModelManager.abandon)."""
        return self.models.abandon(message, waited_s=waited_s)

    async def stop(self, timeout_s: float | None = None) -> int:
        """Answers the requests accepted so far, then releases models and threads. Returns how
        many requests were failed because timeout_s ran out."""
        await self.models.stop_polling()
        failed = await self.models.stop(timeout_s)
        self._pool.shutdown(wait=True, cancel_futures=False)
        return failed

    async def _in_pool(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args)
        )

    def model_label(self, model: str) -> str:
        """Unknown names share one label: clients must not be able to mint metric series."""
        return model if model in self.models.models else UNKNOWN_MODEL_LABEL

    async def segment(
        self, request: SegmentInput, deadline_s: float | None = None
    ) -> SegmentOutput:
        """Segments one image; raises SegserveError subclasses. deadline_s is time.monotonic()."""
        label = self.model_label(request.model)
        output = await self._served(
            label, deadline_s, "the mask", lambda: self._segment(request, deadline_s)
        )
        self._observe_stages(label, output.timings)
        return output

    async def infer_tensors(
        self, request: TensorInput, deadline_s: float | None = None
    ) -> TensorOutput:
        """Runs a batch of raw model inputs, each item on the model's batcher; the outputs come
        back stacked in the config's output type. Raises SegserveError subclasses."""
        label = self.model_label(request.model)
        output = await self._served(
            label,
            deadline_s,
            f"model {request.model!r}'s output",
            lambda: self._infer_tensors(request, deadline_s),
        )
        self._observe_stages(label, output.timings)
        return output

    async def _served(
        self, label: str, deadline_s: float | None, what: str, work: Callable[[], Awaitable[T]]
    ) -> T:
        """Runs `work` for one request: counted, timed, bounded by its deadline, and with any
        unexpected exception logged and turned into INTERNAL."""
        started = time.perf_counter()
        try:
            with self.counted(label, deadline_s):
                if deadline_s is not None and time.monotonic() >= deadline_s:
                    raise DeadlineExceeded("deadline had already passed when the request arrived")
                try:
                    async with asyncio.timeout_at(loop_deadline(deadline_s)):
                        return await work()
                except TimeoutError as exc:
                    raise DeadlineExceeded(f"deadline exceeded before {what} was ready") from exc
                except (SegserveError, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    log.exception("request for model %s failed unexpectedly", label)
                    raise InferenceFailed(f"internal error: {type(exc).__name__}: {exc}") from exc
        finally:
            self.metrics.request_latency.labels(label).observe(time.perf_counter() - started)

    def _observe_queue(self, model: str, outcome: BatchOutcome) -> None:
        """Queue wait by priority level: what each traffic class waits for a batch."""
        self.metrics.queue_wait.labels(model, str(outcome.level)).observe(outcome.queue_s)

    def _observe_stages(self, label: str, timings: StageTimings) -> None:
        for stage, seconds in timings.stages():
            self.metrics.stage_latency.labels(label, stage).observe(seconds)

    @contextlib.contextmanager
    def counted(self, label: str, deadline_s: float | None = None) -> Iterator[None]:
        """Counts one request of model `label`: in flight while inside, then by status code.

        A request cancelled once its deadline has passed counts as DEADLINE_EXCEEDED: gRPC
        cancels a handler whose deadline expires, which is the deadline at work, not the client
        going away."""
        code = "OK"
        self.metrics.inflight.labels(label).inc()
        try:
            yield
        except SegserveError as exc:
            code = exc.outcome
            raise
        except asyncio.CancelledError:
            # gRPC fires the deadline on its own clock: a few ms either side of ours.
            expired = deadline_s is not None and time.monotonic() >= deadline_s - 0.05
            code = "DEADLINE_EXCEEDED" if expired else "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            self.metrics.inflight.labels(label).dec()
            self.metrics.requests.labels(label, code).inc()

    async def _segment(self, request: SegmentInput, deadline_s: float | None) -> SegmentOutput:
        authorize_model(request.model, required=self._auth_required)  # scope; stream frames' rate
        encodings = check_encodings(request.encodings)
        check_annotation_formats(request.annotations, request.polygon_tolerance_px)
        # Leased until answered: a hot reload retires this version only after that.
        with self.models.lease(request.model, request.version) as model:
            return await self._segment_on(model, request, encodings, deadline_s)

    async def _segment_on(
        self,
        model: ReadyVersion,
        request: SegmentInput,
        encodings: tuple[MaskEncoding, ...],
        deadline_s: float | None,
    ) -> SegmentOutput:
        started = time.perf_counter()
        config = model.config
        if request.include_confidence:
            _check_confidence(config, request.confidence_threshold)
        timings = StageTimings()
        tensor, width, height = await self._in_pool(
            self._prepare,
            request.image,
            model,
            timings,
            request.admission,
            request.ignore_exif_orientation,
            replace(request.decode_options, integer_default=self._integer_scaling),
        )
        if isinstance(tensor, tiling.TiledImage):
            output = await self._segment_tiles(
                model, tensor, request, encodings, deadline_s, timings
            )
        else:
            outcome = await model.batcher.submit(tensor, deadline_s, request.admission)
            self._observe_queue(request.model, outcome)
            timings.queue, timings.infer, timings.batch_size = (
                outcome.queue_s,
                outcome.infer_s,
                outcome.batch_size,
            )
            if request.output_model_size:
                width, height = config.input_width, config.input_height
            output = await self._in_pool(
                self._finish,
                outcome.output,
                config,
                width,
                height,
                encodings,
                request,
                timings,
                model,
            )
        output.model_version = model.version
        output.timings.total = time.perf_counter() - started
        return output

    async def _segment_tiles(
        self,
        model: ReadyVersion,
        image: tiling.TiledImage,
        request: SegmentInput,
        encodings: tuple[MaskEncoding, ...],
        deadline_s: float | None,
        timings: StageTimings,
    ) -> SegmentOutput:
        """An image larger than its tiling model (core/tiling.py): each tile on the batcher, the
        answers stitched (postprocess includes the stitching)."""
        done = await tiling.run_tiles(
            image,
            model,
            deadline_s=deadline_s,
            admission=request.admission,
            confidence=request.include_confidence,
            in_pool=self._in_pool,
            on_outcome=lambda outcome: self._observe_queue(request.model, outcome),
        )
        timings.preprocess += done.preprocess_s
        timings.queue, timings.infer, timings.batch_size = (
            done.queue_s,
            done.infer_s,
            done.batch_size,
        )
        width, height = image.width, image.height
        if request.output_model_size:  # the model's resolution: the canvas
            width, height = image.plan.canvas_width, image.plan.canvas_height
        config = model.config

        def finish() -> SegmentOutput:
            post = tiling.tiled_postprocessed(
                done, config, width, height, count_pixels=request.include_pixel_counts
            )
            output = self._finish(
                np.empty(0), config, width, height, encodings, request, timings, None, post
            )
            output.timings.postprocess += done.stitch_s
            return output

        return await self._in_pool(finish)

    async def _infer_tensors(self, request: TensorInput, deadline_s: float | None) -> TensorOutput:
        authorize_model(request.model, required=self._auth_required)
        with self.models.lease(request.model, request.version) as model:
            return await self._infer_tensors_on(model, request, deadline_s)

    async def _infer_tensors_on(
        self, model: ReadyVersion, request: TensorInput, deadline_s: float | None
    ) -> TensorOutput:
        started = time.perf_counter()
        batch = request.batch
        if batch.ndim == 0 or batch.shape[0] == 0:
            raise InvalidArgument(
                f"input {model.config.input_name!r} of model {request.model!r} has an empty batch "
                f"(shape {list(batch.shape)})"
            )
        outcomes: list[BatchOutcome] = await gather_or_cancel(
            model.batcher.submit(np.ascontiguousarray(batch[i]), deadline_s, request.admission)
            for i in range(batch.shape[0])
        )
        for outcome in outcomes:
            self._observe_queue(request.model, outcome)
        output = np.stack([o.output for o in outcomes]).astype(
            model.config.output_dtype, copy=False
        )
        timings = StageTimings(
            queue=max(o.queue_s for o in outcomes),
            infer=max(o.infer_s for o in outcomes),
            batch_size=max(o.batch_size for o in outcomes),
            total=time.perf_counter() - started,
        )
        return TensorOutput(request.model, model.version, output, timings)

    def _prepare(
        self,
        image: bytes | memoryview | decode.RawPixels,
        model: ReadyVersion,
        timings: StageTimings,
        admission: Admission,
        ignore_exif_orientation: bool = False,
        options: decode.DecodeOptions | None = None,  # wide samples, bands, DICOM window
    ) -> tuple[np.ndarray | tiling.TiledImage, int, int]:
        """Decode and preprocess, in a worker thread. Returns the tensor (or, for an image its
        tiling model cuts into tiles, its canvas) and the original size (in display
        orientation: EXIF orientation applied unless ignore_exif_orientation)."""
        if admission.superseded is not None and admission.superseded():
            raise FrameDropped("a newer frame of the stream came before this one was decoded")
        config = model.config
        if config.pipeline == "device":
            return self._prepare_on_device(image, model, timings, ignore_exif_orientation)
        watch = Stopwatch()
        if isinstance(image, decode.RawPixels):
            decoded = decode.from_raw(image, self._limits)
        else:
            min_size = (
                (config.input_width, config.input_height)
                if self.settings.jpeg_dct_scaling and not config.tiling.enabled
                else None
            )
            decoded = decode.decode(
                image,
                self._limits,
                order="BGR" if config.channel_order == "BGR" else "RGB",
                min_size=min_size,
                ignore_exif_orientation=ignore_exif_orientation,
                options=options,
            )
        timings.decode = watch.lap()
        if config.tiling.enabled and (tiled := tiling.prepare_canvas(decoded, config)):
            timings.preprocess = watch.lap()
            return tiled, decoded.original_width, decoded.original_height
        tensor = model.preprocessor(decoded)
        timings.preprocess = watch.lap()
        return tensor, decoded.original_width, decoded.original_height

    def _prepare_on_device(
        self,
        image: bytes | memoryview | decode.RawPixels,
        model: ReadyVersion,
        timings: StageTimings,
        ignore_exif_orientation: bool,
    ) -> tuple[np.ndarray, int, int]:
        """segserve.pipeline "device" (pipeline/device.py, imported only for such models): the
        tensor stays on the device and the batcher queues its handle (backends/device.py)."""
        from segserve_server.pipeline.device import pipeline_for

        config = model.config
        min_size = (
            (config.input_width, config.input_height) if self.settings.jpeg_dct_scaling else None
        )
        prepared = pipeline_for(model.backend, config, self._limits).prepare(
            image, min_size=min_size, ignore_exif_orientation=ignore_exif_orientation
        )
        timings.decode, timings.preprocess = prepared.decode_s, prepared.preprocess_s
        return prepared.handle, prepared.width, prepared.height

    def _finish(
        self,
        model_output: np.ndarray,
        config: ModelConfig,
        width: int,
        height: int,
        encodings: tuple[MaskEncoding, ...],
        request: SegmentInput,
        timings: StageTimings,
        model: ReadyVersion | None = None,
        done: postprocess.Postprocessed | None = None,
    ) -> SegmentOutput:
        """Postprocess and encode, in a worker thread (postprocess on the device for a model on
        the device pipeline: `model_output` is then its output's handle; none when `done`)."""
        watch = Stopwatch()
        if model is not None and config.pipeline == "device":
            from segserve_server.pipeline.device import pipeline_for

            done = pipeline_for(model.backend, config, self._limits).postprocess(
                model_output,
                width,
                height,
                count_pixels=request.include_pixel_counts,
                confidence=request.include_confidence,
            )
        device_s = watch.lap()
        output = finish_output(
            model_output,
            config,
            width,
            height,
            encodings,
            include_pixel_counts=request.include_pixel_counts,
            embed_palette=request.embed_palette,
            zlib_level=self.settings.png_compression_level,
            annotations=request.annotations,
            polygon_tolerance_px=request.polygon_tolerance_px,
            confidence_threshold=(
                request.confidence_threshold if request.include_confidence else None
            ),
            done=done,
            source=request.image if isinstance(request.image, bytes | memoryview) else None,
            map_coordinates=request.map_coordinates,
        )
        timings.postprocess = device_s + output.timings.postprocess
        timings.encode = output.timings.encode
        output.timings = timings
        return output


def _check_confidence(config: ModelConfig, threshold: float) -> None:
    if not postprocess.has_confidence(config):
        raise ConfidenceUnavailable(
            f"confidence unavailable: model {config.name!r} outputs labels only (add a "
            "confidence output with tools/add_confidence.py, or serve its scores)"
        )
    if not 0.0 <= threshold <= 1.0:
        raise InvalidArgument(f"confidence_threshold {threshold} is not a probability in 0..1")


def loop_deadline(deadline_s: float | None) -> float | None:
    """asyncio's loop clock is time.monotonic() on every platform segserve runs on."""
    if deadline_s is None:
        return None
    return asyncio.get_running_loop().time() + (deadline_s - time.monotonic())


async def gather_or_cancel(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Awaits every one concurrently; on the first failure cancels the rest and raises it."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # retrieved: a second failure is not logged as unhandled
