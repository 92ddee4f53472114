"""The segserve.v1 gRPC servicer: converts protobuf to and from the core, nothing more.

SegserveError becomes a gRPC status here and only here (`_status_of`): unary calls abort with
it, stream frames carry it as FrameError.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from segserve.v1 import segserve_pb2 as pb
from segserve_server.core.models import Model, ModelState, ModelVersion
from segserve_server.core.service import MaskEncoding, SegmentationCore, SegmentInput, SegmentOutput
from segserve_server.core.streams import StreamDrained, ordered_answers
from segserve_server.errors import InferenceFailed, InvalidArgument, ModelNotFound, SegserveError
from segserve_server.pipeline.decode import RawPixels

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

_ENCODINGS = {
    pb.MASK_ENCODING_SRLE: MaskEncoding.SRLE,
    pb.MASK_ENCODING_PNG: MaskEncoding.PNG,
    pb.MASK_ENCODING_RAW: MaskEncoding.RAW,
}
_ENCODINGS_PB = {value: key for key, value in _ENCODINGS.items()}
_PIXEL_FORMATS = {
    pb.PIXEL_FORMAT_RGB8: "RGB",
    pb.PIXEL_FORMAT_BGR8: "BGR",
    pb.PIXEL_FORMAT_GRAY8: "GRAY",
}
_STATES = {
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
    ModelState.UNLOADED: pb.MODEL_STATE_UNLOADED,
}


def _status_of(exc: SegserveError) -> tuple[grpc.StatusCode, str]:
    return exc.code, exc.message


def _as_segserve_error(exc: Exception) -> SegserveError:
    """A SegserveError as it is; anything else is a bug of ours: logged, then INTERNAL."""
    if isinstance(exc, SegserveError):
        return exc
    if isinstance(exc, grpc.aio.AbortError):
        raise exc  # context.abort was already called
    log.exception("unexpected error in a segserve.v1 handler")
    return InferenceFailed(f"internal error: {type(exc).__name__}: {exc}")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the time.monotonic() clock, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def to_segment_input(request: pb.SegmentRequest) -> SegmentInput:
    if not request.model:
        raise InvalidArgument("request names no model")
    if request.model_version < 0:
        raise InvalidArgument(f"model_version {request.model_version} is negative (0: latest)")
    kind = request.image.WhichOneof("data")
    image: bytes | RawPixels
    if kind == "encoded":
        image = request.image.encoded
    elif kind == "raw":
        raw = request.image.raw
        if raw.format not in _PIXEL_FORMATS:
            raise InvalidArgument(f"raw image pixel format {raw.format} is not RGB8, BGR8 or GRAY8")
        image = RawPixels(raw.pixels, raw.width, raw.height, _PIXEL_FORMATS[raw.format])  # type: ignore[arg-type]
    else:
        raise InvalidArgument("request has no image (set image.encoded or image.raw)")
    encodings = []
    for value in request.encodings:
        if value == pb.MASK_ENCODING_UNSPECIFIED:
            value = pb.MASK_ENCODING_SRLE
        if value not in _ENCODINGS:
            raise InvalidArgument(f"mask encoding {value} is not one of {sorted(_ENCODINGS)}")
        encodings.append(_ENCODINGS[value])
    if request.output_size not in (
        pb.OUTPUT_SIZE_UNSPECIFIED,
        pb.OUTPUT_SIZE_ORIGINAL,
        pb.OUTPUT_SIZE_MODEL,
    ):
        raise InvalidArgument(f"output size {request.output_size} is not ORIGINAL or MODEL")
    return SegmentInput(
        model=request.model,
        image=image,
        version=request.model_version,
        encodings=tuple(encodings),
        output_model_size=request.output_size == pb.OUTPUT_SIZE_MODEL,
        include_pixel_counts=request.include_pixel_counts,
        embed_palette=request.embed_palette,
    )


def to_segment_response(output: SegmentOutput) -> pb.SegmentResponse:
    t = output.timings
    return pb.SegmentResponse(
        width=output.width,
        height=output.height,
        masks=[pb.EncodedMask(encoding=_ENCODINGS_PB[e], data=d) for e, d in output.masks],
        classes=[
            pb.ClassPresence(class_id=c.class_id, name=c.name, pixel_count=c.pixel_count)
            for c in output.classes
        ],
        model=output.model,
        model_version=output.model_version,
        timings=pb.StageTimings(
            decode_us=_us(t.decode),
            preprocess_us=_us(t.preprocess),
            queue_us=_us(t.queue),
            infer_us=_us(t.infer),
            postprocess_us=_us(t.postprocess),
            encode_us=_us(t.encode),
            total_us=_us(t.total),
            batch_size=t.batch_size,
        ),
    )


def _us(seconds: float) -> int:
    return max(0, round(seconds * 1e6))


def model_summary(model: Model) -> pb.ModelSummary:
    serving = model.serving
    return pb.ModelSummary(
        name=model.name,
        versions=sorted(model.entry.versions),
        serving_version=serving.version if serving else 0,
        state=_STATES[model.state],
        reason=model.reason,
    )


def model_info(model: Model, version: ModelVersion | None) -> pb.ModelInfo:
    config = model.config
    info = pb.ModelInfo(
        name=model.name,
        version=version.version if version else 0,
        state=_STATES[version.state if version else model.state],
        reason=version.reason if version else model.reason,
    )
    if version is not None and version.backend is not None:
        info.backend = version.backend.description
    if config is None:
        return info
    batching = config.batching
    info.platform = config.platform
    info.input_width, info.input_height = config.input_width, config.input_height
    info.outputs_labels = config.outputs_labels
    info.description = config.description
    info.classes.extend(
        pb.ClassInfo(id=c.id, name=c.name, red=c.color[0], green=c.color[1], blue=c.color[2])
        for c in config.classes
    )
    info.batching.CopyFrom(
        pb.BatchingInfo(
            max_batch_size=batching.max_batch_size,
            preferred_batch_sizes=batching.preferred_batch_sizes,
            max_queue_delay_us=batching.max_queue_delay_us,
            max_queue_size=batching.max_queue_size,
        )
    )
    return info


def _parse(message_cls: type[M], data: bytes) -> M:
    try:
        return message_cls.FromString(data)
    except DecodeError as exc:
        raise InvalidArgument(
            f"request is not a valid {message_cls.DESCRIPTOR.full_name} message: {exc}"
        ) from exc


def segmentation_handler(servicer: SegmentationServicer) -> grpc.GenericRpcHandler:
    """gRPC handlers for segserve.v1.Segmentation, with the one place errors become statuses.

    Requests arrive as bytes and are parsed here, so that a message of the wrong type is
    INVALID_ARGUMENT rather than gRPC's UNKNOWN; every SegserveError becomes its status code.
    """
    service = pb.DESCRIPTOR.services_by_name["Segmentation"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        behaviour = getattr(servicer, method.name)
        serialize = getattr(pb, method.output_type.name).SerializeToString
        if method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _streaming(request_cls, behaviour), response_serializer=serialize
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(request_cls, behaviour), response_serializer=serialize
            )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _unary(
    request_cls: type[M], behaviour: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(_parse(request_cls, data), context)
        except Exception as exc:
            await context.abort(*_status_of(_as_segserve_error(exc)))

    return handle


def _streaming(
    request_cls: type[M], behaviour: Callable[..., AsyncIterator[Any]]
) -> Callable[..., AsyncIterator[Any]]:
    async def handle(
        frames: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async def parsed() -> AsyncIterator[M]:
            async for data in frames:
                yield _parse(request_cls, data)

        try:
            async for answer in behaviour(parsed(), context):
                yield answer
        except Exception as exc:
            await context.abort(*_status_of(_as_segserve_error(exc)))

    return handle


class SegmentationServicer:
    """The methods of segserve.v1.Segmentation, on parsed messages; see segmentation_handler."""

    def __init__(self, core: SegmentationCore, *, max_inflight_frames: int) -> None:
        self._core = core
        self._max_inflight_frames = max_inflight_frames
        self.draining: asyncio.Event | None = None  # set by the server at start

    async def Segment(
        self, request: pb.SegmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.SegmentResponse:
        output = await self._core.segment(to_segment_input(request), deadline_of(context))
        return to_segment_response(output)

    async def _frame(
        self, frame: pb.SegmentStreamRequest, deadline_s: float | None
    ) -> pb.SegmentStreamResponse:
        try:
            output = await self._core.segment(to_segment_input(frame.request), deadline_s)
        except Exception as exc:
            code, message = _status_of(_as_segserve_error(exc))
            error = pb.FrameError(code=code.value[0], message=message)
            return pb.SegmentStreamResponse(frame_id=frame.frame_id, error=error)
        return pb.SegmentStreamResponse(
            frame_id=frame.frame_id, response=to_segment_response(output)
        )

    async def SegmentStream(
        self,
        request_iterator: AsyncIterator[pb.SegmentStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.SegmentStreamResponse]:
        """Answers frames in arrival order while later ones run (see ordered_answers): at most
        max_inflight_frames frames read and not yet answered. When the server drains, reading
        stops, every frame already read is answered, and the stream ends with UNAVAILABLE.
        """
        deadline_s = deadline_of(context)
        try:
            async for answer in ordered_answers(
                request_iterator,
                lambda frame: self._frame(frame, deadline_s),
                max_inflight=self._max_inflight_frames,
                draining=self.draining,
            ):
                yield answer
        except StreamDrained:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "server is draining: every frame read was answered; send the rest to another replica",
            )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = self._core.models.models
        settings = self._core.settings
        limits = pb.ServerLimits(
            max_request_bytes=settings.max_receive_message_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_image_side=settings.max_image_side,
        )
        return pb.ListModelsResponse(
            models=[model_summary(models[n]) for n in sorted(models)], limits=limits
        )

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        if not request.name:
            raise InvalidArgument("GetModel names no model")
        if request.version < 0:
            raise InvalidArgument(f"version {request.version} is negative (0: the serving one)")
        model = self._core.models.models.get(request.name)
        if model is None:
            raise ModelNotFound(f"model {request.name!r} is not in the repository")
        if request.version == 0:
            version = model.serving or (
                model.versions[max(model.versions)] if model.versions else None
            )
        else:
            version = model.versions.get(request.version)
            if version is None:
                raise ModelNotFound(
                    f"model {request.name!r} version {request.version} is not loaded "
                    f"(loaded: {sorted(model.versions)})"
                )
        return model_info(model, version)
