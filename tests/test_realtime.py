"""Real-time streams against the real server: the fate of every frame (OK, DROPPED, EXPIRED,
ERROR) in order, stream options, echoed times, the deadline rule, and the stream metrics."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from segserve.v1 import segserve_pb2 as pb
from tests.conftest import encode, quadrant_image

pytestmark = pytest.mark.timeout(60)

PNG = encode(quadrant_image())
OK, DROPPED, EXPIRED, ERROR = (
    pb.FRAME_STATUS_OK,
    pb.FRAME_STATUS_DROPPED,
    pb.FRAME_STATUS_EXPIRED,
    pb.FRAME_STATUS_ERROR,
)


def frame(frame_id: int, model: str = "colour", **fields: object) -> pb.SegmentStreamRequest:
    return pb.SegmentStreamRequest(
        frame_id=frame_id,
        request=pb.SegmentRequest(model=model, image=pb.Image(encoded=PNG)),
        **fields,  # type: ignore[arg-type]
    )


def options(
    policy: pb.StreamPolicy, max_age_ms: int = 0, priority: int = 0
) -> pb.SegmentStreamRequest:
    return pb.SegmentStreamRequest(
        options=pb.StreamOptions(policy=policy, max_age_ms=max_age_ms, priority=priority)
    )


def sample(server, name: str, **labels: str) -> float:
    return server.core.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_every_frame_is_answered_ok_in_order_with_its_times(stub):
    now_us = time.time_ns() // 1000
    frames = [frame(i, capture_time_us=now_us + i) for i in range(10)]
    answers = [a async for a in stub.SegmentStream(iter(frames))]
    assert [a.frame_id for a in answers] == list(range(10))
    assert all(a.status == OK and a.WhichOneof("result") == "response" for a in answers)
    for i, answer in enumerate(answers):
        assert answer.capture_time_us == now_us + i
        assert now_us <= answer.receive_time_us <= answer.answer_time_us


async def test_latest_under_overload_accounts_for_every_frame(stub, server):
    """colour_busy takes tens of ms a frame; 40 frames sent at once is many times its
    capacity. Every frame gets exactly one answer, in order; only the newest frames run, the
    last one surely (nothing newer can supersede it)."""
    received = sample(server, "segserve_stream_frames_received_total", model="colour_busy",
                      policy="latest")  # fmt: skip
    frames = [options(pb.STREAM_POLICY_LATEST)] + [frame(i, "colour_busy") for i in range(40)]
    answers = [a async for a in stub.SegmentStream(iter(frames))]
    assert [a.frame_id for a in answers] == list(range(40))  # the options message: no answer
    statuses = [a.status for a in answers]
    assert set(statuses) <= {OK, DROPPED}
    assert statuses[-1] == OK
    for answer in answers:
        assert (answer.WhichOneof("result") == "response") == (answer.status == OK)
    assert sample(server, "segserve_stream_frames_received_total", model="colour_busy",
                  policy="latest") == received + 40  # fmt: skip
    for status, name in ((OK, "OK"), (DROPPED, "DROPPED")):
        counted = sample(server, "segserve_stream_frames_answered_total", model="colour_busy",
                         policy="latest", status=name)  # fmt: skip
        assert counted >= statuses.count(status)


async def test_queue_policy_runs_every_frame(stub):
    frames = [options(pb.STREAM_POLICY_QUEUE)] + [frame(i, "colour_busy") for i in range(12)]
    answers = [a async for a in stub.SegmentStream(iter(frames))]
    assert [a.status for a in answers] == [OK] * 12


async def test_a_frame_past_its_max_age_is_expired_and_the_stream_goes_on(stub):
    """colour_batch4 waits 30 s for a batch of 4: a lone frame with a 200 ms max age expires
    in the queue, never runs, and is answered EXPIRED then; the stream goes on."""
    frames = [frame(1, "colour_batch4", max_age_ms=200), frame(2, "colour")]
    answers = [a async for a in stub.SegmentStream(iter(frames))]
    assert [(a.frame_id, a.status) for a in answers] == [(1, EXPIRED), (2, OK)]
    assert answers[0].WhichOneof("result") is None


async def test_stream_options_set_the_max_age_of_later_frames(stub):
    frames = [options(pb.STREAM_POLICY_QUEUE, max_age_ms=200), frame(1, "colour_batch4")]
    answers = [a async for a in stub.SegmentStream(iter(frames))]
    assert [a.status for a in answers] == [EXPIRED]


async def test_bad_frames_are_errors_in_place(stub):
    frames = [
        frame(1),
        pb.SegmentStreamRequest(frame_id=2, request=pb.SegmentRequest(model="nope",
                                image=pb.Image(encoded=PNG))),
        frame(3, policy=7),  # no such policy
        frame(4),
    ]  # fmt: skip
    answers = [a async for a in stub.SegmentStream(iter(frames))]
    assert [(a.frame_id, a.status) for a in answers] == [(1, OK), (2, ERROR), (3, ERROR), (4, OK)]
    assert answers[1].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert answers[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "StreamPolicy" in answers[2].error.message


async def test_a_stream_deadline_answers_every_frame_read_before_it_ends(stub, server):
    """The stream's deadline is not a frame's: shortly before it passes, the server stops
    reading, answers every frame it read (these never run: colour_batch4 waits 30 s for a
    batch of 4) and ends the stream DEADLINE_EXCEEDED."""
    batcher = server.core.models.get("colour_batch4").batcher
    call = stub.SegmentStream(timeout=2.0)
    for i in range(3):
        await call.write(frame(i, "colour_batch4"))
    answers = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while True:
            answer = await call.read()
            if answer is grpc.aio.EOF:
                break
            answers.append(answer)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "every frame read was answered" in (err.value.details() or "")
    assert [a.frame_id for a in answers] == [0, 1, 2]
    assert all(a.status == ERROR for a in answers)
    assert all(a.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] for a in answers)
    await asyncio.wait_for(_until(lambda: batcher.queue_depth == 0), 10)


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def _red(count: int):
    import numpy as np
    import tritonclient.grpc as tg

    pixels = np.zeros((count, 3, 48, 64), np.float32)
    pixels[:, 0] = 1.0
    tensor = tg.InferInput("image", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    return tensor


async def test_priority_requests_are_batched_ahead_of_bulk(server):
    """colour_batch4 forms a batch when 4 requests wait (else it waits 30 s). Three bulk images
    (one KServe request, the model's default level 2) wait; then two images at priority 1
    arrive at once: the batch of 4 takes both of them and the two oldest bulk images, and the
    third bulk image waits for the next batch (in arrival order, the second priority image
    would have waited)."""
    from tritonclient.grpc import aio as ta

    model = "colour_batch4"
    batcher = server.core.models.get(model).batcher
    async with ta.InferenceServerClient(f"127.0.0.1:{server.kserve_port}") as kserve:
        bulk = asyncio.ensure_future(kserve.infer(model, [_red(3)]))
        await asyncio.wait_for(_until(lambda: batcher.queue_depth == 3), 10)
        realtime = await asyncio.wait_for(kserve.infer(model, [_red(2)], priority=1), 30)
        assert realtime.as_numpy("labels").shape == (2, 48, 64)
        await asyncio.wait_for(_until(lambda: batcher.queue_depth == 1), 10)
        assert not bulk.done()
        bulk.cancel()
        await asyncio.wait_for(_until(lambda: batcher.queue_depth == 0), 10)


async def test_every_api_puts_requests_on_its_level(stub, server):
    """Stream frames wait on level 1, Segment calls on the model's default level (2); KServe
    requests on their `priority`, else the default; SegmentRequest.priority overrides."""
    from tritonclient.grpc import aio as ta

    def waited(level: int) -> float:
        return sample(server, "segserve_queue_wait_seconds_count", model="colour",
                      priority=str(level))  # fmt: skip

    before = waited(1), waited(2)
    await stub.Segment(pb.SegmentRequest(model="colour", image=pb.Image(encoded=PNG)))
    assert (waited(1), waited(2)) == (before[0], before[1] + 1)
    answers = [a async for a in stub.SegmentStream(iter([frame(1), frame(2)]))]
    assert [a.status for a in answers] == [OK, OK]
    assert (waited(1), waited(2)) == (before[0] + 2, before[1] + 1)
    await stub.Segment(pb.SegmentRequest(model="colour", image=pb.Image(encoded=PNG), priority=1))
    assert waited(1) == before[0] + 3
    async with ta.InferenceServerClient(f"127.0.0.1:{server.kserve_port}") as kserve:
        await kserve.infer("colour", [_red(1)], priority=1)
        await kserve.infer("colour", [_red(1)])
        await kserve.infer("colour", [_red(1)], priority=9)  # no such level: the default
    assert (waited(1), waited(2)) == (before[0] + 4, before[1] + 3)
