"""SegmentUpload: images beyond the unary message limit, sent in chunks, with the header checks
before any pixel and the memory budget of docs/imaging.md ("Large images") measured."""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import simplejpeg

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_client import AsyncSegserveClient, Segmentation, SegserveClient
from segserve_client.cli import main as client_main
from segserve_client.errors import SegserveError
from segserve_client.upload import Upload
from segserve_server.adapters.upload_v1 import MAX_HEADER_BYTES
from segserve_server.server import Server
from segserve_server.settings import MIB
from tests.conftest import H, W, encode, make_settings, quadrant_image, start_cli_server
from tests.harness.synthetic_models import expected_colour_labels

# Long enough never to fire on a loaded machine; a call that should end early ends at once.
WAIT_S = 60.0


def _upscaled_quadrants(scale: int) -> np.ndarray:
    return cv2.resize(quadrant_image(), (W * scale, H * scale), interpolation=cv2.INTER_NEAREST)


def _png_header(width: int, height: int) -> bytes:
    """The signature and IHDR chunk of an 8-bit RGB PNG of that size: no pixel follows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )


def _header(model: str, total_bytes: int, **request: object) -> pb.SegmentUploadRequest:
    options = pb.SegmentRequest(model=model, **request)  # type: ignore[arg-type]
    return pb.SegmentUploadRequest(header=pb.UploadHeader(request=options, total_bytes=total_bytes))


class GatedUpload:
    """Upload messages that stop after `sent_before_gate` until the gate opens (it opens only
    when the call has ended): a refusal that needs the rest of the bytes would never come."""

    def __init__(self, messages: list[pb.SegmentUploadRequest], rest: int) -> None:
        self.messages = messages
        self.rest = rest  # further 1 MiB chunks after the gate
        self.sent = 0
        self.gate = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[pb.SegmentUploadRequest]:
        for message in self.messages:
            self.sent += 1
            yield message
        await self.gate.wait()
        for _ in range(self.rest):
            self.sent += 1
            yield pb.SegmentUploadRequest(chunk=bytes(MIB))


async def _refused_early(
    stub: pb_grpc.SegmentationStub, upload: GatedUpload
) -> grpc.aio.AioRpcError:
    call = stub.SegmentUpload(upload.__aiter__(), timeout=WAIT_S)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
    finally:
        upload.gate.set()
    assert upload.sent == len(upload.messages)  # nothing after the gate was needed
    return err.value


@pytest.fixture(scope="module")
def target(server: Server) -> str:
    return f"127.0.0.1:{server.port}"


async def test_upload_in_small_chunks_equals_segment(target, tmp_path):
    image = _upscaled_quadrants(4)
    data = encode(image)
    path = tmp_path / "quadrants.png"
    path.write_bytes(data)
    async with AsyncSegserveClient(target, timeout_s=WAIT_S) as client:
        whole = await client.segment(data, "colour", include_pixel_counts=True)
        for source, chunk_bytes in ((data, 1000), (path, 7), (data, len(data))):
            uploaded = await client.segment_large(
                source, "colour", chunk_bytes=chunk_bytes, include_pixel_counts=True
            )
            np.testing.assert_array_equal(uploaded.labels, whole.labels)
            assert (uploaded.width, uploaded.height) == (W * 4, H * 4)
            assert uploaded.classes == whole.classes
        at_model = await client.segment_large(path, "colour", output_size="model")
        np.testing.assert_array_equal(
            at_model.labels,
            expected_colour_labels(cv2.resize(image, (W, H), interpolation=cv2.INTER_AREA)),
        )


async def test_sync_client_uploads(target, stub):
    jpeg = encode(_upscaled_quadrants(8), ".jpg")

    def run() -> None:
        with SegserveClient(target, timeout_s=WAIT_S) as client:
            uploaded = client.segment_large(jpeg, "colour", chunk_bytes=4096, encodings="png")
            whole = client.segment(jpeg, "colour", encodings="png")
            np.testing.assert_array_equal(uploaded.labels, whole.labels)

    await asyncio.to_thread(run)
    limits = (await stub.ListModels(pb.ListModelsRequest())).limits
    assert limits.max_upload_bytes == 1024 * MIB


@pytest.mark.parametrize(
    ("first", "why"),
    [
        (_png_header(100_000, 100_000), "100000x100000 pixels; the largest side accepted is 16384"),
        (_png_header(9000, 9000), "9000x9000 = 81000000 pixels; the limit is 40000000"),
        (b"GIF89a" + bytes(200), "unrecognised image format (first bytes 474946383961"),
        (b"\xff\xd8\xff\xe0" + bytes(MAX_HEADER_BYTES), "JPEG header is corrupt or truncated"),
    ],
)
async def test_a_header_past_the_limits_is_refused_after_the_first_chunk(stub, first, why):
    # Declares 512 MiB (within max_upload_bytes), sends one chunk and waits: the refusal must
    # come from that chunk alone. (The buffer is calloc'd: untouched pages cost nothing.)
    upload = GatedUpload(
        [_header("colour", 512 * MIB), pb.SegmentUploadRequest(chunk=first)], rest=512
    )
    error = await _refused_early(stub, upload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert why in (error.details() or "")


async def test_the_header_is_checked_across_chunks(stub):
    # An IHDR split over three chunks is read once all of it is in.
    head = _png_header(20_000, 20_000)
    chunks = [head[:5], head[5:20], head[20:]]
    upload = GatedUpload(
        [_header("colour", 64 * MIB)] + [pb.SegmentUploadRequest(chunk=c) for c in chunks],
        rest=64,
    )
    error = await _refused_early(stub, upload)
    assert "20000x20000 pixels" in (error.details() or "")


@pytest.mark.parametrize(
    ("header", "code", "why"),
    [
        (_header("colour", 2048 * MIB), "INVALID_ARGUMENT", "larger than max_upload_bytes"),
        (_header("colour", 0), "INVALID_ARGUMENT", "total_bytes 0; it must be > 0"),
        (_header("no_such_model", MIB), "NOT_FOUND", "'no_such_model' is not in the repository"),
        (_header("", MIB), "INVALID_ARGUMENT", "request names no model"),
        (
            _header("colour", MIB, encodings=[pb.MASK_ENCODING_PNG, pb.MASK_ENCODING_PNG]),
            "INVALID_ARGUMENT",
            "",
        ),
        (
            _header("colour", MIB, image=pb.Image(encoded=b"x")),
            "INVALID_ARGUMENT",
            "carries an image",
        ),
        (pb.SegmentUploadRequest(chunk=b"abc"), "INVALID_ARGUMENT", "must be its header"),
    ],
)
async def test_the_header_message_is_refused_before_any_chunk(stub, header, code, why):
    upload = GatedUpload([header], rest=1)
    error = await _refused_early(stub, upload)
    assert error.code().name == code
    assert why in (error.details() or "")


async def test_byte_counts_must_match_the_declared_size(stub):
    data = encode(quadrant_image())
    chunk = pb.SegmentUploadRequest(chunk=data)
    too_many = stub.SegmentUpload(iter([_header("colour", len(data) - 1), chunk]), timeout=WAIT_S)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await too_many
    assert "more than the" in (err.value.details() or "")
    too_few = stub.SegmentUpload(iter([_header("colour", len(data) + 1), chunk]), timeout=WAIT_S)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await too_few
    assert f"ended after {len(data)} of the {len(data) + 1} bytes" in (err.value.details() or "")
    twice = stub.SegmentUpload(
        iter([_header("colour", len(data)), _header("colour", len(data))]), timeout=WAIT_S
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await twice
    assert "is header, not a chunk" in (err.value.details() or "")
    none = stub.SegmentUpload(iter([]), timeout=WAIT_S)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await none
    assert "ended before its header" in (err.value.details() or "")


def held(server: Server) -> float:
    """segserve_upload_bytes_in_flight, as a scrape shows it."""
    value = server.core.metrics.registry.get_sample_value("segserve_upload_bytes_in_flight")
    return value or 0.0


async def test_uploads_in_flight_are_bounded_by_the_bytes_they_hold(repository):
    """max_upload_bytes_in_flight: a stalled upload holds the bytes it sent; the chunk that
    would take the total past the limit is refused RESOURCE_EXHAUSTED; a header alone holds
    nothing; when the stalled upload ends, its bytes are returned."""
    data = encode(_upscaled_quadrants(2))
    assert len(data) < MIB // 4
    settings = make_settings(
        repository, max_upload_bytes=2 * MIB, max_upload_bytes_in_flight=3 * MIB
    )
    server = Server(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.SegmentationStub(channel)
            sent = [
                pb.SegmentUploadRequest(chunk=data[:100]),
                pb.SegmentUploadRequest(chunk=bytes(2 * MIB - 200)),
            ]
            stalled = GatedUpload([_header("colour", 2 * MIB), *sent], rest=0)
            call = stub.SegmentUpload(stalled.__aiter__(), timeout=WAIT_S)
            declared_only = GatedUpload([_header("colour", 2 * MIB)], rest=0)
            idle = stub.SegmentUpload(declared_only.__aiter__(), timeout=WAIT_S)
            for _ in range(600):  # until the server has taken the stalled upload's bytes
                if held(server) >= 2 * MIB - 100:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the stalled upload's bytes were never counted")
            big = [_header("colour", 2 * MIB), pb.SegmentUploadRequest(chunk=data[:100])]
            big.append(pb.SegmentUploadRequest(chunk=bytes(MIB + MIB // 2)))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SegmentUpload(iter(big), timeout=WAIT_S)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_upload_bytes_in_flight 3145728: retry later" in (err.value.details() or "")
            small = [_header("colour", len(data)), pb.SegmentUploadRequest(chunk=data)]
            answer = await stub.SegmentUpload(iter(small), timeout=WAIT_S)  # fits beside them
            assert answer.width == 2 * W
            for pending in (call, idle):
                pending.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await pending
            stalled.gate.set()
            declared_only.gate.set()
            for _ in range(200):  # the cancelled uploads' bytes are returned
                if held(server) == 0:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the cancelled upload's bytes were never returned")
            fits = [*big[:2], pb.SegmentUploadRequest(chunk=bytes(2 * MIB - 100))]
            with pytest.raises(grpc.aio.AioRpcError) as err:  # room again: the PNG is refused
                await stub.SegmentUpload(iter(fits), timeout=WAIT_S)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop()


async def test_failed_uploads_return_their_bytes(stub, server):
    """Whatever ends an upload after its header (too many bytes, a corrupt image, an unknown
    model) returns what it held: the gauge is back at 0 after each."""
    data = encode(quadrant_image())
    calls = [
        [_header("colour", len(data) - 1), pb.SegmentUploadRequest(chunk=data)],
        [_header("colour", 200), pb.SegmentUploadRequest(chunk=b"\x89PNG\r\n\x1a\n" + bytes(192))],
        [_header("no_such_model", len(data)), pb.SegmentUploadRequest(chunk=data)],
    ]
    for messages in calls:
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.SegmentUpload(iter(messages), timeout=WAIT_S)
        assert held(server) == 0
    ok = [_header("colour", len(data)), pb.SegmentUploadRequest(chunk=data)]
    assert (await stub.SegmentUpload(iter(ok), timeout=WAIT_S)).width == W
    assert held(server) == 0


def test_the_upload_budget_holds_at_least_one_largest_upload(repository):
    with pytest.raises(
        ValueError, match="max_upload_bytes_in_flight 100 is below max_upload_bytes"
    ):
        make_settings(repository, max_upload_bytes=200, max_upload_bytes_in_flight=100)


def test_upload_checks_its_input(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        Upload.of(b"")
    with pytest.raises(ValueError, match="no such image file"):
        Upload.of(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="chunk_bytes 0"):
        Upload.of(b"abc", chunk_bytes=0)
    messages = list(Upload.of(b"abcdefg", chunk_bytes=3).requests(pb.SegmentRequest(model="m")))
    assert messages[0].header.total_bytes == 7 and not messages[0].header.request.HasField("image")
    assert [m.chunk for m in messages[1:]] == [b"abc", b"def", b"g"]


async def test_an_image_beyond_the_message_limit_goes_by_upload(repository, tmp_path, capsys):
    """The point of SegmentUpload: with a 1 MiB message limit, a 2 MB PNG is refused by
    Segment and segmented by SegmentUpload (library and CLI)."""
    rng = np.random.default_rng(15)
    noisy = np.clip(
        _upscaled_quadrants(20).astype(np.int16) + rng.integers(-50, 51, (H * 20, W * 20, 3)),
        0,
        255,
    ).astype(np.uint8)
    data = encode(noisy)
    assert len(data) > 1.5 * MIB
    path = tmp_path / "noisy.png"
    path.write_bytes(data)
    server = Server(make_settings(repository, max_receive_message_bytes=MIB))
    await server.start()
    try:
        small_target = f"127.0.0.1:{server.port}"
        async with AsyncSegserveClient(small_target, timeout_s=WAIT_S) as client:
            with pytest.raises(SegserveError) as err:
                await client.segment(data, "colour")
            assert err.value.code.name == "RESOURCE_EXHAUSTED"
            uploaded = await client.segment_large(path, "colour")
        assert uploaded.labels.shape == (H * 20, W * 20)
        assert {c.class_id for c in uploaded.classes} == {1, 2, 3, 4}
        argv = ["segment", str(path), "-m", "colour", "--upload", "--server", small_target]
        assert await asyncio.to_thread(client_main, [*argv, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["width"], report["height"]) == (W * 20, H * 20)
    finally:
        await server.stop(timeout_s=5)


# Memory ----------------------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _flat_regions(side: int) -> np.ndarray:
    """A cheap large RGB image: the colour model's four classes in flat regions."""
    image = np.empty((side, side, 3), dtype=np.uint8)
    image[: side // 2, : side // 2] = (255, 0, 0)
    image[: side // 2, side // 2 :] = (0, 255, 0)
    image[side // 2 :, : side // 2] = (0, 0, 255)
    image[side // 2 :, side // 2 :] = (255, 255, 255)
    return image


async def _upload_peak(repository: Path, data: bytes, side: int) -> tuple[int, Segmentation]:
    """The image uploaded (1 MiB chunks, output size MODEL) to a fresh `segserve serve`, after
    a small warm-up upload; returns the growth of the server's peak RSS over its RSS before the
    upload (VmHWM - VmRSS: an upper bound on what the upload needed, whatever the process had
    freed before) and the answer."""
    process, port, _ = await start_cli_server(
        repository,
        drain_timeout_s=5,
        extra_args=[
            "--max-image-pixels",
            str(side * side),  # the default 40M refuses the 20000x20000 ones
            "--max-image-side",
            str(max(side, 16384)),
        ],
    )
    try:
        async with AsyncSegserveClient(f"127.0.0.1:{port}", timeout_s=600) as client:
            await client.wait_until_ready(timeout_s=WAIT_S, model="colour")
            await client.segment_large(encode(_upscaled_quadrants(4)), "colour")
            before_kib = _status_kib(process.pid, "VmRSS")
            result = await client.segment_large(data, "colour", output_size="model")
            peak = (_status_kib(process.pid, "VmHWM") - before_kib) * 1024
        return peak, result
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 30)


def _assert_quadrants(result: Segmentation) -> None:
    labels = result.labels
    assert labels.shape == (H, W)
    assert (labels[0, 0], labels[0, -1], labels[-1, 0], labels[-1, -1]) == (1, 2, 3, 4)


def _budget_bytes(total_bytes: int, decoded_bytes: int) -> int:
    """docs/imaging.md: the encoded bytes once + one decoded copy + 64 MiB (model tensors,
    messages in flight, thread and allocator slack)."""
    return total_bytes + decoded_bytes + 64 * MIB


async def test_memory_of_a_6000_pixel_upload(repository):
    """The budget at a size the quick suite affords (36 Mpx, under the default pixel limit)."""
    side = 6000
    image = _flat_regions(side)
    png = encode(image, ".png")
    peak, result = await _upload_peak(repository, png, side)
    _assert_quadrants(result)
    # The PNG decodes at 1/8 (reduced_scale): the one full-size copy is OpenCV's own.
    assert peak <= _budget_bytes(len(png), 3 * side * side), peak
    assert peak < 2 * 3 * side * side, peak  # never two decoded copies


@pytest.mark.slow
async def test_memory_of_a_20000_pixel_upload(repository, camvid_frame, capsys):
    """Issue 15: a 20000x20000 image does not need several copies of itself. The server runs
    with max_image_pixels 400M and max_image_side 20000 (the defaults, 40M and 16384, refuse
    it before a byte is kept). Measured: a flat-region PNG and a JPEG of an upscaled CamVid
    frame (a real scene), each uploaded in 1 MiB chunks."""
    side = 20_000
    image = _flat_regions(side)
    png = encode(image, ".png")
    del image
    frame = cv2.imdecode(np.frombuffer(camvid_frame, np.uint8), cv2.IMREAD_COLOR_RGB)
    assert frame is not None
    scene = cv2.resize(frame, (side, side), interpolation=cv2.INTER_LINEAR)
    jpeg = simplejpeg.encode_jpeg(scene, quality=85)
    del scene
    png_peak, result = await _upload_peak(repository, png, side)
    _assert_quadrants(result)
    jpeg_peak, scene_result = await _upload_peak(repository, jpeg, side)
    assert len({c.class_id for c in scene_result.classes}) >= 2  # a real scene
    one_copy = 3 * side * side  # 1.2 GB
    assert png_peak <= _budget_bytes(len(png), one_copy), png_peak
    # JPEG: DCT-scaled to 1/8 (2500x2500): the encoded bytes and a 19 MB decode.
    assert jpeg_peak <= _budget_bytes(len(jpeg), one_copy // 64), jpeg_peak
    with capsys.disabled():
        print(
            f"\n20000x20000 upload peaks: PNG {len(png) / MIB:.1f} MiB encoded -> "
            f"{png_peak / MIB:.0f} MiB; JPEG {len(jpeg) / MIB:.1f} MiB encoded -> "
            f"{jpeg_peak / MIB:.0f} MiB (one decoded RGB copy: {one_copy / MIB:.0f} MiB)"
        )


def test_a_stalled_upload_holds_only_what_it_sent():
    """Declaring 1 GiB and sending a 33-byte PNG header holds 33 bytes, not a 1 GiB buffer."""
    from segserve_server.adapters.upload_v1 import UploadBuffer
    from segserve_server.pipeline.decode import ImageLimits

    upload = UploadBuffer(1024 * MIB, 2048 * MIB, ImageLimits(40_000_000, 16384))
    upload.add(_png_header(64, 48))
    assert upload.buffered_bytes == 33
    assert upload.size == (64, 48)
