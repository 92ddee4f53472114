"""SegmentStream: one answer per frame, in order, tagged; bad frames answered, never dropped."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from segserve.v1 import segserve_pb2 as pb
from segserve_client.masks import decode_srle
from tests.conftest import encode, quadrant_image
from tests.harness.synthetic_models import expected_colour_labels

PNG = encode(quadrant_image())

pytestmark = pytest.mark.timeout(60)  # a backstop: the waits below are bounded themselves


def frame(frame_id: int, data: bytes = PNG, model: str = "colour") -> pb.SegmentStreamRequest:
    return pb.SegmentStreamRequest(
        frame_id=frame_id, request=pb.SegmentRequest(model=model, image=pb.Image(encoded=data))
    )


async def test_answers_come_in_order_with_frame_ids(stub):
    # Frames alternate between a slow and a fast model: answers must still keep frame order.
    frames = [frame(1000 + i, model="colour_busy" if i % 2 == 0 else "colour") for i in range(12)]
    answers = [answer async for answer in stub.SegmentStream(iter(frames))]
    assert [a.frame_id for a in answers] == [f.frame_id for f in frames]
    expected = expected_colour_labels(quadrant_image())
    for answer in answers:
        assert answer.WhichOneof("result") == "response"
        np.testing.assert_array_equal(decode_srle(answer.response.masks[0].data), expected)


async def test_bad_frames_are_answered_and_the_stream_goes_on(stub):
    frames = [
        frame(1),
        frame(2, b"garbage"),
        frame(3, model="nope"),
        frame(4, PNG[:30]),
        frame(5),
    ]
    answers = [answer async for answer in stub.SegmentStream(iter(frames))]
    assert [a.frame_id for a in answers] == [1, 2, 3, 4, 5]
    kinds = [a.WhichOneof("result") for a in answers]
    assert kinds == ["response", "error", "error", "error", "response"]
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "unrecognised image format" in answers[1].error.message
    assert answers[2].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert answers[3].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_interleaved_writes_and_reads(stub):
    """A camera loop: send a frame, read its answer, repeat, on one stream."""
    call = stub.SegmentStream()
    for frame_id in range(5):
        await call.write(frame(frame_id))
        answer = await call.read()
        assert answer.frame_id == frame_id and answer.WhichOneof("result") == "response"
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_many_frames_in_flight(stub):
    frames = [frame(i) for i in range(40)]
    answers = [a async for a in stub.SegmentStream(iter(frames))]
    assert [a.frame_id for a in answers] == list(range(40))


async def test_malformed_frame_is_answered_in_its_place_and_the_stream_goes_on(channel):
    """The rule of both stream APIs: a frame that does not parse gets INVALID_ARGUMENT in its
    place (frame_id 0: its id could not be read), in order, and later frames are answered."""
    call = channel.stream_stream("/segserve.v1.Segmentation/SegmentStream")(
        iter(
            [
                frame(1).SerializeToString(),
                b"\xff\xff\xff not a frame",
                frame(3).SerializeToString(),
            ]
        )
    )
    answers = [pb.SegmentStreamResponse.FromString(answer) async for answer in call]
    assert await call.code() == grpc.StatusCode.OK
    assert [a.frame_id for a in answers] == [1, 0, 3]
    assert [a.WhichOneof("result") for a in answers] == ["response", "error", "response"]
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a valid segserve.v1.SegmentStreamRequest" in answers[1].error.message


async def test_cancelled_stream_leaves_the_server_serving(server, stub):
    call = stub.SegmentStream(iter([frame(i, model="colour_busy") for i in range(20)]))
    first = await call.read()
    assert first.frame_id == 0
    call.cancel()
    # The server has let go of the cancelled stream: none of its frames is still in flight.
    registry = server.core.metrics.registry

    def inflight() -> float:
        labels = {"model": "colour_busy"}
        return registry.get_sample_value("segserve_inflight_requests", labels) or 0.0

    limit = time.monotonic() + 20
    while inflight() > 0:
        assert time.monotonic() < limit, "the cancelled stream's frames are still in flight"
        await asyncio.sleep(0.001)
    answers = [a async for a in stub.SegmentStream(iter([frame(7)]))]
    assert [a.frame_id for a in answers] == [7]
