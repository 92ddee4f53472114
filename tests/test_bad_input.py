"""Bad input of every kind gets its precise gRPC status and a clear message; the server stays up."""

from __future__ import annotations

import asyncio
import struct
import zlib

import grpc
import numpy as np
import pytest

from segserve.v1 import segserve_pb2 as pb
from segserve_client.masks import decode_srle
from segserve_server.server import Server
from tests.conftest import H, W, encode, make_settings, quadrant_image

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MIB = 1024 * 1024


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = (
        struct.pack(">I", len(ihdr))
        + b"IHDR"
        + ihdr
        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    )
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00" * 64


async def expect_status(stub, message: pb.SegmentRequest, code, *fragments: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Segment(message, timeout=30)
    assert err.value.code() == code, err.value.details()
    for fragment in fragments:
        assert fragment in err.value.details()


def with_image(data: bytes, model: str = "colour") -> pb.SegmentRequest:
    return pb.SegmentRequest(model=model, image=pb.Image(encoded=data))


JPEG = encode(quadrant_image(), ".jpg")
PNG = encode(quadrant_image(), ".png")


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (b"", ("empty",)),
        (b"not an image at all", ("unrecognised image format",)),
        (JPEG[: len(JPEG) // 2], ("JPEG",)),
        (JPEG[:40], ("JPEG",)),
        (PNG[: len(PNG) // 2], ("PNG", "corrupt or truncated")),
        (PNG[:20], ("PNG", "truncated")),
        (PNG[:60] + b"\x00" * 50 + PNG[110:], ("PNG",)),
        (png_header_only(100_000, 100_000), ("100000x100000", "largest side")),
        (png_header_only(10_000, 9_000), ("90000000 pixels", "limit")),
        (png_header_only(0, 10), ("empty size",)),
    ],
    ids=[
        "empty",
        "garbage",
        "jpeg-half",
        "jpeg-header-cut",
        "png-half",
        "png-ihdr-cut",
        "png-corrupt",
        "absurd-side",
        "too-many-pixels",
        "zero-width",
    ],
)
async def test_bad_images(stub, data, fragments):
    await expect_status(stub, with_image(data), INVALID, *fragments)


async def test_absurd_dimensions_are_refused_before_decoding(stub):
    """A 4-gigapixel header costs no decoding: answered as fast as a tiny request."""
    await expect_status(stub, with_image(png_header_only(65_000, 65_000)), INVALID, "65000x65000")


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        (
            pb.RawImage(pixels=b"\x00" * 10, width=W, height=H, format=pb.PIXEL_FORMAT_RGB8),
            ("needs 9216 bytes", "got 10"),
        ),
        (
            pb.RawImage(pixels=b"\x00" * (W * H), width=W, height=H, format=pb.PIXEL_FORMAT_RGB8),
            ("got 3072",),
        ),
        (pb.RawImage(pixels=b"\x00" * (W * H * 3), width=W, height=H), ("pixel format",)),
        (pb.RawImage(pixels=b"", width=0, height=0, format=pb.PIXEL_FORMAT_GRAY8), ("empty size",)),
        (
            pb.RawImage(pixels=b"\x00", width=70_000, height=1, format=pb.PIXEL_FORMAT_GRAY8),
            ("largest side",),
        ),
    ],
    ids=["short", "gray-bytes-for-rgb", "no-format", "empty", "too-wide"],
)
async def test_bad_raw_images(stub, raw, fragments):
    await expect_status(
        stub, pb.SegmentRequest(model="colour", image=pb.Image(raw=raw)), INVALID, *fragments
    )


async def test_bad_requests(stub):
    await expect_status(stub, pb.SegmentRequest(model="colour"), INVALID, "no image")
    await expect_status(
        stub, pb.SegmentRequest(image=pb.Image(encoded=PNG)), INVALID, "names no model"
    )
    await expect_status(
        stub, with_image(PNG, "no_such_model"), grpc.StatusCode.NOT_FOUND, "no_such_model", "colour"
    )
    twice = with_image(PNG)
    twice.encodings.extend([pb.MASK_ENCODING_PNG, pb.MASK_ENCODING_PNG])
    await expect_status(stub, twice, INVALID, "repeat")
    unknown = with_image(PNG)
    unknown.encodings.append(42)  # a value the enum does not define
    await expect_status(stub, unknown, INVALID, "mask encoding 42")


async def test_wrong_message_type_is_refused(channel):
    """Bytes that are not a SegmentRequest at all (a client with the wrong schema)."""
    call = channel.unary_unary("/segserve.v1.Segmentation/Segment")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(b"\xff\xff\xff\xff garbage")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid segserve.v1.SegmentRequest" in err.value.details()


def sample(server: Server, name: str, **labels: str) -> float:
    return server.core.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_expired_deadline(stub):
    big = encode(np.random.default_rng(0).integers(0, 255, (1080, 1920, 3), dtype=np.uint8), ".png")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Segment(with_image(big, "colour_busy"), timeout=0.001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    ok = await stub.Segment(with_image(PNG), timeout=30)
    assert ok.width == W


async def test_the_server_enforces_the_deadline(stub, server):
    """Not the client's own timer: a request whose deadline passes in the server's queue
    (colour_batch4 waits 30 s for a batch of 4) leaves the queue unrun, and the server counts
    it DEADLINE_EXCEEDED."""
    model = "colour_batch4"
    batcher = server.core.models.get(model).batcher
    counted = sample(server, "segserve_requests_total", model=model, code="DEADLINE_EXCEEDED")
    batches = sample(server, "segserve_batch_size_count", model=model)
    call = asyncio.ensure_future(stub.Segment(with_image(PNG, model), timeout=0.5))
    await wait_for(lambda: batcher.queue_depth == 1)  # it reached the server's queue
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_for(
        lambda: (
            sample(server, "segserve_requests_total", model=model, code="DEADLINE_EXCEEDED")
            == counted + 1
        )
    )
    await wait_for(lambda: batcher.queue_depth == 0)
    assert sample(server, "segserve_batch_size_count", model=model) == batches  # never ran


async def test_cancelled_requests_leave_the_server_serving(stub, server):
    """colour_batch4 waits 30 s for a batch of 4: three requests stay queued until cancelled."""
    model = "colour_batch4"
    batcher = server.core.models.get(model).batcher
    cancelled = sample(server, "segserve_requests_total", model=model, code="CANCELLED")
    calls = [stub.Segment(with_image(PNG, model)) for _ in range(3)]
    await wait_for(lambda: batcher.queue_depth == 3)  # every call reached the server
    for call in calls:
        call.cancel()
    for call in calls:
        with pytest.raises(asyncio.CancelledError):
            await call
    await wait_for(lambda: batcher.queue_depth == 0)  # they left the queue at once
    await wait_for(
        lambda: (
            sample(server, "segserve_requests_total", model=model, code="CANCELLED")
            == cancelled + 3
        )
    )
    answers = await asyncio.gather(
        *(stub.Segment(with_image(PNG, "colour_busy")) for _ in range(3))
    )
    assert all(a.width == W for a in answers)


async def wait_for(condition, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def test_full_queue_is_resource_exhausted_and_cancelled_requests_leave_it(stub, server):
    """colour_queue2 queues at most 2 and waits 30 s for a batch of 8: the queue stays full."""
    batcher = server.core.models.get("colour_queue2").batcher
    waiting = [
        asyncio.ensure_future(stub.Segment(with_image(PNG, "colour_queue2"))) for _ in range(2)
    ]
    await wait_for(lambda: batcher.queue_depth == 2)
    await expect_status(
        stub, with_image(PNG, "colour_queue2"), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit 2"
    )
    for call in waiting:
        call.cancel()
    await wait_for(lambda: batcher.queue_depth == 0)
    await asyncio.gather(*waiting, return_exceptions=True)
    again = asyncio.ensure_future(stub.Segment(with_image(PNG, "colour_queue2")))
    await wait_for(lambda: batcher.queue_depth == 1)
    again.cancel()
    await wait_for(lambda: batcher.queue_depth == 0)


async def test_oversized_message(repository):
    server = Server(make_settings(repository, max_receive_message_bytes=MIB, metrics_port=None))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            from segserve.v1 import segserve_pb2_grpc as pb_grpc

            stub = pb_grpc.SegmentationStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Segment(with_image(b"\xff\xd8\xff" + b"\x00" * (2 * MIB)))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in err.value.details()
            response = await stub.Segment(with_image(PNG))
            np.testing.assert_array_equal(decode_srle(response.masks[0].data).shape, (H, W))
    finally:
        await server.stop(timeout_s=5)


async def test_expired_calls_are_counted_deadline_exceeded_not_cancelled(stub, server):
    """gRPC cancels a handler whose deadline passed; the server still counts it as the
    deadline's doing (three calls queued in colour_batch4, which needs four to run)."""
    model = "colour_batch4"
    before = {
        code: sample(server, "segserve_requests_total", model=model, code=code)
        for code in ("DEADLINE_EXCEEDED", "CANCELLED")
    }
    calls = [
        asyncio.ensure_future(stub.Segment(with_image(PNG, model), timeout=0.3)) for _ in range(3)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(
        isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for r in results
    )
    await wait_for(
        lambda: (
            sample(server, "segserve_requests_total", model=model, code="DEADLINE_EXCEEDED")
            == before["DEADLINE_EXCEEDED"] + 3
        )
    )
    assert (
        sample(server, "segserve_requests_total", model=model, code="CANCELLED")
        == before["CANCELLED"]
    )
