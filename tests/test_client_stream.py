"""The client's real-time stream API: stream options, frames with capture times and overrides,
results for every frame status (offline), then against the real server on loopback.

The server-backed cases use `colour_batch4`, which runs a batch only when 4 requests are queued
(or after 30 s): a lone stream's frames stay queued there, so which are DROPPED (policy latest:
superseded while queued) and EXPIRED (past their max age while queued) does not depend on timing.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from segserve.v1 import segserve_pb2 as pb
from segserve_client import (
    AsyncSegserveClient,
    FrameDropped,
    FrameExpired,
    FrameFailed,
    FrameSkipped,
    FrameStatus,
    FrameTiming,
    Segmentation,
    SegserveClient,
    StreamFrame,
)
from segserve_client.masks import encode_srle
from segserve_client.streaming import StreamOptions, now_us, stream_policy
from segserve_client.types import Frame, RequestFeed, SegmentOptions, StreamResult, stream_result
from tests.conftest import encode, quadrant_image
from tests.harness.synthetic_models import expected_colour_labels

pytestmark = pytest.mark.timeout(90)  # colour_batch4 holds a batch for 30 s at most

PNG = encode(quadrant_image())
EXPECTED = expected_colour_labels(quadrant_image())
LABELS = np.arange(12, dtype=np.uint8).reshape(3, 4) % 3


# ----------------------------------------------------------------------------------------------
# Options and frames
# ----------------------------------------------------------------------------------------------


def test_stream_options() -> None:
    assert StreamOptions.create().proto() == pb.StreamOptions(policy=pb.STREAM_POLICY_QUEUE)
    options = StreamOptions.create("LATEST", max_age_ms=250, priority=1)
    assert options.proto() == pb.StreamOptions(
        policy=pb.STREAM_POLICY_LATEST, max_age_ms=250, priority=1
    )
    assert StreamOptions.create(pb.STREAM_POLICY_LATEST, 0).max_age_ms == 0  # 0: no max age
    assert stream_policy("queue") == pb.STREAM_POLICY_QUEUE


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"policy": "newest"}, "unknown stream policy 'newest'"),
        ({"policy": 0}, "unknown stream policy 0"),  # UNSPECIFIED is not a choice
        ({"policy": True}, "unknown stream policy True"),
        ({"max_age_ms": -1}, "max_age_ms"),
        ({"max_age_ms": 2**32}, "max_age_ms"),
        ({"max_age_ms": 1.5}, "max_age_ms"),
        ({"priority": -1}, "priority"),
    ],
)
def test_bad_stream_options_raise(arguments: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StreamOptions.create(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "arguments",
    [
        {"frame_id": -1},
        {"capture_time_us": -5},
        {"policy": "sometimes"},
        {"max_age_ms": -1},
        {"priority": -2},
    ],
)
def test_bad_stream_frames_raise(arguments: dict[str, object]) -> None:
    values: dict[str, object] = {"frame_id": 1, "image": b"png", **arguments}
    with pytest.raises(ValueError):
        StreamFrame(**values)  # type: ignore[arg-type]


def test_the_first_frame_carries_the_stream_options() -> None:
    options = StreamOptions.create("latest", max_age_ms=100, priority=2)
    frames: list[Frame] = [(1, b"a"), StreamFrame(2, b"b"), (3, b"c")]
    before = now_us()
    requests = list(RequestFeed(frames, SegmentOptions.create("m"), options).requests())
    after = now_us()
    assert [r.frame_id for r in requests] == [1, 2, 3]
    assert [r.HasField("options") for r in requests] == [True, False, False]
    assert requests[0].options == options.proto()
    for request in requests:  # no capture time given: the time the feed sent the frame
        assert before <= request.capture_time_us <= after
        assert request.policy == pb.STREAM_POLICY_UNSPECIFIED and request.max_age_ms == 0
        assert request.request.priority == 0  # the stream's level
    assert not any(
        r.HasField("options") for r in RequestFeed(frames, SegmentOptions.create("m")).requests()
    )


def test_stream_frames_carry_their_overrides() -> None:
    frame = StreamFrame(
        7, b"img", capture_time_us=1_234_567, policy="latest", max_age_ms=40, priority=1
    )
    (request,) = RequestFeed([frame], SegmentOptions.create("m", encodings="png")).requests()
    assert (request.frame_id, request.capture_time_us) == (7, 1_234_567)
    assert (request.policy, request.max_age_ms) == (pb.STREAM_POLICY_LATEST, 40)
    assert request.request.priority == 1 and request.request.image.encoded == b"img"
    assert list(request.request.encodings) == [pb.MASK_ENCODING_PNG]
    plain = StreamFrame(8, b"img", capture_time_us=0)  # 0: says "not known", as the protocol
    (request,) = RequestFeed([plain], SegmentOptions.create("m")).requests()
    assert request.capture_time_us == 0 and request.policy == pb.STREAM_POLICY_UNSPECIFIED


def test_segment_options_priority_and_queue_timeout() -> None:
    request = SegmentOptions.create("m", priority=2, timeout_us=5000).request(b"img")
    assert (request.priority, request.timeout_us) == (2, 5000)
    default = SegmentOptions.create("m").request(b"img")
    assert (default.priority, default.timeout_us) == (0, 0)
    with pytest.raises(ValueError, match="priority"):
        SegmentOptions.create("m", priority=-1)
    with pytest.raises(ValueError, match="queue timeout"):
        SegmentOptions.create("m", timeout_us=-1)


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


def answer(frame_id: int, status: int, **fields: object) -> pb.SegmentStreamResponse:
    times = {"capture_time_us": 1_000, "receive_time_us": 5_000, "answer_time_us": 9_000}
    return pb.SegmentStreamResponse(frame_id=frame_id, status=status, **{**times, **fields})  # type: ignore[arg-type]


def segment_response() -> pb.SegmentResponse:
    mask = pb.EncodedMask(encoding=pb.MASK_ENCODING_SRLE, data=encode_srle(LABELS))
    return pb.SegmentResponse(width=4, height=3, masks=[mask], model="m", model_version=1)


def test_an_ok_answer_is_a_segmentation_with_its_frame_times() -> None:
    frame_id, result = stream_result(
        answer(3, pb.FRAME_STATUS_OK, response=segment_response()), arrival_time_us=12_000
    )
    assert frame_id == 3 and isinstance(result, Segmentation)
    np.testing.assert_array_equal(result.labels, LABELS)
    assert result.frame == FrameTiming(3, FrameStatus.OK, 1_000, 5_000, 9_000, 12_000)
    assert result.status == "OK" and result.status is FrameStatus.OK
    assert (result.capture_time_us, result.receive_time_us, result.answer_time_us) == (
        1_000,
        5_000,
        9_000,
    )
    assert result.frame is not None
    assert (result.frame.server_us, result.frame.capture_to_answer_us) == (4_000, 11_000)


@pytest.mark.parametrize(
    ("status", "kind"),
    [(pb.FRAME_STATUS_DROPPED, FrameDropped), (pb.FRAME_STATUS_EXPIRED, FrameExpired)],
)
def test_dropped_and_expired_are_results_never_raised(status: int, kind: type) -> None:
    frame_id, result = stream_result(answer(4, status), raise_errors=True, arrival_time_us=9_500)
    assert frame_id == 4 and isinstance(result, kind) and isinstance(result, FrameSkipped)
    assert not isinstance(result, Exception)
    assert result.status == FrameStatus.from_proto(status)
    assert (result.frame_id, result.capture_time_us, result.receive_time_us) == (4, 1_000, 5_000)
    assert result.answer_time_us == 9_000 and result.frame.capture_to_answer_us == 8_500
    assert str(result) == f"frame 4: {result.status}"
    explained = answer(5, status, error=pb.FrameError(code=4, message="too old"))
    _, with_message = stream_result(explained, raise_errors=True)
    assert isinstance(with_message, kind) and isinstance(with_message, FrameSkipped)
    assert with_message.details == "too old"


def test_an_error_answer_is_a_frame_failed_with_its_times() -> None:
    failed = answer(6, pb.FRAME_STATUS_ERROR, error=pb.FrameError(code=3, message="corrupt"))
    _, result = stream_result(failed, arrival_time_us=10_000)
    assert isinstance(result, FrameFailed) and result.code == grpc.StatusCode.INVALID_ARGUMENT
    assert result.status is FrameStatus.ERROR and result.frame is not None
    assert (result.capture_time_us, result.receive_time_us, result.answer_time_us) == (
        1_000,
        5_000,
        9_000,
    )
    with pytest.raises(FrameFailed) as raised:
        stream_result(failed, raise_errors=True)
    assert raised.value.frame_id == 6


def test_answers_of_servers_without_status() -> None:
    _, ok = stream_result(pb.SegmentStreamResponse(frame_id=1, response=segment_response()))
    assert isinstance(ok, Segmentation) and ok.status is FrameStatus.OK
    assert ok.frame is not None and ok.frame.server_us is None  # no times: not known
    assert ok.frame.capture_to_answer_us is None
    _, empty = stream_result(pb.SegmentStreamResponse(frame_id=2))
    assert isinstance(empty, FrameFailed) and empty.code == grpc.StatusCode.UNKNOWN
    _, ok_without_response = stream_result(answer(3, pb.FRAME_STATUS_OK))
    assert isinstance(ok_without_response, FrameFailed)


def test_a_segment_answer_has_no_frame() -> None:
    result = Segmentation.from_proto(segment_response())
    assert result.frame is None and result.status is FrameStatus.OK
    assert (result.capture_time_us, result.receive_time_us, result.answer_time_us) == (0, 0, 0)
    assert FrameFailed(1, grpc.StatusCode.INTERNAL, "x").capture_time_us == 0


# ----------------------------------------------------------------------------------------------
# Against the server
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(server) -> str:
    return f"127.0.0.1:{server.port}"


async def test_segment_takes_a_priority_and_a_queue_timeout(target):
    async with AsyncSegserveClient(target, timeout_s=30) as client:
        for priority in (0, 1, 2, 7):  # 7: not a level of the model, so its default level
            result = await client.segment(PNG, "colour", priority=priority, timeout_us=2_000_000)
            np.testing.assert_array_equal(result.labels, EXPECTED)
        info = await client.get_model("colour")
        assert (info.batching.priority_levels, info.batching.default_priority_level) == (2, 2)


async def test_ok_frames_tell_their_times(target):
    captured = [now_us() - 1_000 * (10 - i) for i in range(4)]
    frames = [StreamFrame(i, PNG, capture_time_us=captured[i]) for i in range(4)]
    async with AsyncSegserveClient(target, timeout_s=30) as client:
        before = now_us()
        answers = [a async for a in client.stream(frames, "colour", priority=1, max_age_ms=60_000)]
        after = now_us()
    assert [frame_id for frame_id, _ in answers] == [0, 1, 2, 3]
    for (frame_id, result), capture in zip(answers, captured, strict=True):
        assert isinstance(result, Segmentation), result
        np.testing.assert_array_equal(result.labels, EXPECTED)
        assert result.frame is not None and result.frame.frame_id == frame_id
        assert result.status is FrameStatus.OK and result.capture_time_us == capture
        assert 0 < result.receive_time_us <= result.answer_time_us
        assert before <= result.frame.arrival_time_us <= after
        assert result.frame.server_us is not None and result.frame.server_us >= 0


async def test_latest_drops_superseded_frames_and_max_age_expires(target):
    """Policy latest on a model that holds its queue: frames 0 and 1 are superseded while
    queued; frame 2, the newest, stays queued until its own max age passes. (The sync client
    runs in a thread: the server shares the test's event loop.)"""
    frames = [
        StreamFrame(0, PNG),
        StreamFrame(1, PNG),
        StreamFrame(2, PNG, max_age_ms=200, capture_time_us=now_us()),
    ]

    def run() -> list[StreamResult]:
        with SegserveClient(target, timeout_s=30) as client:
            stream = client.stream(frames, "colour_batch4", policy="latest", raise_errors=True)
            return list(stream)

    answers = await asyncio.to_thread(run)
    assert [frame_id for frame_id, _ in answers] == [0, 1, 2]
    results = [result for _, result in answers]
    assert [type(r) for r in results] == [FrameDropped, FrameDropped, FrameExpired]
    assert [r.status for r in results] == ["DROPPED", "DROPPED", "EXPIRED"]
    for frame, result in zip(frames, results, strict=True):
        assert isinstance(result, FrameSkipped)
        assert result.capture_time_us > 0
        if frame.capture_time_us is not None:
            assert result.capture_time_us == frame.capture_time_us
        assert 0 < result.receive_time_us <= result.answer_time_us
    expired = results[2]
    assert expired.answer_time_us - expired.receive_time_us >= 200_000


async def test_stream_max_age_expires_frames_of_tuple_form(target):
    async with AsyncSegserveClient(target, timeout_s=30) as client:
        before = now_us()
        answers = [
            a
            async for a in client.stream(
                [(10, PNG), (11, PNG)], "colour_batch4", max_age_ms=50, raise_errors=True
            )
        ]
    assert [frame_id for frame_id, _ in answers] == [10, 11]
    for _, result in answers:
        assert isinstance(result, FrameExpired), result
        assert result.capture_time_us >= before  # stamped when sent
        assert result.answer_time_us - result.receive_time_us >= 50_000


async def test_failed_frames_keep_their_times(target):
    async with AsyncSegserveClient(target, timeout_s=30) as client:
        answers = [a async for a in client.stream([(1, b"junk"), (2, PNG)], "colour")]
    (_, failed), (_, ok) = answers
    assert isinstance(failed, FrameFailed) and failed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.status is FrameStatus.ERROR and failed.frame is not None
    assert failed.capture_time_us > 0 and 0 < failed.receive_time_us <= failed.answer_time_us
    assert isinstance(ok, Segmentation)


async def test_per_frame_policy_on_a_queue_stream(target):
    """A frame may ask for latest on a queue stream: only frames that say latest supersede and
    are superseded."""
    frames = [
        StreamFrame(0, PNG, policy="latest", max_age_ms=300),
        StreamFrame(1, PNG, policy="latest", max_age_ms=300),
    ]
    async with AsyncSegserveClient(target, timeout_s=30) as client:
        answers = [a async for a in client.stream(frames, "colour_batch4", policy="queue")]
    assert [type(result) for _, result in answers] == [FrameDropped, FrameExpired]


async def test_sync_stream_is_still_pairs_in_order(target):
    def run() -> list[StreamResult]:
        with SegserveClient(target, timeout_s=30) as client:
            return list(client.stream(((i, quadrant_image()) for i in range(3)), "colour"))

    answers = await asyncio.to_thread(run)
    assert [frame_id for frame_id, _ in answers] == [0, 1, 2]
    assert all(isinstance(result, Segmentation) for _, result in answers)


async def test_async_stream_rejects_bad_options_before_calling(target):
    async with AsyncSegserveClient(target, timeout_s=30) as client:
        with pytest.raises(ValueError, match="stream policy"):
            client.stream([(1, PNG)], "colour", policy="newest")
