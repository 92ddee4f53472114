"""The synchronous segserve client.

    with SegserveClient("localhost:50051") as client:
        result = client.segment("street.jpg", "roadseg", encodings="png")
        labels = result.labels  # (H, W) uint8 class ids

Requests are built and answers converted in `segserve_client.types`, shared with the asyncio
client (`segserve_client.aio`); failed RPCs raise `SegserveError`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_client.errors import SegserveError, rpc_errors
from segserve_client.security import TLSConfig, sync_channel
from segserve_client.types import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Choice,
    Frame,
    ImageInput,
    ModelInfo,
    ModelSummary,
    ReadinessWait,
    RequestFeed,
    Segmentation,
    SegmentOptions,
    StreamOptions,
    StreamResult,
    channel_options,
    stream_result,
)
from segserve_client.upload import DEFAULT_CHUNK_BYTES, Upload, UploadImage

__all__ = ["SegserveClient"]


class SegserveClient:
    """A blocking client of one segserve server, over one gRPC channel (thread-safe).

    `timeout_s` is the default deadline of each unary call (None: no deadline); the channel is
    TLS when `tls` (a TLSConfig: CA file, client certificate for mutual TLS, server name) or
    ready-made `credentials` (grpc.ssl_channel_credentials(...)) are given, plaintext otherwise.
    `token` (default: $SEGSERVE_TOKEN; '': none) goes with every call as a bearer token.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout_s: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        tls: TLSConfig | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = sync_channel(
            target,
            channel_options(max_message_bytes),
            tls=tls,
            credentials=credentials,
            token=token,
        )
        # The generated stub has no annotations (protoc's grpc plugin writes none).
        self._stub = pb_grpc.SegmentationStub(self._channel)  # type: ignore[no-untyped-call]

    def segment(
        self,
        image: ImageInput | pb.Image,
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
        timeout_s: float | None = None,
    ) -> Segmentation:
        """Segments one image (encoded bytes, a file path or a uint8 array, see ImageInput).

        `pixel_format` ("rgb" or "bgr") tells the channel order of (H, W, 3) arrays. `priority`
        is the request's priority level (1: the highest; 0: the model's default level) and
        `timeout_us` its queue timeout (0: the model's; only shortens it, where the model's
        queue policy allows overrides). `annotations` asks for the annotation tools' formats
        ("coco_rle", "cvat_mask", "label_studio_rle", "polygons"; Segmentation.annotations).

        `include_confidence` asks for the confidence map, the mean confidence per class and the
        image's scores (Segmentation.confidence, .class_confidence, .scores); a pixel below
        `confidence_threshold` (0..1) counts as uncertain in scores.uncertainty. Only models with
        ModelInfo.has_confidence have it: for the others the call raises SegserveError
        FAILED_PRECONDITION ("confidence unavailable").
        """
        options = SegmentOptions.create(
            model,
            version=version,
            encodings=encodings,
            output_size=output_size,
            include_pixel_counts=include_pixel_counts,
            embed_palette=embed_palette,
            pixel_format=pixel_format,
            priority=priority,
            timeout_us=timeout_us,
            annotations=annotations,
            polygon_tolerance_px=polygon_tolerance_px,
            include_confidence=include_confidence,
            confidence_threshold=confidence_threshold,
        )
        request = options.request(image)
        with rpc_errors():
            response = self._stub.Segment(request, timeout=self._timeout(timeout_s))
        return Segmentation.from_proto(response)

    def segment_large(
        self,
        image: UploadImage,
        model: str,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        timeout_s: float | None = None,
        **options: Any,
    ) -> Segmentation:
        """Segments one encoded image of any size up to the server's max_upload_bytes, sent in
        chunks over SegmentUpload (an image too large for `segment`'s one message). `image` is
        the encoded bytes or, better for large files, the file's path: the file is read a chunk
        at a time as it is sent. `options` are segment's (encodings, output_size, ...); with
        output_size "model" the answer stays small however large the image.

        The server checks the options, the model, the size declared and the image's header
        (format, width, height) before it takes the rest: a refusal raises SegserveError
        (INVALID_ARGUMENT, NOT_FOUND, ...) without the whole file being sent.
        """
        upload = Upload.of(image, chunk_bytes)
        request = SegmentOptions.create(model, **options).request(b"\0")  # image left out
        with rpc_errors():
            response = self._stub.SegmentUpload(
                upload.requests(request), timeout=self._timeout(timeout_s)
            )
        return Segmentation.from_proto(response)

    def stream(
        self,
        frames: Iterable[Frame],
        model: str,
        *,
        version: int = 0,
        encodings: Choice | Sequence[Choice] = ("srle",),
        output_size: Choice = "original",
        include_pixel_counts: bool = False,
        embed_palette: bool = False,
        pixel_format: str = "rgb",
        raise_errors: bool = False,
        timeout_s: float | None = None,
        policy: Choice = "queue",
        max_age_ms: int | None = None,
        priority: int = 0,
        include_confidence: bool = False,
        confidence_threshold: float = 0.5,
    ) -> Iterator[StreamResult]:
        """Segments frames over one SegmentStream; yields (frame_id, result) per frame.

        A frame is a (frame_id, image) pair, captured when it is sent, or a StreamFrame (its own
        capture time, policy, max age and priority). Answers come in the order of the frames,
        one per frame: a Segmentation (OK), a FrameDropped or FrameExpired (never raised: they
        are not errors) or a FrameFailed (raised instead with `raise_errors`); each has
        `status` and the frame's times. A stream-level failure raises SegserveError. A frame
        that cannot be sent (a bad array) ends the stream: the frames before it are answered,
        then its ValueError is raised. `timeout_s` is the deadline of the whole stream (None:
        none; the client's default timeout is for unary calls only; a long stream should bound
        its frames with `max_age_ms` instead). Frames are read on a gRPC thread, as the server
        takes them.

        The stream's options go with the first frame: `policy` "queue" (every frame runs, in
        turn) or "latest" (a frame not started when a newer one is queued is DROPPED),
        `max_age_ms` (a frame older than this since the server read it when its batch forms is
        EXPIRED; None: no max age) and `priority` (the frames' level; 0: the server's stream
        level, 1, the highest). `include_confidence` and `confidence_threshold` are segment's, for
        every frame (a labels-only model then answers each frame FAILED_PRECONDITION).
        """
        options = SegmentOptions.create(
            model,
            version=version,
            encodings=encodings,
            output_size=output_size,
            include_pixel_counts=include_pixel_counts,
            embed_palette=embed_palette,
            pixel_format=pixel_format,
            include_confidence=include_confidence,
            confidence_threshold=confidence_threshold,
        )
        stream = StreamOptions.create(policy, max_age_ms, priority)
        feed = RequestFeed(frames, options, stream)
        return self._stream(feed, feed.requests(), raise_errors, timeout_s)

    def _stream(
        self,
        feed: RequestFeed,
        requests: Iterator[pb.SegmentStreamRequest],
        raise_errors: bool,
        timeout_s: float | None,
    ) -> Iterator[StreamResult]:
        call = self._stub.SegmentStream(requests, timeout=timeout_s)
        try:
            with rpc_errors():
                for response in call:
                    yield stream_result(response, raise_errors)
        finally:
            call.cancel()  # a no-op once the stream ended; stops it if the caller stopped early
        feed.raise_error()

    def list_models(self, *, timeout_s: float | None = None) -> list[ModelSummary]:
        """The models of the server's repository, loaded or not, by name."""
        with rpc_errors():
            response = self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self._timeout(timeout_s)
            )
        return [ModelSummary.from_proto(m) for m in response.models]

    def get_model(
        self, name: str, version: int = 0, *, timeout_s: float | None = None
    ) -> ModelInfo:
        """One model version (0: the serving one): classes and colours, input size, batching."""
        request = pb.GetModelRequest(name=name, version=version)
        with rpc_errors():
            response = self._stub.GetModel(request, timeout=self._timeout(timeout_s))
        return ModelInfo.from_proto(response)

    def wait_until_ready(self, timeout_s: float = 30.0, *, model: str | None = None) -> None:
        """Blocks until the server answers (and `model`, if named, is READY).

        Raises SegserveError: DEADLINE_EXCEEDED when `timeout_s` passes, NOT_FOUND for an unknown
        model, UNAVAILABLE for one that failed to load.
        """
        wait = ReadinessWait(self.target, timeout_s, model)
        while True:
            answer: pb.ListModelsResponse | SegserveError
            try:
                with rpc_errors():
                    answer = self._stub.ListModels(
                        pb.ListModelsRequest(), timeout=wait.call_timeout(), wait_for_ready=True
                    )
            except SegserveError as exc:
                answer = exc
            delay = wait.next_delay(answer)
            if delay is None:
                return
            time.sleep(delay)

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> SegserveClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
