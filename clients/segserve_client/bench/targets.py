"""The servers the bench can load: a `Target` adapter turns an image into a prepared request and
a call into a `Reply`, so the load loops know nothing of any protocol.

`SegserveTarget` speaks segserve.v1 (unary `Segment` and `SegmentStream` frames) over one
grpc.aio channel; `TritonTarget` the KServe v2 protocol of a Triton model taking encoded image
bytes (needs tritonclient[grpc], imported only when used).
"""

from __future__ import annotations

import abc
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio
import numpy as np

from segserve.v1 import segserve_pb2 as pb
from segserve_client.bench.results import STAGES, CallFailed, Reply
from segserve_client.errors import status_code
from segserve_client.security import TLSConfig, aio_channel
from segserve_client.types import ENCODINGS, channel_options

__all__ = [
    "FrameStream",
    "SegserveTarget",
    "Target",
    "TritonTarget",
]

_Prepared = TypeVar("_Prepared")
"""What a target sends for one image, built once before the clock starts."""


class Target(abc.ABC, Generic[_Prepared]):
    """One server under load: prepares requests ahead of time, then calls it."""

    @abc.abstractmethod
    def prepare(self, image: bytes) -> _Prepared:
        """A ready-to-send request for one encoded image (built before the clock starts)."""

    @abc.abstractmethod
    async def call(self, prepared: _Prepared) -> Reply:
        """One unary call; raises CallFailed."""

    def stream(self) -> FrameStream[_Prepared]:
        """A new bidirectional stream of frames."""
        raise NotImplementedError(f"{type(self).__name__} has no streaming call")

    @abc.abstractmethod
    async def close(self) -> None:
        """Releases the connection."""


class FrameStream(abc.ABC, Generic[_Prepared]):
    """One open stream: `send` frames, `receive` answers in order (None at the end)."""

    @abc.abstractmethod
    async def send(self, prepared: _Prepared) -> None: ...

    @abc.abstractmethod
    async def done_sending(self) -> None: ...

    @abc.abstractmethod
    async def receive(self) -> Reply | CallFailed | None:
        """The next answer in frame order (a failed frame as CallFailed), None at the end."""

    @abc.abstractmethod
    def cancel(self) -> None: ...


def _segserve_reply(response: pb.SegmentResponse) -> Reply:
    t = response.timings
    stages = {stage: getattr(t, f"{stage}_us") / 1e6 for stage in STAGES}
    return Reply(stages, t.batch_size)


class SegserveTarget(Target[bytes]):
    """segserve.v1 over one grpc.aio channel; requests are serialised once per image, so the
    load generator spends as little CPU per call as it can (it shares the machine)."""

    SEGMENT = "/segserve.v1.Segmentation/Segment"
    SEGMENT_STREAM = "/segserve.v1.Segmentation/SegmentStream"

    def __init__(
        self,
        address: str,
        model: str,
        *,
        encoding: str = "srle",
        timeout_s: float | None = None,
        tls: TLSConfig | None = None,
        token: str | None = None,
    ) -> None:
        self._channel = aio_channel(address, channel_options(256 << 20), tls=tls, token=token)
        self._model = model
        self._encoding = ENCODINGS[encoding]
        self._timeout_s = timeout_s
        self._segment = self._channel.unary_unary(
            self.SEGMENT, response_deserializer=pb.SegmentResponse.FromString
        )
        self._segment_stream = self._channel.stream_stream(
            self.SEGMENT_STREAM, response_deserializer=pb.SegmentStreamResponse.FromString
        )

    def prepare(self, image: bytes) -> bytes:
        request = pb.SegmentRequest(
            model=self._model, image=pb.Image(encoded=image), encodings=[self._encoding]
        )
        serialised: bytes = request.SerializeToString()
        return serialised

    async def call(self, prepared: bytes) -> Reply:
        try:
            response: pb.SegmentResponse = await self._segment(prepared, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(exc.code().name, exc.details() or "") from exc
        return _segserve_reply(response)

    def stream(self) -> FrameStream[bytes]:
        return _SegserveStream(self._segment_stream(timeout=self._timeout_s))

    async def close(self) -> None:
        await self._channel.close()


class _SegserveStream(FrameStream[bytes]):
    def __init__(self, call: Any) -> None:  # a grpc.aio.StreamStreamCall (grpc has no types)
        self._call = call
        self._frame_id = 0

    async def send(self, prepared: bytes) -> None:
        # SegmentStreamRequest on the wire: field 1 (frame_id, varint), field 2 (the request).
        self._frame_id += 1
        frame = b"\x08" + _varint(self._frame_id) + b"\x12" + _varint(len(prepared)) + prepared
        await self._call.write(frame)

    async def done_sending(self) -> None:
        await self._call.done_writing()

    async def receive(self) -> Reply | CallFailed | None:
        try:
            answer = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(exc.code().name, exc.details() or "") from exc
        if answer is grpc.aio.EOF:
            return None
        if answer.WhichOneof("result") == "error":
            return CallFailed(status_code(answer.error.code).name, answer.error.message)
        return _segserve_reply(answer.response)

    def cancel(self) -> None:
        self._call.cancel()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class TritonTarget(Target[Any]):
    """A Triton model with a BYTES input of encoded images, over tritonclient.grpc.aio.

    The model (benchmarks/triton/model.py) answers `mask` (the encoded label map) and
    `timings_us` (INT64: decode, preprocess, infer, postprocess, encode; 0 where unknown).
    Prepared requests are tritonclient InferInputs (tritonclient has no types).
    """

    TIMED_STAGES = ("decode", "preprocess", "infer", "postprocess", "encode")

    def __init__(
        self,
        address: str,
        model: str,
        *,
        input_name: str = "image",
        timeout_s: float | None = None,
    ) -> None:
        try:
            import tritonclient.grpc.aio as triton
        except ImportError as exc:
            raise ImportError(
                "--protocol triton needs tritonclient: pip install 'tritonclient[grpc]'"
            ) from exc
        self._triton = triton
        self._client = triton.InferenceServerClient(address)
        self._model = model
        self._input_name = input_name
        self._timeout_s = timeout_s
        self._outputs = [
            triton.InferRequestedOutput("mask"),
            triton.InferRequestedOutput("timings_us"),
        ]

    def prepare(self, image: bytes) -> Any:
        tensor = self._triton.InferInput(self._input_name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
        return tensor

    async def call(self, prepared: Any) -> Reply:
        from tritonclient.utils import InferenceServerException

        try:
            result = await self._client.infer(
                self._model,
                [prepared],
                outputs=self._outputs,
                client_timeout=self._timeout_s,
            )
        except InferenceServerException as exc:
            code = (exc.status() or "StatusCode.UNKNOWN").rsplit(".", 1)[-1]
            raise CallFailed(code, exc.message() or "") from exc
        timings = result.as_numpy("timings_us")
        stages: dict[str, float] = {}
        if timings is not None:
            values = timings.reshape(-1)
            stages = {s: float(v) / 1e6 for s, v in zip(self.TIMED_STAGES, values, strict=False)}
            batch = int(values[len(self.TIMED_STAGES)]) if values.size > 5 else 0
            return Reply(stages, batch)
        return Reply(stages)

    async def close(self) -> None:
        await self._client.close()
