"""The bad-input corpus: one table of input kinds, each with its precise outcome, sent over real
gRPC to a real server on both ports where the kind applies (segserve.v1 Segment and the KServe
`<model>.image` ModelInfer) and through one stream of each.

Every input is generated here (Pillow, numpy, struct): no binary files. Valid but unusual images
(CMYK, progressive, 16-bit, palette, alpha, EXIF rotations, 1x1, 1xN, ...) must answer OK with a
mask of their displayed size; invalid ones get their status code and a bounded message naming
the problem. Kinds test_bad_input.py, test_bounded_messages.py and test_exif.py already cover
(half a JPEG or PNG, absurd PNG sides, short raw buffers, repeated encodings, EXIF on JPEG) are
not repeated. After the corpus the server still serves a good image.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from tritonclient.grpc import service_pb2 as kserve
from tritonclient.grpc import service_pb2_grpc as kserve_grpc

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_client.masks import decode_srle
from segserve_server.errors import MAX_MESSAGE_CHARS
from segserve_server.server import Server
from tests.conftest import H, W, encode, make_settings, quadrant_image

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
LIMIT = MAX_MESSAGE_CHARS + 100  # a bounded message and its "left out" note
MIB = 1024 * 1024
QUADRANT = quadrant_image()
DISPLAY = (W, H)  # (width, height) of a mask of QUADRANT
TURNED = (H, W)  # ... of QUADRANT stored with an EXIF orientation of 5..8


# Image builders ---------------------------------------------------------------------------------


def pil(mode: str, fmt: str, rgb: np.ndarray = QUADRANT, **options: object) -> bytes:
    """QUADRANT (or rgb) in a Pillow mode and format."""
    image = Image.fromarray(rgb)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def animated(fmt: str) -> bytes:
    frames = [Image.fromarray(QUADRANT), Image.fromarray(QUADRANT[::-1].copy())]
    out = io.BytesIO()
    frames[0].save(out, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return out.getvalue()


def exif(orientation: int) -> bytes:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags.tobytes()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_ihdr(width: int, height: int, *, crc_ok: bool = True) -> bytes:
    """A PNG of just a header claiming width x height, and an IDAT of a few zero rows."""
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if not crc_ok:
        ihdr = ihdr[:-4] + bytes(4)
    idat = png_chunk(b"IDAT", zlib.compress(bytes(64)))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + png_chunk(b"IEND", b"")


def png_length_bomb() -> bytes:
    """A 2 KB PNG whose IDAT chunk claims 4 GB (a fuzz finding: OpenCV allocated
    and scanned for it, holding a decode thread for 30 s, before the chunk walk refused it)."""
    data = bytearray(pil("RGB", "PNG", rgb=noise(3, 24, 32)))
    assert data[37:41] == b"IDAT"
    data[33:37] = struct.pack(">I", 0xFF0000C5)
    return bytes(data)


def jpeg_sof(width: int, height: int) -> bytes:
    """A real baseline JPEG whose SOF0 header is rewritten to claim width x height."""
    data = bytearray(pil("RGB", "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def jpeg_corrupt_scan() -> bytes:
    """A real JPEG with its entropy-coded data overwritten (markers intact)."""
    data = bytearray(pil("RGB", "JPEG", rgb=noise(7)))
    start = data.index(b"\xff\xda") + 20
    for i in range(start, len(data) - 2, 7):
        if data[i] != 0xFF and data[i - 1] != 0xFF:
            data[i] = 0xFF if data[i + 1] != 0x00 else 0x55
    return bytes(data)


def noise(seed: int, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def webp_vp8x(width: int, height: int) -> bytes:
    """An extended-format WebP header claiming a width x height canvas, nothing else."""
    vp8x = (
        struct.pack("<I", 0)
        + (width - 1).to_bytes(3, "little")
        + (height - 1).to_bytes(3, "little")
    )
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_vp8l(width: int, height: int) -> bytes:
    """A lossless WebP header claiming width x height (14 bits each), no image stream."""
    bits = (width - 1) | ((height - 1) << 14)
    vp8l = b"\x2f" + struct.pack("<I", bits) + bytes(16)
    body = b"WEBP" + b"VP8L" + struct.pack("<I", len(vp8l)) + vp8l
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_vp8(width: int, height: int) -> bytes:
    """A real lossy WebP whose VP8 frame header is rewritten to claim width x height."""
    data = bytearray(pil("RGB", "WEBP"))
    assert data[12:16] == b"VP8 " and data[23:26] == b"\x9d\x01\x2a"
    data[26:30] = struct.pack("<HH", width, height)
    return bytes(data)


def bmp_info(width: int, height: int, bits: int = 24, body: bytes = b"") -> bytes:
    """A BMP with a 40-byte BITMAPINFOHEADER claiming width x height (signed, as BMP has it)."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, len(body), 0, 0, 0, 0)
    offset = 14 + len(info)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + body


def bmp_core(width: int, height: int, body: bytes = b"") -> bytes:
    """A BMP with the 12-byte OS/2 BITMAPCOREHEADER (16-bit sides)."""
    core = struct.pack("<IHHHH", 12, width, height, 1, 24)
    offset = 14 + len(core)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + core + body


def bmp_top_down() -> bytes:
    """QUADRANT as a 24-bit BMP stored top-down (negative height), as cameras write it."""
    rows = np.ascontiguousarray(QUADRANT[:, :, ::-1]).tobytes()  # BGR, W * 3 is 4-aligned
    return bmp_info(W, -H, body=rows)


def bmp_core_quadrant() -> bytes:
    rows = np.ascontiguousarray(QUADRANT[::-1, :, ::-1]).tobytes()  # bottom-up BGR
    return bmp_core(W, H, rows)


# The corpus -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One kind of input: what to send, the status it gets, and for errors a fragment of the
    message naming the problem, for OK the (width, height) of the mask."""

    kind: str
    build: Callable[[], Any]
    code: grpc.StatusCode
    fragment: str = ""
    size: tuple[int, int] | None = None

    def __str__(self) -> str:
        return self.kind


def ok(kind: str, build: Callable[[], Any], size: tuple[int, int] = DISPLAY) -> Case:
    return Case(kind, build, OK, size=size)


def bad(kind: str, build: Callable[[], Any], fragment: str, code=INVALID) -> Case:
    return Case(kind, build, code, fragment)


# Encoded images: sent on both ports and in a stream of each.
IMAGES = [
    ok("jpeg-cmyk", lambda: pil("CMYK", "JPEG", quality=95)),
    ok("jpeg-progressive", lambda: pil("RGB", "JPEG", progressive=True)),
    ok("jpeg-grayscale", lambda: pil("L", "JPEG")),
    ok("jpeg-444", lambda: pil("RGB", "JPEG", subsampling=0)),
    ok("png-16bit", lambda: pil("I;16", "PNG")),
    ok("png-palette", lambda: pil("P", "PNG")),
    ok("png-alpha", lambda: pil("RGBA", "PNG")),
    ok("png-gray-alpha", lambda: pil("LA", "PNG")),
    ok("png-1bit", lambda: pil("1", "PNG")),
    ok("png-exif-rotate-270", lambda: pil("RGB", "PNG", exif=exif(8)), TURNED),
    ok("png-animated-first-frame", lambda: animated("PNG")),
    ok("png-1x1", lambda: pil("RGB", "PNG", rgb=QUADRANT[:1, :1].copy()), (1, 1)),
    ok("png-1xN", lambda: pil("RGB", "PNG", rgb=noise(1, 300, 1)), (1, 300)),
    ok("jpeg-Nx1", lambda: pil("RGB", "JPEG", rgb=noise(2, 1, 300)), (300, 1)),
    ok("webp-alpha", lambda: pil("RGBA", "WEBP")),
    ok("webp-lossless", lambda: pil("RGB", "WEBP", lossless=True)),
    ok("webp-exif-transpose", lambda: pil("RGB", "WEBP", exif=exif(5)), TURNED),
    ok("webp-animated-first-frame", lambda: animated("WEBP")),
    ok("bmp-palette", lambda: pil("P", "BMP")),
    ok("bmp-1bit", lambda: pil("1", "BMP")),
    ok("bmp-top-down", bmp_top_down),
    ok("bmp-os2-core-header", bmp_core_quadrant),
    bad("empty", lambda: b"", "empty (0 bytes)"),
    bad("magic-gif", lambda: b"GIF89a" + bytes(40), "first bytes 474946383961"),
    bad("magic-tiff", lambda: b"II*\x00" + bytes(40), "unrecognised image format"),
    bad("magic-riff-not-webp", lambda: b"RIFF\x10\x00\x00\x00WAVEfmt " + bytes(24), "unrecognised"),
    bad("jpeg-soi-eoi-only", lambda: b"\xff\xd8\xff\xd9", "JPEG header is corrupt or truncated"),
    bad("jpeg-corrupt-scan", jpeg_corrupt_scan, "JPEG does not decode"),
    bad("png-ihdr-crc", lambda: png_ihdr(W, H, crc_ok=False), "PNG image does not decode"),
    bad("webp-truncated-header", lambda: pil("RGB", "WEBP")[:24], "WebP is truncated"),
    bad("webp-truncated-data", lambda: pil("RGB", "WEBP")[:-40], "WebP image does not decode"),
    bad("webp-zero-width", lambda: webp_vp8(0, H), "empty size 0x48"),
    bad("bmp-truncated-header", lambda: pil("RGB", "BMP")[:20], "BMP is truncated"),
    bad("bmp-truncated-data", lambda: pil("RGB", "BMP")[:200], "BMP image does not decode"),
    bad("bmp-zero-height", lambda: bmp_info(W, 0), "empty size 64x0"),
    # Header bombs: a few bytes claiming a huge image, refused from the header, never decoded.
    bad("bomb-jpeg-sof", lambda: jpeg_sof(65_500, 65_500), "65500x65500 pixels; the largest side"),
    bad("bomb-jpeg-pixels", lambda: jpeg_sof(16_000, 16_000), "256000000 pixels; the limit"),
    bad("bomb-png-pixels", lambda: png_ihdr(16_384, 16_384), "268435456 pixels; the limit"),
    bad("bomb-png-2^31", lambda: png_ihdr(2**31 - 1, 1), "2147483647x1"),
    bad("bomb-png-chunk-length", png_length_bomb, "chunk 'IDAT' at byte 33 says 4278190277 bytes"),
    bad("bomb-png-in-limits", lambda: png_ihdr(6_000, 6_000), "PNG image does not decode"),
    bad("bomb-webp-vp8x", lambda: webp_vp8x(2**24, 2**24), "16777216x16777216"),
    bad("bomb-webp-vp8l", lambda: webp_vp8l(16_384, 16_384), "268435456 pixels"),
    bad("bomb-webp-vp8", lambda: webp_vp8(16_383, 16_383), "16383x16383"),
    bad("bomb-bmp-int32-max", lambda: bmp_info(2**31 - 1, 1), "2147483647x1"),
    bad("bomb-bmp-int32-min", lambda: bmp_info(1, -(2**31)), "1x2147483648"),
    bad("bomb-bmp-os2", lambda: bmp_core(65_535, 65_535), "65535x65535"),
    bad("bomb-bmp-in-limits", lambda: bmp_info(6_000, 6_000), "BMP image does not decode"),
]


def request(image: pb.Image | None = None, model: str = "colour", **fields) -> pb.SegmentRequest:
    message = pb.SegmentRequest(model=model, **fields)
    message.image.CopyFrom(image or pb.Image(encoded=encode(QUADRANT)))
    return message


def raw(width: int, height: int, pixel_format: Any = pb.PIXEL_FORMAT_RGB8, size: int = 0):
    """A raw image (any pixel format value: proto3 enums are open)."""
    return pb.Image(
        raw=pb.RawImage(pixels=bytes(size), width=width, height=height, format=pixel_format)
    )


# segserve.v1 requests: raw sizes that overflow, unknown enum values, out-of-range fields.
REQUESTS = [
    bad(
        "raw-side-2^16",
        lambda: request(raw(65_536, 65_536)),
        "65536x65536 pixels; the largest side",
    ),
    bad("raw-uint32-max", lambda: request(raw(2**32 - 1, 2**32 - 1)), "4294967295x4294967295"),
    bad("raw-times-3-wraps-2^32", lambda: request(raw(1_431_655_766, 1, size=2)), "1431655766x1"),
    bad(
        "raw-pixel-limit",
        lambda: request(raw(16_384, 16_384, pb.PIXEL_FORMAT_GRAY8)),
        "268435456 pixels",
    ),
    bad("raw-unknown-pixel-format", lambda: request(raw(W, H, 99, W * H * 3)), "pixel format 99"),
    ok("raw-1x1", lambda: request(raw(1, 1, size=3)), (1, 1)),
    ok("raw-gray-1xN", lambda: request(raw(1, 500, pb.PIXEL_FORMAT_GRAY8, 500)), (1, 500)),
    bad("unknown-output-size", lambda: request(output_size=7), "output size 7"),
    bad("unknown-annotation-format", lambda: request(annotations=[9]), "annotation format 9"),
    bad("negative-mask-encoding", lambda: request(encodings=[-1]), "mask encoding -1"),
    bad(
        "negative-model-version", lambda: request(model_version=-1), "model_version -1 is negative"
    ),
    bad(
        "huge-model-version",
        lambda: request(model_version=2**63 - 1),
        "9223372036854775807",
        NOT_FOUND,
    ),
    bad("model-name-nul", lambda: request(model="colour\x00"), "'colour\\x00'", NOT_FOUND),
    bad(
        "polygon-tolerance-nan",
        lambda: request(
            annotations=[pb.ANNOTATION_FORMAT_POLYGONS], polygon_tolerance_px=float("nan")
        ),
        "polygon_tolerance_px nan",
    ),
    bad(
        "confidence-threshold-2",
        lambda: request(model="colour_logits", include_confidence=True, confidence_threshold=2.0),
        "confidence_threshold 2.0",
    ),
    ok("priority-uint32-max", lambda: request(priority=2**32 - 1)),  # a level it lacks: default
    ok("timeout-uint64-max", lambda: request(timeout_us=2**64 - 1)),  # no override: ignored
]


def infer(model: str = "colour", version: str = "", **parameters) -> kserve.ModelInferRequest:
    message = kserve.ModelInferRequest(model_name=model, model_version=version)
    for key, value in parameters.items():
        parameter = message.parameters[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            parameter.int64_param = value
        else:
            parameter.string_param = value
    return message


def tensor(shape, datatype: str = "FP32", contents: bytes = b"", name: str = "image", **kw):
    """A raw-tensor request for model colour (FP32 [-1, 3, H, W])."""
    message = infer(**kw)
    message.inputs.add(name=name, datatype=datatype, shape=list(shape))
    message.raw_input_contents.append(contents)
    return message


def prefixed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def images(
    contents: bytes, shape=(1,), datatype: str = "BYTES", model: str = "colour.image", **kw
) -> kserve.ModelInferRequest:
    """An image-route request (colour.image: IMAGE_BYTES, BYTES [-1])."""
    return tensor(shape, datatype, contents, "IMAGE_BYTES", model=model, **kw)


GOOD = prefixed(encode(QUADRANT))
X = np.zeros((1, 3, H, W), np.float32).tobytes()


def with_shared_memory() -> kserve.ModelInferRequest:
    message = images(GOOD)
    message.inputs[0].parameters["shared_memory_region"].string_param = "region0"
    return message


def with_classification() -> kserve.ModelInferRequest:
    message = images(GOOD)
    message.outputs.add(name="MASK_BYTES").parameters["classification"].int64_param = 3
    return message


def with_two_contents() -> kserve.ModelInferRequest:
    message = images(GOOD)
    message.raw_input_contents.append(GOOD)
    return message


# KServe requests: wrong datatypes / shapes of raw tensors, BYTES framing, parameters, versions.
KSERVE = [
    bad(
        "kserve-shape-overflows-int64",
        lambda: tensor([2**62, 3, H, W]),
        "needs 170005193383307227693056",
    ),
    bad("kserve-negative-batch", lambda: tensor([-5, 3, H, W]), "negative dim in [-5, 3, 48, 64]"),
    bad("kserve-int64-min-batch", lambda: tensor([-(2**63), 3, H, W]), "negative dim"),
    bad("kserve-wrong-rank", lambda: tensor([3, H, W], contents=X), "shape [3, 48, 64]"),
    bad("kserve-unknown-datatype", lambda: tensor([1, 3, H, W], "FP8", X), "datatype FP8"),
    bad(
        "kserve-bytes-for-fp32",
        lambda: tensor([1, 3, H, W], "BYTES", X),
        "datatype BYTES; the model takes FP32",
    ),
    bad(
        "kserve-raw-short",
        lambda: tensor([1, 3, H, W], contents=X[:-1]),
        "36863 bytes of raw contents",
    ),
    bad("kserve-empty-batch", lambda: tensor([0, 3, H, W]), "has an empty batch (shape [0, 3"),
    bad(
        "kserve-image-uint8",
        lambda: images(GOOD, datatype="UINT8"),
        "datatype UINT8; the model takes BYTES",
    ),
    bad("kserve-image-2d", lambda: images(GOOD, shape=(1, 1)), "shape [1, 1]"),
    bad(
        "kserve-bytes-prefix-too-long",
        lambda: images(struct.pack("<I", 1000) + b"abc"),
        "says 1000 bytes but 3 remain",
    ),
    bad("kserve-bytes-prefix-cut", lambda: images(b"\x01\x00"), "end inside a length prefix"),
    bad(
        "kserve-bytes-count",
        lambda: images(GOOD, shape=(2,)),
        "holds 1 BYTES elements; its shape needs 2",
    ),
    bad(
        "kserve-two-raw-contents",
        with_two_contents,
        "raw_input_contents has 2 entries for 1 inputs",
    ),
    bad(
        "kserve-version-superscript",
        lambda: images(GOOD, version="²"),
        "model version '²' is not a version number",
    ),
    bad("kserve-version-fullwidth", lambda: images(GOOD, version="１"), "is not a version number"),
    bad("kserve-priority-negative", lambda: images(GOOD, priority=-1), "parameter priority = -1"),
    bad("kserve-mask-encoding-int", lambda: images(GOOD, mask_encoding=3), "mask_encoding = 3"),
    bad("kserve-shared-memory", with_shared_memory, "shared memory region"),
    bad("kserve-classification", with_classification, "classification"),
    bad("kserve-no-model", lambda: images(GOOD, model=""), "names no model"),
]


# Checks -----------------------------------------------------------------------------------------


def check_error(case: Case, code: grpc.StatusCode, message: str) -> None:
    assert code == case.code, f"{case.kind}: {code.name}: {message}"
    assert case.fragment in message, f"{case.kind}: {message!r}"
    assert len(message) < LIMIT, f"{case.kind}: {len(message)} characters"


def check_v1_answer(case: Case, response: pb.SegmentResponse) -> None:
    assert case.code == OK, f"{case.kind}: answered OK, expected {case.code.name}"
    assert (response.width, response.height) == case.size, case.kind
    mask = decode_srle(response.masks[0].data)
    assert (mask.shape[1], mask.shape[0]) == case.size, case.kind


def outputs(response: kserve.ModelInferResponse) -> dict[str, bytes]:
    return {o.name: response.raw_output_contents[i] for i, o in enumerate(response.outputs)}


def check_kserve_answer(case: Case, response: kserve.ModelInferResponse) -> None:
    assert case.code == OK, f"{case.kind}: answered OK, expected {case.code.name}"
    out = outputs(response)
    height, width = np.frombuffer(out["MASK_SHAPE"], np.int32)
    assert (width, height) == case.size, case.kind
    (length,) = struct.unpack_from("<I", out["MASK_BYTES"])
    mask = decode_srle(out["MASK_BYTES"][4 : 4 + length])
    assert (mask.shape[1], mask.shape[0]) == case.size, case.kind


@pytest.fixture(scope="module")
async def kserve_stub(server: Server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.kserve_port}") as channel:
        yield kserve_grpc.GRPCInferenceServiceStub(channel)


async def segment(stub, case: Case, message: pb.SegmentRequest) -> None:
    try:
        response = await stub.Segment(message, timeout=30)
    except grpc.aio.AioRpcError as err:
        check_error(case, err.code(), err.details() or "")
    else:
        check_v1_answer(case, response)


async def model_infer(kserve_stub, case: Case, message: kserve.ModelInferRequest) -> None:
    try:
        response = await kserve_stub.ModelInfer(message, timeout=30)
    except grpc.aio.AioRpcError as err:
        check_error(case, err.code(), err.details() or "")
    else:
        check_kserve_answer(case, response)


@pytest.mark.parametrize("case", IMAGES, ids=str)
async def test_image_on_the_segserve_port(stub, case):
    await segment(stub, case, request(pb.Image(encoded=case.build())))


@pytest.mark.parametrize("case", IMAGES, ids=str)
async def test_image_on_the_kserve_port(kserve_stub, case):
    """The image route names the image in its message: IMAGE_BYTES[0]."""
    await model_infer(kserve_stub, case, images(prefixed(case.build())))


async def test_images_in_a_segserve_stream(stub):
    """Every image kind as one frame of one stream: each answered in order, the stream goes on."""
    frames = [
        pb.SegmentStreamRequest(frame_id=i, request=request(pb.Image(encoded=case.build())))
        for i, case in enumerate(IMAGES, start=1)
    ]
    answers = [a async for a in stub.SegmentStream(iter(frames), timeout=60)]
    assert [a.frame_id for a in answers] == [f.frame_id for f in frames]
    for case, answer in zip(IMAGES, answers, strict=True):
        if answer.status == pb.FRAME_STATUS_OK:
            check_v1_answer(case, answer.response)
        else:
            assert answer.status == pb.FRAME_STATUS_ERROR, case.kind
            check_error(case, grpc.StatusCode(_code(answer.error.code)), answer.error.message)


def _code(number: int) -> tuple[int, str]:
    return next(c.value for c in grpc.StatusCode if c.value[0] == number)


async def test_images_in_a_kserve_stream(kserve_stub):
    messages = [images(prefixed(case.build())) for case in IMAGES]
    for i, message in enumerate(messages):
        message.id = str(i)
    answers = [a async for a in kserve_stub.ModelStreamInfer(iter(messages), timeout=60)]
    assert [a.infer_response.id for a in answers] == [m.id for m in messages]
    for case, answer in zip(IMAGES, answers, strict=True):
        if not answer.error_message:
            check_kserve_answer(case, answer.infer_response)
        else:
            name, _, message = answer.error_message.partition(": ")
            check_error(case, grpc.StatusCode[name], message)


@pytest.mark.parametrize("case", REQUESTS, ids=str)
async def test_segserve_request(stub, case):
    await segment(stub, case, case.build())


@pytest.mark.parametrize("case", KSERVE, ids=str)
async def test_kserve_request(kserve_stub, case):
    await model_infer(kserve_stub, case, case.build())


async def test_bad_stream_frames_are_answered_in_place(channel):
    """Unknown stream policies, bad options and bytes that are no frame at all each get their
    INVALID_ARGUMENT answer in order, and the frames after them are served."""
    good = request()
    unknown_policy: Any = 7
    negative_policy: Any = -3
    frames = [
        pb.SegmentStreamRequest(
            frame_id=1, policy=unknown_policy, request=good
        ).SerializeToString(),
        pb.SegmentStreamRequest(
            frame_id=2, options=pb.StreamOptions(policy=negative_policy), request=good
        ).SerializeToString(),
        b"\xff\xff\xff\xff not a frame",
        pb.SegmentStreamRequest(frame_id=4, request=good).SerializeToString(),
    ]
    call = channel.stream_stream(
        "/segserve.v1.Segmentation/SegmentStream",
        response_deserializer=pb.SegmentStreamResponse.FromString,
    )
    answers = [a async for a in call(iter(frames), timeout=30)]
    assert [a.frame_id for a in answers] == [1, 2, 0, 4]
    expected = ["policy 7 is not a StreamPolicy", "options.policy -3", "not a valid segserve.v1"]
    for answer, fragment in zip(answers, expected, strict=False):
        assert answer.status == pb.FRAME_STATUS_ERROR
        assert answer.error.code == INVALID.value[0]
        assert fragment in answer.error.message and len(answer.error.message) < LIMIT
    assert answers[3].status == pb.FRAME_STATUS_OK and answers[3].response.width == W


async def test_oversized_messages_on_both_ports(repository):
    """Past max_receive_message_bytes: RESOURCE_EXHAUSTED on the KServe port and for a stream
    frame (test_bad_input covers a unary Segment); the server goes on serving."""
    server = Server(make_settings(repository, max_receive_message_bytes=MIB, metrics_port=None))
    await server.start()
    huge = b"\xff\xd8\xff" + bytes(2 * MIB)
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.kserve_port}") as kchannel,
        ):
            stub = pb_grpc.SegmentationStub(channel)
            kstub = kserve_grpc.GRPCInferenceServiceStub(kchannel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await kstub.ModelInfer(images(prefixed(huge)), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in (err.value.details() or "")
            frame = pb.SegmentStreamRequest(frame_id=1, request=request(pb.Image(encoded=huge)))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [a async for a in stub.SegmentStream(iter([frame]), timeout=30)]
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            response = await kstub.ModelInfer(images(GOOD), timeout=30)
            check_kserve_answer(ok("after", lambda: None), response)
    finally:
        await server.stop(timeout_s=5)


async def test_the_server_still_serves_after_the_corpus(stub, kserve_stub):
    """Runs last in this module: after every kind above, a good image on both ports."""
    response = await stub.Segment(request(), timeout=30)
    check_v1_answer(ok("good", lambda: None), response)
    check_kserve_answer(ok("good", lambda: None), await kserve_stub.ModelInfer(images(GOOD)))
    kinds = [case.kind for case in (*IMAGES, *REQUESTS, *KSERVE)]
    assert len(set(kinds)) == len(kinds) >= 30
