"""The segserve.v1 gRPC adapter: converts protobuf to and from the core, nothing more.

Parsing, deadlines and the conversion of SegserveError to a status are `grpc_helpers`': unary
calls abort with the status, stream frames carry it as FrameError. A stream frame that does not
parse is answered in its place with FrameError INVALID_ARGUMENT and frame_id 0 (its id could not
be read), and the stream goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from segserve.v1 import segserve_pb2 as pb
from segserve_server.adapters.grpc_helpers import (
    as_segserve_error,
    deadline_of,
    handler_table,
    ordered_stream,
)
from segserve_server.core.models import Model, ModelState, ModelVersion
from segserve_server.core.requests import MaskEncoding, SegmentInput, SegmentOutput
from segserve_server.core.service import SegmentationCore
from segserve_server.errors import InvalidArgument, ModelNotFound, SegserveError
from segserve_server.pipeline.decode import ChannelOrder, RawPixels

__all__ = [
    "SegmentationServicer",
    "model_info",
    "model_summary",
    "segmentation_handler",
    "to_segment_input",
    "to_segment_response",
]

SERVICE = pb.DESCRIPTOR.services_by_name["Segmentation"]

_ENCODINGS: dict[pb.MaskEncoding, MaskEncoding] = {
    pb.MASK_ENCODING_SRLE: MaskEncoding.SRLE,
    pb.MASK_ENCODING_PNG: MaskEncoding.PNG,
    pb.MASK_ENCODING_RAW: MaskEncoding.RAW,
}
_ENCODINGS_PB = {value: key for key, value in _ENCODINGS.items()}
_PIXEL_FORMATS: dict[pb.PixelFormat, ChannelOrder] = {
    pb.PIXEL_FORMAT_RGB8: "RGB",
    pb.PIXEL_FORMAT_BGR8: "BGR",
    pb.PIXEL_FORMAT_GRAY8: "GRAY",
}
_STATES: dict[ModelState, pb.ModelState] = {
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
    ModelState.UNLOADED: pb.MODEL_STATE_UNLOADED,
}


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
        image = RawPixels(raw.pixels, raw.width, raw.height, _PIXEL_FORMATS[raw.format])
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
            batch_size=t.batch_size,
            total_us=_us(t.total),
            **{f"{stage}_us": _us(seconds) for stage, seconds in t.stages()},
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
    if version is not None and version.ready is not None:
        info.backend = version.ready.backend.description
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


def segmentation_handler(servicer: SegmentationServicer) -> grpc.GenericRpcHandler:
    """gRPC handlers for segserve.v1.Segmentation (see grpc_helpers.handler_table)."""
    return handler_table(SERVICE, pb, servicer)


def _frame_error(frame_id: int, error: SegserveError) -> pb.SegmentStreamResponse:
    failure = pb.FrameError(code=error.code.value[0], message=error.message)
    return pb.SegmentStreamResponse(frame_id=frame_id, error=failure)


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
        self, frame: pb.SegmentStreamRequest | InvalidArgument, deadline_s: float | None
    ) -> pb.SegmentStreamResponse:
        if isinstance(frame, InvalidArgument):
            return _frame_error(0, frame)
        try:
            output = await self._core.segment(to_segment_input(frame.request), deadline_s)
        except Exception as exc:
            return _frame_error(frame.frame_id, as_segserve_error(exc, "a SegmentStream frame"))
        return pb.SegmentStreamResponse(
            frame_id=frame.frame_id, response=to_segment_response(output)
        )

    def SegmentStream(
        self,
        frames: AsyncIterator[pb.SegmentStreamRequest | InvalidArgument],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.SegmentStreamResponse]:
        """Answers frames in arrival order while later ones run (grpc_helpers.ordered_stream):
        at most max_inflight_frames frames read and not yet answered."""
        limit = self._max_inflight_frames
        return ordered_stream(frames, self._frame, context, limit, self.draining, "frame")

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
            serving = model.serving
            number = serving.version if serving else max(model.versions, default=0)
            version = model.versions.get(number)
        else:
            version = model.versions.get(request.version)
            if version is None:
                raise ModelNotFound(
                    f"model {request.name!r} version {request.version} is not loaded "
                    f"(loaded: {sorted(model.versions)})"
                )
        return model_info(model, version)
