"""The asyncio segserve client (grpc.aio): the methods of SegserveClient as coroutines.

    async with AsyncSegserveClient("localhost:50051") as client:
        result = await client.segment(jpeg_bytes, "roadseg")
        async for frame_id, answer in client.stream(frames, "roadseg"):
            ...

Requests and answers are the same as the sync client's (`segserve_client.types`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_client.errors import SegserveError, rpc_errors
from segserve_client.security import TLSConfig, aio_channel
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

__all__ = ["AsyncSegserveClient"]


class AsyncSegserveClient:
    """An asyncio client of one segserve server; use it from the event loop that created it.

    The arguments are SegserveClient's.
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
        self._channel = aio_channel(
            target,
            channel_options(max_message_bytes),
            tls=tls,
            credentials=credentials,
            token=token,
        )
        # The generated stub has no annotations (protoc's grpc plugin writes none).
        self._stub = pb_grpc.SegmentationStub(self._channel)  # type: ignore[no-untyped-call]

    async def segment(
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
        """Segments one image; see SegserveClient.segment."""
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
            response = await self._stub.Segment(request, timeout=self._timeout(timeout_s))
        return Segmentation.from_proto(response)

    async def segment_large(
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
            response = await self._stub.SegmentUpload(
                upload.requests(request), timeout=self._timeout(timeout_s)
            )
        return Segmentation.from_proto(response)

    def stream(
        self,
        frames: Iterable[Frame] | AsyncIterable[Frame],
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
    ) -> AsyncIterator[StreamResult]:
        """Segments a sync or async iterable of (frame_id, image) over one SegmentStream.

        An async iterator of (frame_id, Segmentation | FrameFailed | FrameSkipped) with the
        stream options `policy`, `max_age_ms` and `priority`; see SegserveClient.stream.
        Leaving it early cancels the stream once the iterator is closed (contextlib.aclosing
        closes it at once).
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
        return self._stream(RequestFeed(frames, options, stream), raise_errors, timeout_s)

    async def _stream(
        self, feed: RequestFeed, raise_errors: bool, timeout_s: float | None
    ) -> AsyncIterator[StreamResult]:
        call = self._stub.SegmentStream(feed.arequests(), timeout=timeout_s)
        try:
            with rpc_errors():
                async for response in call:
                    yield stream_result(response, raise_errors)
        finally:
            call.cancel()  # a no-op once the stream ended
        feed.raise_error()

    async def list_models(self, *, timeout_s: float | None = None) -> list[ModelSummary]:
        """The models of the server's repository, loaded or not, by name."""
        with rpc_errors():
            response = await self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self._timeout(timeout_s)
            )
        return [ModelSummary.from_proto(m) for m in response.models]

    async def get_model(
        self, name: str, version: int = 0, *, timeout_s: float | None = None
    ) -> ModelInfo:
        """One model version (0: the serving one); see SegserveClient.get_model."""
        request = pb.GetModelRequest(name=name, version=version)
        with rpc_errors():
            response = await self._stub.GetModel(request, timeout=self._timeout(timeout_s))
        return ModelInfo.from_proto(response)

    async def wait_until_ready(self, timeout_s: float = 30.0, *, model: str | None = None) -> None:
        """Waits until the server answers (and `model`, if named, is READY); see SegserveClient."""
        wait = ReadinessWait(self.target, timeout_s, model)
        while True:
            answer: pb.ListModelsResponse | SegserveError
            try:
                with rpc_errors():
                    answer = await self._stub.ListModels(
                        pb.ListModelsRequest(), timeout=wait.call_timeout(), wait_for_ready=True
                    )
            except SegserveError as exc:
                answer = exc
            delay = wait.next_delay(answer)
            if delay is None:
                return
            await asyncio.sleep(delay)

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncSegserveClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
