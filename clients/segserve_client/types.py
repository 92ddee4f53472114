"""What a segserve client sends and gets back, shared by the sync and the asyncio client.

The user-facing results are plain dataclasses (`Segmentation` here; `ModelInfo` and
`ModelSummary` in `models`, the stream results `FrameSkipped` & co. in `streaming`, re-exported)
built from the protobuf answers; the requests are built here too (`SegmentOptions`,
`image_proto`, `RequestFeed`), from encoded image bytes, a file path or a numpy array. Nothing in
this module does I/O on a channel: `client.py` and `aio.py` only add the calls.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TypeAlias, TypeVar

import grpc
import numpy as np

from segserve.v1 import segserve_pb2 as pb
from segserve_client.annotations import ANNOTATION_FORMATS, ClassAnnotation
from segserve_client.confidence import ImageScores, class_means, decode_confidence, image_scores
from segserve_client.errors import FrameFailed, status_code
from segserve_client.masks import MaskDecodeError, decode_png, decode_srle
from segserve_client.models import BatchingInfo, ClassInfo, ModelInfo, ModelSummary, ReadinessWait
from segserve_client.streaming import (
    FrameDropped,
    FrameExpired,
    FrameSkipped,
    FrameStatus,
    FrameTimes,
    FrameTiming,
    StreamFrame,
    StreamOptions,
    now_us,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ENCODINGS",
    "OUTPUT_SIZES",
    "PIXEL_FORMATS",
    "BatchingInfo",
    "Choice",
    "ClassInfo",
    "ClassPresence",
    "Frame",
    "FrameDropped",
    "FrameExpired",
    "FrameSkipped",
    "FrameStatus",
    "FrameTiming",
    "ImageInput",
    "ImageScores",
    "ModelInfo",
    "ModelSummary",
    "ReadinessWait",
    "RequestFeed",
    "SegmentOptions",
    "Segmentation",
    "StageTimings",
    "StreamFrame",
    "StreamOptions",
    "StreamResult",
    "channel_options",
    "decode_mask",
    "encoding_name",
    "image_proto",
    "raw_image",
    "stream_result",
]

ImageInput: TypeAlias = bytes | bytearray | memoryview | str | os.PathLike[str] | np.ndarray
"""Encoded image bytes (JPEG, PNG, WebP, BMP), a path to such a file, or a uint8 array of pixels:
(H, W, 3) RGB or BGR (see `pixel_format`), or (H, W) grey."""
Choice: TypeAlias = str | int
"""An enum value of the API given by its short name ("png") or its protobuf number."""
Frame: TypeAlias = tuple[int, ImageInput] | StreamFrame
"""One frame of a stream: the caller's frame id and the image (captured when sent), or a
StreamFrame with its capture time and per-frame overrides."""
StreamResult: TypeAlias = tuple[int, "Segmentation | FrameFailed | FrameSkipped"]
"""(frame_id, what became of the frame): OK, ERROR, or DROPPED / EXPIRED (FrameSkipped)."""

ENCODINGS: dict[str, pb.MaskEncoding] = {
    "srle": pb.MASK_ENCODING_SRLE,
    "png": pb.MASK_ENCODING_PNG,
    "raw": pb.MASK_ENCODING_RAW,
}
OUTPUT_SIZES: dict[str, pb.OutputSize] = {
    "original": pb.OUTPUT_SIZE_ORIGINAL,
    "model": pb.OUTPUT_SIZE_MODEL,
}
PIXEL_FORMATS: dict[str, pb.PixelFormat] = {
    "rgb": pb.PIXEL_FORMAT_RGB8,
    "bgr": pb.PIXEL_FORMAT_BGR8,
}
_ENCODING_NAMES: dict[int, str] = {number: name for name, number in ENCODINGS.items()}

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC channel options of both clients: masks of large images exceed gRPC's 4 MiB default."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


# ----------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------


_Enum = TypeVar("_Enum", bound=int)


def _choice(value: Choice, table: dict[str, _Enum], what: str) -> _Enum:
    if isinstance(value, str) and value.lower() in table:
        return table[value.lower()]
    if isinstance(value, int) and not isinstance(value, bool):
        for number in table.values():
            if number == value:
                return number
    raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(table)}")


def raw_image(array: np.ndarray, pixel_format: str = "rgb") -> pb.RawImage:
    """The RawImage of a (H, W, 3) RGB/BGR or (H, W) grey uint8 array."""
    colour_format = _choice(pixel_format, PIXEL_FORMATS, "pixel format")
    if array.dtype != np.uint8:
        raise ValueError(
            f"image arrays must be uint8 (0..255), got {array.dtype}; "
            "scale and convert with .astype(np.uint8) first"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        pixel_layout = pb.PIXEL_FORMAT_GRAY8
    elif array.ndim == 3 and array.shape[2] == 3:
        pixel_layout = colour_format
    else:
        raise ValueError(
            f"image arrays must be (H, W, 3) colour or (H, W) grey, got shape {array.shape}"
        )
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"the image array is empty: shape {array.shape}")
    return pb.RawImage(pixels=array.tobytes(), width=width, height=height, format=pixel_layout)


def image_proto(image: ImageInput | pb.Image, pixel_format: str = "rgb") -> pb.Image:
    """The Image message of encoded bytes, a file path or a pixel array (see ImageInput)."""
    if isinstance(image, pb.Image):
        return image
    if isinstance(image, np.ndarray):
        return pb.Image(raw=raw_image(image, pixel_format))
    if isinstance(image, str | os.PathLike):
        data = Path(image).read_bytes()
        if not data:
            raise ValueError(f"the image file {os.fspath(image)!r} is empty")
        return pb.Image(encoded=data)
    if isinstance(image, bytes | bytearray | memoryview):
        if not len(image):
            raise ValueError("the encoded image is empty")
        return pb.Image(encoded=bytes(image))
    raise TypeError(
        f"an image is encoded bytes, a file path or a numpy array, not {type(image).__name__}"
    )


@dataclass(frozen=True)
class SegmentOptions:
    """Everything of a SegmentRequest but the image: validated once, applied to each image."""

    model: str
    version: int
    encodings: tuple[pb.MaskEncoding, ...]
    output_size: pb.OutputSize
    include_pixel_counts: bool
    embed_palette: bool
    pixel_format: str
    priority: int = 0
    timeout_us: int = 0
    annotations: tuple[pb.AnnotationFormat, ...] = ()
    polygon_tolerance_px: float = 0.0
    include_confidence: bool = False
    confidence_threshold: float = 0.5

    @classmethod
    def create(
        cls,
        model: str,
        *,
        version: int = 0,
        encodings: Choice | Sequence[Choice] = ("srle",),
        output_size: Choice = "original",
        include_pixel_counts: bool = False,
        embed_palette: bool = False,
        pixel_format: str = "rgb",
        priority: int = 0,
        timeout_us: int = 0,
        annotations: Sequence[Choice] = (),
        polygon_tolerance_px: float = 0.0,
        include_confidence: bool = False,
        confidence_threshold: float = 0.5,
    ) -> SegmentOptions:
        """Checks and normalises the options; raises ValueError naming the bad one."""
        if not model:
            raise ValueError("a model name is required")
        if version < 0:
            raise ValueError(f"a model version is >= 0 (0: the serving one), got {version}")
        if not 0 <= priority < 2**32:
            raise ValueError(
                f"a priority level is >= 0 (1: the highest, 0: default), got {priority}"
            )
        if not 0 <= timeout_us < 2**64:
            raise ValueError(f"a queue timeout is >= 0 us (0: the model's), got {timeout_us}")
        if isinstance(encodings, str | int):
            encodings = (encodings,)
        numbers = tuple(_choice(e, ENCODINGS, "mask encoding") for e in encodings)
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"each encoding may be asked for once, got {list(encodings)}")
        _choice(pixel_format, PIXEL_FORMATS, "pixel format")
        if isinstance(annotations, str | int):
            annotations = (annotations,)
        formats = tuple(_choice(a, ANNOTATION_FORMATS, "annotation format") for a in annotations)
        if len(set(formats)) != len(formats):
            raise ValueError(f"each annotation format may be asked for once, got {annotations}")
        if not polygon_tolerance_px >= 0:
            raise ValueError(f"a polygon tolerance is >= 0 pixels, got {polygon_tolerance_px}")
        if not 0.0 < confidence_threshold <= 1.0:
            raise ValueError(f"a confidence threshold is in (0, 1], got {confidence_threshold}")
        return cls(
            model=model,
            version=version,
            encodings=numbers,
            output_size=_choice(output_size, OUTPUT_SIZES, "output size"),
            include_pixel_counts=include_pixel_counts,
            embed_palette=embed_palette,
            pixel_format=pixel_format,
            priority=priority,
            timeout_us=timeout_us,
            annotations=formats,
            polygon_tolerance_px=polygon_tolerance_px,
            include_confidence=include_confidence,
            confidence_threshold=confidence_threshold,
        )

    def request(self, image: ImageInput | pb.Image) -> pb.SegmentRequest:
        """The SegmentRequest for one image."""
        return pb.SegmentRequest(
            model=self.model,
            model_version=self.version,
            image=image_proto(image, self.pixel_format),
            encodings=self.encodings,
            output_size=self.output_size,
            include_pixel_counts=self.include_pixel_counts,
            embed_palette=self.embed_palette,
            priority=self.priority,
            timeout_us=self.timeout_us,
            annotations=self.annotations,
            polygon_tolerance_px=self.polygon_tolerance_px,
            include_confidence=self.include_confidence,
            confidence_threshold=self.confidence_threshold if self.include_confidence else 0.0,
        )


class RequestFeed:
    """Turns frames ((frame_id, image) pairs or StreamFrames) into SegmentStreamRequests and keeps
    a failure for later.

    The first frame carries the stream's options (`stream`, if given). A frame's capture time is
    its own or, if it has none, the time the feed hands it to grpc to send.

    grpc reads a request iterator on its own thread (or task) and turns an exception raised there
    into a bare CANCELLED. The feed instead ends the request stream, so every frame sent before
    is still answered, and the client re-raises the exception (`raise_error`) after the last one.
    """

    def __init__(
        self,
        frames: Iterable[Frame] | AsyncIterable[Frame],
        options: SegmentOptions,
        stream: StreamOptions | None = None,
    ):
        self._frames = frames
        self._options = options
        self._stream = stream
        self.error: Exception | None = None

    def _request(self, frame: Frame) -> pb.SegmentStreamRequest:
        if isinstance(frame, StreamFrame):
            message = pb.SegmentStreamRequest(
                frame_id=frame.frame_id, request=self._options.request(frame.image)
            )
            frame.fill(message)
        else:
            frame_id, image = frame
            message = pb.SegmentStreamRequest(
                frame_id=frame_id, request=self._options.request(image), capture_time_us=now_us()
            )
        if self._stream is not None:
            message.options.CopyFrom(self._stream.proto())
            self._stream = None  # the first frame only: the options hold from then on
        return message

    def requests(self) -> Iterator[pb.SegmentStreamRequest]:
        """The requests, for the sync client (the frames must be a plain iterable)."""
        frames = self._frames
        if not isinstance(frames, Iterable):
            raise TypeError("the sync client streams an iterable of frames, not an async one")
        return self._requests(frames)

    def _requests(self, frames: Iterable[Frame]) -> Iterator[pb.SegmentStreamRequest]:
        try:
            for frame in frames:
                yield self._request(frame)
        except Exception as exc:
            self.error = exc

    async def arequests(self) -> AsyncIterator[pb.SegmentStreamRequest]:
        """The requests, for the asyncio client (the frames may be sync or async iterables)."""
        try:
            if isinstance(self._frames, AsyncIterable):
                async for frame in self._frames:
                    yield self._request(frame)
            else:
                for frame in self._frames:
                    yield self._request(frame)
        except Exception as exc:
            self.error = exc

    def raise_error(self) -> None:
        """Raises the exception that ended the request stream, if one did."""
        if self.error is not None:
            raise self.error


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassPresence:
    """A class found in a label map; `pixel_count` is 0 unless pixel counts were asked for."""

    class_id: int
    name: str
    pixel_count: int


@dataclass(frozen=True)
class StageTimings:
    """Server-side time per stage in microseconds, and the size of the batch the image ran in."""

    decode_us: int
    preprocess_us: int
    queue_us: int
    infer_us: int
    postprocess_us: int
    encode_us: int
    total_us: int
    batch_size: int

    @classmethod
    def from_proto(cls, timings: pb.StageTimings) -> StageTimings:
        return cls(
            decode_us=timings.decode_us,
            preprocess_us=timings.preprocess_us,
            queue_us=timings.queue_us,
            infer_us=timings.infer_us,
            postprocess_us=timings.postprocess_us,
            encode_us=timings.encode_us,
            total_us=timings.total_us,
            batch_size=timings.batch_size,
        )


def encoding_name(number: int) -> str:
    """The short name ("srle", "png", "raw") of a MaskEncoding number."""
    return _ENCODING_NAMES.get(number, f"encoding-{number}")


def decode_mask(encoding: str, data: bytes, width: int, height: int) -> np.ndarray:
    """Decodes one mask of a response into a (height, width) uint8 label map."""
    if encoding == "srle":
        labels = decode_srle(data)
    elif encoding == "png":
        labels = decode_png(data)[0]
    elif encoding == "raw":
        if len(data) != width * height:
            raise MaskDecodeError(f"raw mask is {len(data)} bytes, not {width}x{height}")
        labels = np.frombuffer(data, dtype=np.uint8).reshape(height, width)
    else:
        raise MaskDecodeError(f"cannot decode a mask of unknown encoding {encoding!r}")
    if labels.shape != (height, width):
        raise MaskDecodeError(
            f"{encoding} mask is {labels.shape[1]}x{labels.shape[0]}, the response {width}x{height}"
        )
    return labels


@dataclass(frozen=True)
class Segmentation(FrameTimes):
    """The answer to one image: the label map in each requested encoding, and what is in it."""

    width: int
    height: int
    model: str
    model_version: int
    classes: list[ClassPresence]
    timings: StageTimings
    masks: dict[str, bytes]
    """Encoded masks by encoding name ("srle", "png", "raw"), in request order."""
    frame: FrameTiming | None = None
    """A stream frame's times (status OK); None for a Segment call."""
    annotations: list[ClassAnnotation] = field(default_factory=list)
    """Per class present, the annotation tools' formats asked for (SegmentOptions.annotations)."""
    confidence_png: bytes | None = None
    """include_confidence: the confidence map as the server sent it (8-bit grey PNG)."""
    class_confidence: dict[int, float] = field(default_factory=dict)
    """include_confidence: {class id: mean confidence (0..1)} of the classes present."""
    scores: ImageScores | None = None
    """include_confidence: the image's review scores; None when not asked for."""

    @property
    def status(self) -> FrameStatus:
        return FrameStatus.OK

    @cached_property
    def labels(self) -> np.ndarray:
        """The (height, width) uint8 label map, decoded from the first mask (read-only)."""
        if not self.masks:
            raise MaskDecodeError("the response holds no mask")
        encoding, data = next(iter(self.masks.items()))
        labels = decode_mask(encoding, data, self.width, self.height)
        labels.setflags(write=False)
        return labels

    @cached_property
    def confidence(self) -> np.ndarray | None:
        """The (height, width) uint8 confidence map, 255 x the top class probability per pixel
        (read-only); None unless confidence was asked for."""
        if self.confidence_png is None:
            return None
        return decode_confidence(self.confidence_png, self.width, self.height)

    @classmethod
    def from_proto(
        cls, response: pb.SegmentResponse, frame: FrameTiming | None = None
    ) -> Segmentation:
        return cls(
            width=response.width,
            height=response.height,
            model=response.model,
            model_version=response.model_version,
            classes=[ClassPresence(c.class_id, c.name, c.pixel_count) for c in response.classes],
            timings=StageTimings.from_proto(response.timings),
            masks={encoding_name(m.encoding): m.data for m in response.masks},
            frame=frame,
            annotations=[ClassAnnotation.from_proto(a) for a in response.annotations],
            confidence_png=response.confidence.data if response.HasField("confidence") else None,
            class_confidence=class_means(response),
            scores=image_scores(response),
        )


def stream_result(
    response: pb.SegmentStreamResponse,
    raise_errors: bool = False,
    *,
    arrival_time_us: int | None = None,
) -> StreamResult:
    """(frame_id, result) of one stream answer: a Segmentation (OK), a FrameDropped or
    FrameExpired (never raised: they are not errors) or a FrameFailed (ERROR, or an answer that
    says nothing usable), raised instead with `raise_errors`.

    `arrival_time_us` is when the answer was read (default: now), on the client's clock.
    """
    arrived = now_us() if arrival_time_us is None else arrival_time_us
    status = FrameStatus.from_proto(response.status)
    kind = response.WhichOneof("result")
    result: Segmentation | FrameFailed | FrameSkipped
    if status is FrameStatus.DROPPED or status is FrameStatus.EXPIRED:
        skipped = FrameDropped if status is FrameStatus.DROPPED else FrameExpired
        details = response.error.message if kind == "error" else ""
        result = skipped(FrameTiming.from_proto(response, status, arrived), details)
    elif kind == "response":  # OK, or a server that does not send status
        timing = FrameTiming.from_proto(response, FrameStatus.OK, arrived)
        result = Segmentation.from_proto(response.response, timing)
    else:
        timing = FrameTiming.from_proto(response, FrameStatus.ERROR, arrived)
        if kind == "error":
            code, details = status_code(response.error.code), response.error.message
        else:
            code, details = grpc.StatusCode.UNKNOWN, "the server answered with neither result"
        result = FrameFailed(response.frame_id, code, details, timing)
    if raise_errors and isinstance(result, FrameFailed):
        raise result
    return response.frame_id, result
