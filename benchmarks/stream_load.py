"""The load of benchmarks/stream_bench.py: paced streams, a closed-loop stream, bulk callers.

Every stream here is one camera: its frames are due on a fixed clock (frame k of a stream at
`start + offset + k / rate`); the sender sends a frame when it is due, or, when the transport
held the previous one back past this one's due time, as soon as the transport lets it: such a
frame is counted late-sent (the sender got control back more than `LATE_TOLERANCE_S` after
the frame was due; a timer firing late is jitter, recorded apart). The sender is never ahead of
the clock, and stops at the end of the window: frames due then and not sent yet are not sent. Each frame's
`capture_time_us` is the client's wall clock when it is handed to the transport, and every
answer's capture-to-answer latency is measured on the client (receive time - capture time), so
segserve's and Triton's figures compare.

- `segserve_stream`: one segserve.v1 SegmentStream (QUEUE or LATEST, optional max age).
- `triton_stream`: one KServe ModelStreamInfer stream to a real Triton (tritonclient.grpc.aio
  stream_infer), the benchmark's Python model taking the same JPEG bytes.
- `closed_loop_stream`: one QUEUE stream with a fixed number of frames unanswered (capacity).
- `bulk_callers`: closed-loop unary Segment callers (the model's default priority level).

Each stream has its own channel (one connection per camera). Used by stream_bench.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import numpy as np

from segserve.v1 import segserve_pb2 as pb
from segserve_client.types import channel_options

LATE_TOLERANCE_S = 0.002
SEGMENT = "/segserve.v1.Segmentation/Segment"
SEGMENT_STREAM = "/segserve.v1.Segmentation/SegmentStream"
STATUS_NAMES = {
    pb.FRAME_STATUS_OK: "OK",
    pb.FRAME_STATUS_DROPPED: "DROPPED",
    pb.FRAME_STATUS_EXPIRED: "EXPIRED",
    pb.FRAME_STATUS_ERROR: "ERROR",
}
POLICIES = {"queue": pb.STREAM_POLICY_QUEUE, "latest": pb.STREAM_POLICY_LATEST}


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True)
class Pace:
    """One stream's clock: frame k is due at start + offset_s + k / rate (time.monotonic())."""

    start: float
    offset_s: float
    rate: float  # frames per second of this stream
    duration_s: float

    def due(self, k: int) -> float:
        return self.start + self.offset_s + k / self.rate

    @property
    def end(self) -> float:
        return self.start + self.duration_s


@dataclass
class Answer:
    frame_id: int | None  # None: a Triton error, whose id tritonclient does not give back
    status: str
    latency_ms: float  # client receive time - capture time
    received_s: float  # time.monotonic()
    queue_us: int = 0
    infer_us: int = 0
    batch_size: int = 0
    error: str = ""


@dataclass
class StreamResult:
    """What one stream sent and got back."""

    sent_ids: list[int] = field(default_factory=list)
    capture_us: dict[int, int] = field(default_factory=dict)
    lateness_s: list[float] = field(default_factory=list)  # send time - due time
    held_s: list[float] = field(default_factory=list)  # when the sender was free - due time
    answers: list[Answer] = field(default_factory=list)
    end: str = ""  # the stream's final gRPC status code name
    end_details: str = ""
    echo_mismatches: int = 0  # answers whose capture_time_us is not the frame's
    drain_timed_out: bool = False
    finished_sending_s: float = 0.0
    last_answer_s: float = 0.0

    @property
    def late_sent(self) -> int:
        return sum(1 for x in self.held_s if x > LATE_TOLERANCE_S)


async def _paced(pace: Pace) -> AsyncIterator[tuple[int, float, float]]:
    """(k, lateness_s, held_s) at the moment frame k may be sent, while the window lasts;
    held_s: how late the sender was free to send it (> 0: the transport held it back)."""
    k = 0
    while True:
        due = pace.due(k)
        if due >= pace.end:
            return
        now = time.monotonic()
        if now >= pace.end:
            return
        if due > now:
            await asyncio.sleep(due - now)
        yield k, time.monotonic() - due, now - due
        k += 1


def _record_answer(result: StreamResult, message: pb.SegmentStreamResponse) -> None:
    received_us, received_s = now_us(), time.monotonic()
    status = STATUS_NAMES.get(message.status, f"UNSPECIFIED({message.status})")
    capture = result.capture_us.get(message.frame_id)
    if capture is None or capture != message.capture_time_us:
        result.echo_mismatches += 1
    if capture is None:
        capture = message.capture_time_us
    answer = Answer(message.frame_id, status, (received_us - capture) / 1e3, received_s)
    if message.HasField("response"):
        t = message.response.timings
        answer.queue_us, answer.infer_us, answer.batch_size = t.queue_us, t.infer_us, t.batch_size
    if message.HasField("error"):
        answer.error = f"{message.error.code}: {message.error.message}"
    result.answers.append(answer)
    result.last_answer_s = received_s


async def _finish(
    call: Any, reading: asyncio.Task[None], result: StreamResult, drain_s: float
) -> None:
    """Waits for every answer and the stream's end (at most drain_s), then its status."""
    try:
        await asyncio.wait_for(asyncio.shield(reading), drain_s)
    except TimeoutError:
        result.drain_timed_out = True
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await reading
    except grpc.aio.AioRpcError:
        pass
    code = await call.code()
    result.end = code.name
    result.end_details = (await call.details()) or ""


def _segserve_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=channel_options(64 << 20))


async def segserve_stream(
    address: str,
    requests: list[pb.SegmentRequest],
    pace: Pace,
    *,
    policy: str = "queue",
    max_age_ms: int = 0,
    first_image: int = 0,
    drain_s: float = 120.0,
) -> StreamResult:
    """One SegmentStream on its own channel, paced by `pace`; frame ids 1, 2, ..."""
    result = StreamResult()
    async with _segserve_channel(address) as channel:
        stub = channel.stream_stream(
            SEGMENT_STREAM,
            request_serializer=pb.SegmentStreamRequest.SerializeToString,
            response_deserializer=pb.SegmentStreamResponse.FromString,
        )
        call = stub()  # no deadline: a long-lived stream, as docs/streams.md advises

        async def read() -> None:
            async for message in call:
                _record_answer(result, message)

        reading = asyncio.create_task(read())
        options = pb.StreamOptions(policy=POLICIES[policy], max_age_ms=max_age_ms)
        await call.write(pb.SegmentStreamRequest(options=options))
        async for k, lateness, held in _paced(pace):
            frame_id, capture = k + 1, now_us()
            result.sent_ids.append(frame_id)
            result.capture_us[frame_id] = capture
            result.lateness_s.append(lateness)
            result.held_s.append(held)
            request = requests[(first_image + k) % len(requests)]
            await call.write(
                pb.SegmentStreamRequest(frame_id=frame_id, request=request, capture_time_us=capture)
            )
        await call.done_writing()
        result.finished_sending_s = time.monotonic()
        await _finish(call, reading, result, drain_s)
    return result


async def closed_loop_stream(
    address: str, requests: list[pb.SegmentRequest], seconds: float, window: int
) -> StreamResult:
    """One QUEUE stream that keeps `window` frames unanswered for `seconds` (capacity)."""
    result = StreamResult()
    answered = asyncio.Event()
    async with _segserve_channel(address) as channel:
        stub = channel.stream_stream(
            SEGMENT_STREAM,
            request_serializer=pb.SegmentStreamRequest.SerializeToString,
            response_deserializer=pb.SegmentStreamResponse.FromString,
        )
        call = stub()

        async def read() -> None:
            async for message in call:
                _record_answer(result, message)
                answered.set()

        reading = asyncio.create_task(read())
        end = time.monotonic() + seconds
        k = 0
        while time.monotonic() < end:
            while len(result.sent_ids) - len(result.answers) >= window:
                answered.clear()
                if reading.done():
                    break
                await answered.wait()
            if reading.done():
                break
            frame_id, capture = k + 1, now_us()
            result.sent_ids.append(frame_id)
            result.capture_us[frame_id] = capture
            result.lateness_s.append(0.0)
            result.held_s.append(0.0)
            request = requests[k % len(requests)]
            await call.write(
                pb.SegmentStreamRequest(frame_id=frame_id, request=request, capture_time_us=capture)
            )
            k += 1
        await call.done_writing()
        result.finished_sending_s = time.monotonic()
        await _finish(call, reading, result, 120.0)
    return result


def triton_inputs(images: list[bytes]) -> list[Any]:
    """One prepared InferInput per image: BYTES [1, 1], as benchmarks/triton/model.py takes."""
    import tritonclient.grpc.aio as triton

    inputs = []
    for image in images:
        tensor = triton.InferInput("image", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
        inputs.append(tensor)
    return inputs


async def triton_stream(
    address: str,
    model: str,
    inputs: list[Any],
    pace: Pace,
    *,
    first_image: int = 0,
    drain_s: float = 120.0,
) -> StreamResult:
    """One ModelStreamInfer stream (tritonclient.grpc.aio stream_infer) on its own client;
    request ids "1", "2", ... map answers to frames (Triton echoes the id, not the time)."""
    import tritonclient.grpc.aio as triton

    result = StreamResult()
    client = triton.InferenceServerClient(address)
    outputs = [triton.InferRequestedOutput("mask"), triton.InferRequestedOutput("timings_us")]

    async def frames() -> AsyncIterator[dict[str, Any]]:
        async for k, lateness, held in _paced(pace):
            frame_id = k + 1
            result.sent_ids.append(frame_id)
            result.capture_us[frame_id] = now_us()
            result.lateness_s.append(lateness)
            result.held_s.append(held)
            yield {
                "model_name": model,
                "inputs": [inputs[(first_image + k) % len(inputs)]],
                "outputs": outputs,
                "request_id": str(frame_id),
            }
        result.finished_sending_s = time.monotonic()

    responses = client.stream_infer(frames())

    async def read() -> None:
        async for infer_result, error in responses:
            received_us, received_s = now_us(), time.monotonic()
            if error is not None:
                result.answers.append(Answer(None, "ERROR", 0.0, received_s, error=str(error)))
                result.last_answer_s = received_s
                continue
            frame_id = int(infer_result.get_response().id)
            capture = result.capture_us.get(frame_id, received_us)
            answer = Answer(frame_id, "OK", (received_us - capture) / 1e3, received_s)
            timings = infer_result.as_numpy("timings_us")
            if timings is not None:
                answer.infer_us, answer.batch_size = int(timings[0][2]), int(timings[0][5])
            result.answers.append(answer)
            result.last_answer_s = received_s

    reading = asyncio.create_task(read())
    try:
        await asyncio.wait_for(asyncio.shield(reading), pace.duration_s + drain_s)
        result.end = "OK"
    except TimeoutError:
        result.drain_timed_out = True
        responses.cancel()
        result.end = "CANCELLED (drain timeout)"
    except Exception as exc:  # the stream failed: what it said is the result
        result.end, result.end_details = type(exc).__name__, str(exc)[:300]
    finally:
        if not reading.done():
            reading.cancel()
        with contextlib.suppress(BaseException):
            await reading
        await client.close()
    return result


@dataclass
class BulkCall:
    done_s: float  # time.monotonic()
    ok: bool
    queue_us: int = 0
    infer_us: int = 0
    batch_size: int = 0
    error: str = ""


async def bulk_callers(
    address: str, requests: list[bytes], callers: int, stop: asyncio.Event
) -> list[BulkCall]:
    """`callers` closed-loop unary Segment callers (serialised requests, priority 0: the
    model's default level) on one channel, until `stop` is set."""
    calls: list[BulkCall] = []
    async with _segserve_channel(address) as channel:
        segment = channel.unary_unary(SEGMENT, response_deserializer=pb.SegmentResponse.FromString)

        async def caller(index: int) -> None:
            k = index
            while not stop.is_set():
                try:
                    response = await segment(requests[k % len(requests)], timeout=60)
                except grpc.aio.AioRpcError as exc:
                    calls.append(BulkCall(time.monotonic(), False, error=exc.code().name))
                    await asyncio.sleep(0.01)
                else:
                    t = response.timings
                    calls.append(
                        BulkCall(time.monotonic(), True, t.queue_us, t.infer_us, t.batch_size)
                    )
                k += callers

        await asyncio.gather(*(caller(i) for i in range(callers)))
    return calls
