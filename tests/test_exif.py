"""EXIF orientation: the parser, the eight transforms, and masks in display orientation end to end.

The JPEGs are real: encoded by OpenCV from an asymmetric image (four colours, non-square), with
an APP1 "Exif" segment written here and inserted after SOI. The reference for "display
orientation" is the EXIF spec's own definition of each value, written out as index formulas.
"""

from __future__ import annotations

import struct
import time

import cv2
import numpy as np
import pytest
import simplejpeg
import tritonclient.grpc as tg
from tritonclient.grpc import aio as ta

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_client.masks import decode_srle
from segserve_server.core.tensor_types import image_options
from segserve_server.errors import InvalidArgument
from segserve_server.pipeline.decode import (
    ImageLimits,
    apply_orientation,
    decode,
    exif_orientation,
    tiff_orientation,
)
from segserve_server.server import Server
from tests.conftest import encode, quadrant_image

LIMITS = ImageLimits(max_pixels=40_000_000, max_side=16384)
ORIENTATIONS = range(1, 9)


def tiff(orientation: int, *, endian: str = "<", count: int | None = None, kind: int = 3) -> bytes:
    """A TIFF block with IFD0 holding one entry: Orientation (SHORT) = orientation."""
    mark = b"II*\x00" if endian == "<" else b"MM\x00*"
    entries = 1 if count is None else count
    value = struct.pack(endian + "H", orientation) + b"\x00\x00"
    entry = struct.pack(endian + "HHI", 0x0112, kind, 1) + value
    return (
        mark + struct.pack(endian + "I", 8) + struct.pack(endian + "H", entries) + entry + b"\0" * 4
    )


def app1(payload: bytes) -> bytes:
    body = b"Exif\x00\x00" + payload
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def with_segment(jpeg: bytes, segment: bytes) -> bytes:
    """The JPEG with `segment` inserted right after SOI."""
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + segment + jpeg[2:]


def with_exif(jpeg: bytes, orientation: int, endian: str = "<") -> bytes:
    return with_segment(jpeg, app1(tiff(orientation, endian=endian)))


def display(stored: np.ndarray, orientation: int) -> np.ndarray:
    """The stored image as EXIF `orientation` says to display it (the spec, index by index)."""
    h, w = stored.shape[:2]
    if orientation >= 5:
        r, c = np.indices((w, h))
    else:
        r, c = np.indices((h, w))
    source = {
        1: (r, c),
        2: (r, w - 1 - c),
        3: (h - 1 - r, w - 1 - c),
        4: (h - 1 - r, c),
        5: (c, r),
        6: (h - 1 - c, r),  # rotate 90 clockwise: the left column becomes the top row
        7: (h - 1 - c, w - 1 - r),
        8: (c, w - 1 - r),  # rotate 90 counter-clockwise: the right column becomes the top row
    }[orientation]
    return stored[source]


def stored_image(height: int = 48, width: int = 96) -> np.ndarray:
    """Four colours in four corners, wider than high: each orientation looks different."""
    return cv2.resize(quadrant_image(), (width, height), interpolation=cv2.INTER_NEAREST)


JPEG = encode(stored_image(), ".jpg")


# The parser ------------------------------------------------------------------------------------


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_parser_reads_every_orientation_in_both_byte_orders(orientation: int, endian: str) -> None:
    assert tiff_orientation(tiff(orientation, endian=endian)) == orientation
    assert exif_orientation(with_exif(JPEG, orientation, endian), "JPEG") == orientation


def test_parser_finds_exif_after_other_segments() -> None:
    # OpenCV writes APP0 JFIF first; put APP1 after it, behind an APP2 as well.
    soi, rest = JPEG[:2], JPEG[2:]
    assert rest[:2] == b"\xff\xe0"
    app0_end = 2 + ((rest[2] << 8) | rest[3])
    app2 = b"\xff\xe2\x00\x06ICC\x00"
    data = soi + rest[:app0_end] + app2 + app1(tiff(6)) + rest[app0_end:]
    assert exif_orientation(data, "JPEG") == 6


def test_no_exif_is_orientation_1() -> None:
    assert exif_orientation(JPEG, "JPEG") == 1
    assert exif_orientation(encode(stored_image()), "PNG") == 1
    assert exif_orientation(b"BM" + b"\0" * 40, "BMP") == 1


@pytest.mark.parametrize(
    "payload",
    [
        tiff(0),  # out of range
        tiff(9),
        tiff(0xFFFF),
        tiff(6, kind=4),  # LONG, not SHORT
        b"XX*\x00" + tiff(6)[4:],  # no byte order mark
        b"II*\x00\xff\xff\xff\xff",  # IFD0 far outside
        b"II*\x00\x02\x00\x00\x00",  # IFD0 inside the header
        b"",
        b"II",
    ],
)
def test_malformed_exif_is_orientation_1(payload: bytes) -> None:
    assert tiff_orientation(payload) == 1
    assert exif_orientation(with_segment(JPEG, app1(payload)), "JPEG") == 1


def test_every_truncation_of_the_exif_is_harmless() -> None:
    data = with_exif(JPEG, 6)
    segment_end = 2 + 2 + len(app1(tiff(6))) - 2
    for end in range(segment_end + 1):
        assert exif_orientation(data[:end], "JPEG") in (1, 6)
    block = tiff(6)
    for end in range(len(block) - 4):  # the entry ends 4 bytes before (next-IFD offset)
        assert tiff_orientation(block[:end]) == 1
    # A segment length running past the end of the data, and one below 2.
    assert (
        exif_orientation(with_segment(JPEG, b"\xff\xe1\xff\xff" + b"Exif\x00\x00II"), "JPEG") == 1
    )
    assert exif_orientation(with_segment(JPEG, b"\xff\xe1\x00\x01"), "JPEG") == 1


def test_a_huge_bogus_ifd_count_is_bounded() -> None:
    block = tiff(6, count=0xFFFF)  # the entry is there, and 65534 are not
    assert tiff_orientation(block) == 6
    padded = tiff(1, count=0xFFFF)[:8] + b"\xff\xff" + b"\0" * 60_000  # 5000 zero entries
    started = time.perf_counter()
    assert tiff_orientation(padded) == 1
    assert exif_orientation(with_segment(JPEG, app1(padded)), "JPEG") == 1
    assert time.perf_counter() - started < 0.5


def test_random_bytes_never_raise() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        junk = rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
        assert 1 <= tiff_orientation(b"II*\x00\x08\x00\x00\x00" + junk) <= 8
        assert 1 <= exif_orientation(b"\xff\xd8" + junk, "JPEG") <= 8


# The transforms -------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_transforms_follow_the_spec(orientation: int) -> None:
    stored = stored_image(6, 10)
    out = apply_orientation(stored, orientation)
    np.testing.assert_array_equal(out, display(stored, orientation))
    assert out.flags.c_contiguous
    grey = stored[..., 0]
    np.testing.assert_array_equal(apply_orientation(grey, orientation), display(grey, orientation))


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_decode_agrees_with_opencv(orientation: int) -> None:
    """OpenCV applies EXIF orientation itself when decoding: an independent reference."""
    data = with_exif(JPEG, orientation)
    decoded = decode(data, LIMITS)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None
    opencv = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    assert decoded.pixels.shape == opencv.shape
    assert np.abs(decoded.pixels.astype(int) - opencv).max() <= 2  # IDCT rounding at most
    swapped = orientation >= 5
    assert (decoded.original_width, decoded.original_height) == ((48, 96) if swapped else (96, 48))
    ignored = decode(data, LIMITS, ignore_exif_orientation=True)
    assert (ignored.original_width, ignored.original_height) == (96, 48)
    np.testing.assert_array_equal(decoded.pixels, display(ignored.pixels, orientation))


@pytest.mark.parametrize("orientation", [6, 8])
def test_dct_scale_covers_the_model_input_in_display_orientation(orientation: int) -> None:
    data = with_exif(encode(stored_image(480, 960), ".jpg"), orientation)
    decoded = decode(data, LIMITS, min_size=(64, 48))
    # Stored 960x480; displayed 480x960. 1/8 would be 60 wide displayed, under the model's 64:
    # the decoder takes 1/4 (stored 240x120) and the pixels come out displayed, 120x240.
    assert decoded.pixels.shape == (240, 120, 3)
    assert (decoded.original_width, decoded.original_height) == (480, 960)
    stored = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=240, min_height=120)
    assert stored.shape == (120, 240, 3)
    np.testing.assert_array_equal(decoded.pixels, display(stored, orientation))


def test_png_and_webp_exif_are_applied() -> None:
    png = encode(stored_image())
    chunk = b"eXIf" + tiff(6)
    exif_chunk = struct.pack(">I", len(chunk) - 4) + chunk + struct.pack(">I", 0)  # CRC unchecked
    ihdr_end = 8 + 25
    png6 = png[:ihdr_end] + exif_chunk + png[ihdr_end:]
    assert exif_orientation(png6, "PNG") == 6
    assert decode(png6, LIMITS).pixels.shape == (96, 48, 3)
    np.testing.assert_array_equal(decode(png6, LIMITS).pixels, display(stored_image(), 6))
    assert decode(png6, LIMITS, ignore_exif_orientation=True).pixels.shape == (48, 96, 3)

    payload = tiff(8)
    exif = b"EXIF" + struct.pack("<I", len(payload)) + payload
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x08, 0, 0, 0]) + (95).to_bytes(3, "little")
    vp8x += (47).to_bytes(3, "little")
    webp = encode(stored_image(), ".webp", quality=100)
    body = b"WEBP" + vp8x + webp[12:] + exif
    webp8 = b"RIFF" + struct.pack("<I", len(body)) + body
    assert exif_orientation(webp8, "WebP") == 8
    assert exif_orientation(webp, "WebP") == 1


def test_kserve_image_parameter() -> None:
    assert image_options({})[3] is False
    assert image_options({"ignore_exif_orientation": True})[3] is True
    with pytest.raises(InvalidArgument, match="ignore_exif_orientation"):
        image_options({"ignore_exif_orientation": "yes"})


# End to end ----------------------------------------------------------------------------------


async def segment(
    stub: pb_grpc.SegmentationStub, data: bytes, *, ignore: bool = False
) -> tuple[tuple[int, int], np.ndarray]:
    response = await stub.Segment(
        pb.SegmentRequest(
            model="colour", image=pb.Image(encoded=data), ignore_exif_orientation=ignore
        )
    )
    labels = decode_srle(response.masks[0].data)
    assert labels.shape == (response.height, response.width)
    return (response.width, response.height), labels


@pytest.mark.parametrize("orientation", ORIENTATIONS)
async def test_mask_is_in_display_orientation(
    stub: pb_grpc.SegmentationStub, orientation: int
) -> None:
    data = with_exif(JPEG, orientation)
    size, labels = await segment(stub, data)
    assert size == ((48, 96) if orientation >= 5 else (96, 48))
    # The same pixels rotated into display orientation here, sent losslessly without EXIF.
    pixels = simplejpeg.decode_jpeg(JPEG, colorspace="RGB")
    rotated = encode(np.ascontiguousarray(display(pixels, orientation)))
    reference_size, reference = await segment(stub, rotated)
    assert reference_size == size
    np.testing.assert_array_equal(labels, reference)
    assert len(np.unique(labels)) == 4


@pytest.mark.parametrize("orientation", [3, 6, 7])
async def test_ignore_exif_orientation_gives_the_stored_orientation(
    stub: pb_grpc.SegmentationStub, orientation: int
) -> None:
    size, labels = await segment(stub, with_exif(JPEG, orientation), ignore=True)
    plain_size, plain = await segment(stub, JPEG)
    assert size == plain_size == (96, 48)
    np.testing.assert_array_equal(labels, plain)


@pytest.mark.parametrize(
    "segment_bytes",
    [
        app1(tiff(6)[:9]),  # truncated inside IFD0
        app1(tiff(6, count=0xFFFF)[:10]),  # a huge count and no entries
        app1(b"MM\x00*\xff\xff\xff\xf0"),  # IFD0 offset past the end
        app1(tiff(42)),  # a value that is no orientation
        b"\xff\xe1\x00\x08Exif\x00\x00",  # an empty TIFF block
    ],
)
async def test_malformed_exif_is_ignored_end_to_end(
    stub: pb_grpc.SegmentationStub, segment_bytes: bytes
) -> None:
    size, labels = await segment(stub, with_segment(JPEG, segment_bytes))
    plain_size, plain = await segment(stub, JPEG)
    assert size == plain_size
    np.testing.assert_array_equal(labels, plain)


@pytest.mark.parametrize("orientation", [5, 6, 8])
async def test_orientation_applies_with_dct_scaling(
    stub: pb_grpc.SegmentationStub, orientation: int
) -> None:
    stored = stored_image(480, 960)  # far larger than the 64x48 model input: decoded at 1/4
    size, labels = await segment(stub, with_exif(encode(stored, ".jpg"), orientation))
    assert size == (480, 960)
    expected = display(stored_image(4, 4), orientation)  # the class of each display quadrant
    classes = {(255, 0, 0): 1, (0, 255, 0): 2, (0, 0, 255): 3, (255, 255, 255): 4}
    for qr, y in enumerate((240, 720)):
        for qc, x in enumerate((120, 360)):
            r, g, b = (int(v) for v in expected[2 * qr, 2 * qc])
            colour = (r, g, b)
            assert labels[y, x] == classes[colour], (y, x)


@pytest.mark.parametrize("ignore", [False, True])
async def test_kserve_image_route_applies_orientation(server: Server, ignore: bool) -> None:
    images = np.empty(1, dtype=np.object_)
    images[:] = [with_exif(JPEG, 6)]
    tensor = tg.InferInput("IMAGE_BYTES", [1], "BYTES")
    tensor.set_data_from_numpy(images)
    parameters = {"ignore_exif_orientation": True} if ignore else {}
    async with ta.InferenceServerClient(f"127.0.0.1:{server.kserve_port}") as client:
        result = await client.infer("colour.image", [tensor], parameters=parameters)
    shape = result.as_numpy("MASK_SHAPE")
    assert shape is not None
    assert tuple(shape[0]) == ((48, 96) if ignore else (96, 48))  # height, width
