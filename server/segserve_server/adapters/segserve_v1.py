"""The segserve.v1 gRPC adapter: converts protobuf to and from the core, nothing more.

Parsing, deadlines and the conversion of SegserveError to a status are `grpc_helpers`': unary
calls abort with the status, stream frames carry it as FrameError (status ERROR). A stream frame
that does not parse is answered in its place with FrameError INVALID_ARGUMENT and frame_id 0
(its id could not be read), and the stream goes on. What a stream does with its frames is
`core.realtime`'s.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from segserve.v1 import segserve_pb2 as pb
from segserve_server.adapters.grpc_helpers import (
    StreamHandler,
    StreamLimits,
    deadline_of,
    handler_table,
    ordered_stream,
    stream_cut_at,
)
from segserve_server.core.models import Model, ModelState, ModelVersion
from segserve_server.core.realtime import (
    Frame,
    FrameIn,
    FrameOut,
    FrameStatus,
    Policy,
    StreamOptions,
    StreamSession,
)
from segserve_server.core.requests import (
    Admission,
    AnnotationFormat,
    ClassAnnotation,
    DecodeOptions,
    MaskEncoding,
    Scaling,
    SegmentInput,
    SegmentOutput,
)
from segserve_server.core.service import SegmentationCore
from segserve_server.core.tiling import blend_rule
from segserve_server.errors import InvalidArgument, ModelNotFound
from segserve_server.pipeline.decode import ChannelOrder, RawPixels
from segserve_server.pipeline.encode import check_source_outputs
from segserve_server.pipeline.postprocess import has_confidence

if TYPE_CHECKING:  # imported when the first upload comes (upload_v1 imports this module)
    from segserve_server.adapters.upload_v1 import UploadBudget

__all__ = [
    "SegmentationServicer",
    "model_info",
    "model_summary",
    "segmentation_handler",
    "to_frame_in",
    "to_segment_input",
    "to_segment_response",
    "to_stream_response",
]

SERVICE = pb.DESCRIPTOR.services_by_name["Segmentation"]

_ENCODINGS: dict[pb.MaskEncoding, MaskEncoding] = {
    pb.MASK_ENCODING_SRLE: MaskEncoding.SRLE,
    pb.MASK_ENCODING_PNG: MaskEncoding.PNG,
    pb.MASK_ENCODING_RAW: MaskEncoding.RAW,
    pb.MASK_ENCODING_DICOM_SEG: MaskEncoding.DICOM_SEG,
    pb.MASK_ENCODING_GEOTIFF: MaskEncoding.GEOTIFF,
}
_SCALINGS: dict[int, Scaling] = {
    pb.SAMPLE_SCALING_UNSPECIFIED: Scaling.DEFAULT,
    pb.SAMPLE_SCALING_SHIFT: Scaling.SHIFT,
    pb.SAMPLE_SCALING_MINMAX: Scaling.MINMAX,
    pb.SAMPLE_SCALING_WINDOW: Scaling.WINDOW,
}
_POLICIES: dict[int, Policy | None] = {
    pb.STREAM_POLICY_UNSPECIFIED: None,
    pb.STREAM_POLICY_QUEUE: Policy.QUEUE,
    pb.STREAM_POLICY_LATEST: Policy.LATEST,
}
_FRAME_STATUSES = {
    FrameStatus.OK: pb.FRAME_STATUS_OK,
    FrameStatus.DROPPED: pb.FRAME_STATUS_DROPPED,
    FrameStatus.EXPIRED: pb.FRAME_STATUS_EXPIRED,
    FrameStatus.ERROR: pb.FRAME_STATUS_ERROR,
}
_ANNOTATIONS = {
    pb.ANNOTATION_FORMAT_COCO_RLE: AnnotationFormat.COCO_RLE,
    pb.ANNOTATION_FORMAT_CVAT_MASK: AnnotationFormat.CVAT_MASK,
    pb.ANNOTATION_FORMAT_LABEL_STUDIO_RLE: AnnotationFormat.LABEL_STUDIO_RLE,
    pb.ANNOTATION_FORMAT_POLYGONS: AnnotationFormat.POLYGONS,
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
    if request.scaling not in _SCALINGS:
        raise InvalidArgument(f"scaling {request.scaling} is not one of {sorted(_SCALINGS)}")
    options = DecodeOptions(
        _SCALINGS[request.scaling],
        request.window_center,
        request.window_width,
        tuple(request.bands),
    )
    check_source_outputs(
        tuple(encodings),
        image,
        output_model_size=request.output_size == pb.OUTPUT_SIZE_MODEL,
        map_coordinates=request.map_coordinates,
    )
    return SegmentInput(
        model=request.model,
        image=image,
        version=request.model_version,
        encodings=tuple(encodings),
        output_model_size=request.output_size == pb.OUTPUT_SIZE_MODEL,
        include_pixel_counts=request.include_pixel_counts,
        embed_palette=request.embed_palette,
        admission=Admission(priority=request.priority, timeout_us=request.timeout_us),
        annotations=tuple(_annotation_format(value) for value in request.annotations),
        polygon_tolerance_px=request.polygon_tolerance_px,
        include_confidence=request.include_confidence,
        confidence_threshold=request.confidence_threshold or 0.5,
        ignore_exif_orientation=request.ignore_exif_orientation,
        decode_options=options,
        map_coordinates=request.map_coordinates,
    )


def _annotation_format(value: pb.AnnotationFormat) -> AnnotationFormat:
    if value not in _ANNOTATIONS:
        raise InvalidArgument(
            f"annotation format {value} is not one of {sorted(_ANNOTATIONS)} "
            "(COCO_RLE, CVAT_MASK, LABEL_STUDIO_RLE, POLYGONS)"
        )
    return _ANNOTATIONS[value]


def _annotation(annotation: ClassAnnotation, names: dict[int, str]) -> pb.ClassAnnotation:
    return pb.ClassAnnotation(
        class_id=annotation.class_id,
        name=names.get(annotation.class_id, ""),
        area=annotation.area,
        bbox=annotation.bbox,
        coco_rle_counts=annotation.coco_rle_counts,
        cvat_mask=annotation.cvat_mask,
        label_studio_rle=annotation.label_studio_rle,
        polygons=[
            pb.Region(
                outer=pb.Ring(xy=region.outer, map_xy=region.map_outer),
                holes=[
                    pb.Ring(xy=h, map_xy=m)
                    for h, m in itertools.zip_longest(region.holes, region.map_holes, fillvalue=())
                ],
            )
            for region in annotation.polygons
        ],
    )


def _policy(value: int, what: str) -> Policy | None:
    if value not in _POLICIES:
        raise InvalidArgument(f"{what} {value} is not a StreamPolicy ({sorted(_POLICIES)})")
    return _POLICIES[value]


def to_frame_in(message: pb.SegmentStreamRequest | InvalidArgument) -> FrameIn:
    """A stream message as the core's FrameIn; a message that cannot be a frame carries its
    error (answered in its place)."""
    if isinstance(message, InvalidArgument):
        return FrameIn(error=message)
    try:
        options = None
        if message.HasField("options"):
            stream = message.options
            options = StreamOptions(
                policy=_policy(stream.policy, "options.policy") or Policy.QUEUE,
                max_age_s=stream.max_age_ms / 1e3 if stream.max_age_ms else None,
                priority=stream.priority,
            )
        policy = _policy(message.policy, "policy")
        request = to_segment_input(message.request) if message.HasField("request") else None
    except InvalidArgument as exc:
        return FrameIn(message.frame_id, error=exc, capture_time_us=message.capture_time_us)
    return FrameIn(
        frame_id=message.frame_id,
        request=request,
        options=options,
        policy=policy,
        max_age_s=message.max_age_ms / 1e3 if message.max_age_ms else None,
        capture_time_us=message.capture_time_us,
    )


def to_stream_response(out: FrameOut) -> pb.SegmentStreamResponse:
    response = pb.SegmentStreamResponse(
        frame_id=out.frame_id,
        status=_FRAME_STATUSES[out.status],
        capture_time_us=out.capture_time_us,
        receive_time_us=out.receive_time_us,
        answer_time_us=out.answer_time_us,
    )
    if out.output is not None:
        response.response.CopyFrom(to_segment_response(out.output))
    elif out.status is FrameStatus.ERROR and out.error is not None:
        response.error.CopyFrom(
            pb.FrameError(code=out.error.code.value[0], message=out.error.message)
        )
    return response


def to_segment_response(output: SegmentOutput) -> pb.SegmentResponse:
    t = output.timings
    names = {c.class_id: c.name for c in output.classes}
    response = pb.SegmentResponse(
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
        annotations=[_annotation(a, names) for a in output.annotations],
    )
    if output.confidence_png is not None and output.scores is not None:
        scores = output.scores
        response.confidence.CopyFrom(
            pb.EncodedMask(encoding=pb.MASK_ENCODING_PNG, data=output.confidence_png)
        )
        response.class_confidence.extend(
            pb.ClassConfidence(class_id=c, mean=m) for c, m in scores.class_confidence
        )
        response.scores.CopyFrom(
            pb.ImageScores(
                uncertainty=scores.uncertainty,
                mean_confidence=scores.mean_confidence,
                boundary_length=scores.boundary_length,
                regions=scores.regions,
            )
        )
    return response


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
        # A READY version whose backend cannot run batches now stays READY, with the reason.
        reason=(version.reason or version.unavailable_reason) if version else model.reason,
    )
    if version is not None and version.ready is not None:
        info.backend = version.ready.backend.description
    if config is None:
        return info
    # What runs, not what config.pbtxt asks (CPU lanes run one image at a time).
    batching = version.ready.batcher.batching if version and version.ready else config.batching
    info.platform = config.platform
    info.pipeline = f"device:{config.device}" if config.pipeline == "device" else "host"
    info.input_width, info.input_height = config.input_width, config.input_height
    info.outputs_labels = config.outputs_labels
    info.has_confidence = has_confidence(config)
    info.description = config.description
    tiles = config.tiling
    info.tiling.CopyFrom(
        pb.TilingInfo(
            enabled=tiles.enabled,
            overlap_px=tiles.overlap_px,
            scale=tiles.scale,
            blend=blend_rule(config),
        )
    )
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
            priority_levels=batching.priority.levels,
            default_priority_level=batching.priority.default_level
            if batching.priority.levels
            else 0,
        )
    )
    return info


def segmentation_handler(servicer: SegmentationServicer) -> grpc.GenericRpcHandler:
    """gRPC handlers for segserve.v1.Segmentation (see grpc_helpers.handler_table)."""
    return handler_table(SERVICE, pb, servicer)


class SegmentationServicer:
    """The methods of segserve.v1.Segmentation, on parsed messages; see segmentation_handler."""

    def __init__(self, core: SegmentationCore) -> None:
        self._core = core
        settings = core.settings
        self._limits = StreamLimits(
            settings.stream_max_inflight_frames, settings.stream_max_unsent_answers, "frame"
        )
        self.draining: asyncio.Event | None = None  # set by the server at start
        self._upload_budget: UploadBudget | None = None

    async def Segment(
        self, request: pb.SegmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.SegmentResponse:
        output = await self._core.segment(to_segment_input(request), deadline_of(context))
        return to_segment_response(output)

    def SegmentStream(
        self,
        messages: AsyncIterator[pb.SegmentStreamRequest | InvalidArgument],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.SegmentStreamResponse]:
        """Every frame answered in order with its fate (core.realtime, grpc_helpers.ordered_stream)."""
        settings = self._core.settings
        cut_at_s = stream_cut_at(context, settings.stream_deadline_margin_s)
        session = StreamSession(self._core, deadline_s=cut_at_s)

        async def frames() -> AsyncIterator[FrameIn]:
            async for message in messages:
                yield to_frame_in(message)

        async def answer(frame: Frame) -> pb.SegmentStreamResponse:
            return to_stream_response(await session.answer(frame))

        return ordered_stream(
            session.frames(frames()),
            StreamHandler(
                answer=answer,
                latest=session.latest,
                dropped=lambda frame: to_stream_response(session.dropped(frame)),
                cut=lambda frame: to_stream_response(session.cut(frame)),
            ),
            context,
            self._limits,
            self.draining,
            cut_at_s,
        )

    async def SegmentUpload(
        self, messages: AsyncIterator[pb.SegmentUploadRequest], context: grpc.aio.ServicerContext
    ) -> pb.SegmentResponse:
        """One image in chunks (adapters/upload_v1.py)."""
        from segserve_server.adapters.upload_v1 import UploadBudget, segment_upload

        if self._upload_budget is None:  # one per server, made on the loop that serves
            self._upload_budget = UploadBudget(
                self._core.settings.max_upload_bytes_in_flight, self._core.metrics.upload_bytes
            )
        return await segment_upload(self._core, messages, context, self._upload_budget)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = self._core.models.models
        settings = self._core.settings
        limits = pb.ServerLimits(
            max_request_bytes=settings.max_receive_message_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_image_side=settings.max_image_side,
            max_upload_bytes=settings.max_upload_bytes,
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
