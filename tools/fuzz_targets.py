"""The targets of the fuzz harness (tools/fuzz.py, the runner): seeds, hypothesis strategies,
what each target calls (the server's own functions, as the gRPC handlers do) and which
exceptions it may raise.

- `decode`: mutated real images (PNG, JPEG, WebP, BMP of many kinds) through pipeline.decode
  (sniff, header size, limits, EXIF orientation, decode), with random order / DCT scale / EXIF
  options; a decoded image must have the size its header (and orientation) says.
- `header`: the header-only parsers: sniff_format, image_size, exif_orientation (1..8 always).
- `raw`: segserve.v1 RawImage requests (any uint32 size, any pixel format value, byte counts
  near the right one) through to_segment_input and from_raw.
- `segment_request`: SegmentRequest messages (unknown enum values, any field), serialised and
  byte-mutated, through grpc_helpers.parse and to_segment_input.
- `stream_frame`: SegmentStreamRequest frames through parse and to_frame_in.
- `kserve_request`: ModelInferRequest messages (any datatype, shape, raw or typed contents,
  parameters, version string), serialised and byte-mutated, through parse, to_infer_request
  (against a real TensorAPI over the bundled synthetic model) and the image route's options.
- `kserve_tensors`: the same requests through decode_inputs against an input spec fitted to
  their first tensor, any dim -1 (beyond the bundled model's fixed dims).

Seeds are real encoded images mutated (truncation, bit flips, header fields set to boundary
values, inserted / deleted / spliced bytes): random bytes mostly stop at the magic check.
A target may raise only ALLOWED (SegserveError subclasses, a refusal); anything else, or a
broken invariant (an assert), is a bug.
"""

from __future__ import annotations

import asyncio
import io
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st
from PIL import Image
from tritonclient.grpc import service_pb2 as kserve

from segserve.v1 import segserve_pb2 as pb
from segserve_server.adapters.grpc_helpers import parse
from segserve_server.adapters.kserve_tensors import decode_inputs, to_infer_request
from segserve_server.adapters.segserve_v1 import to_frame_in, to_segment_input
from segserve_server.core.service import SegmentationCore
from segserve_server.core.tensor_types import (
    DATATYPES,
    TensorSpec,
    admission_of,
    image_options,
)
from segserve_server.core.tensors import TensorAPI
from segserve_server.errors import SegserveError
from segserve_server.pipeline.decode import (
    ImageLimits,
    RawPixels,
    decode,
    exif_orientation,
    from_raw,
    image_size,
    sniff_format,
)
from segserve_server.settings import Settings

__all__ = [
    "ALLOWED",
    "LIMITS",
    "SEEDS",
    "SEED_LIST",
    "TARGETS",
    "LoadedTensorAPI",
    "Target",
    "image_seeds",
    "mutated",
]

ROOT = Path(__file__).resolve().parent.parent
MODEL = "synthetic_colour_classes"  # the bundled test model (input FP32 [-1, 3, 360, 480])


def _settings(**values: Any) -> Settings:
    return Settings(**values)


def _enum(value: int) -> Any:
    """An enum field's value, one the enum defines or not (proto3 enums are open)."""
    return value


DEFAULTS = _settings()
LIMITS = ImageLimits(DEFAULTS.max_image_pixels, DEFAULTS.max_image_side)

# Boundary values written over header fields (sizes, lengths, counts, offsets).
# fmt: off
INTERESTING = (0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x3FFF, 0x4000, 0x7FFF, 0x8000, 0xFFFF,
               0x10000, 16384, 16385, 40_000_001, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
# fmt: on
INT_FORMATS = ("<H", ">H", "<I", ">I", "B")


# Seeds ----------------------------------------------------------------------------------------


def _picture(height: int, width: int) -> np.ndarray:
    """Four flat quadrants plus a little noise: compressible, yet every codec path runs."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (255, 0, 0)
    image[: height // 2, width // 2 :] = (0, 255, 0)
    image[height // 2 :, : width // 2] = (0, 0, 255)
    image[height // 2 :, width // 2 :] = 255
    noise = np.random.default_rng(height * width).integers(0, 24, image.shape, dtype=np.uint8)
    return image - np.minimum(image, noise)


def _save(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _bmp_core(width: int, height: int) -> bytes:
    """A 24-bit BMP with the 12-byte OS/2 core header (_bmp_size's other branch)."""
    row = (width * 3 + 3) & ~3
    pixels = bytes(row * height)
    header = (
        b"BM" + (26 + len(pixels)).to_bytes(4, "little") + bytes(4) + (26).to_bytes(4, "little")
    )
    core = (12).to_bytes(4, "little") + width.to_bytes(2, "little") + height.to_bytes(2, "little")
    return header + core + (1).to_bytes(2, "little") + (24).to_bytes(2, "little") + pixels


def image_seeds() -> dict[str, bytes]:
    """Real encoded images of every kind the server decodes, small (so mutants decode fast)."""
    rgb = Image.fromarray(_picture(24, 32))
    wide = Image.fromarray(_picture(1, 40))
    deep = Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16))
    return {
        "png-rgb": _save(rgb, "PNG"),
        "png-gray": _save(rgb.convert("L"), "PNG"),
        "png-palette": _save(rgb.convert("P"), "PNG"),
        "png-rgba": _save(rgb.convert("RGBA"), "PNG"),
        "png-16bit": _save(deep, "PNG"),
        "png-1bit": _save(rgb.convert("1"), "PNG"),
        "png-exif6": _save(rgb, "PNG", exif=_exif(6)),
        "png-1x1": _save(rgb.resize((1, 1)), "PNG"),
        "png-1xN": _save(wide, "PNG"),
        "jpeg": _save(rgb, "JPEG", quality=90),
        "jpeg-progressive": _save(rgb, "JPEG", progressive=True),
        "jpeg-gray": _save(rgb.convert("L"), "JPEG"),
        "jpeg-cmyk": _save(rgb.convert("CMYK"), "JPEG"),
        "jpeg-exif6": _save(rgb, "JPEG", exif=_exif(6)),
        "jpeg-exif3": _save(rgb, "JPEG", exif=_exif(3)),
        "jpeg-444": _save(rgb, "JPEG", subsampling=0),
        "webp": _save(rgb, "WEBP", quality=80),
        "webp-lossless": _save(rgb, "WEBP", lossless=True),
        "webp-alpha": _save(rgb.convert("RGBA"), "WEBP"),
        "webp-exif8": _save(rgb, "WEBP", exif=_exif(8)),
        "bmp": _save(rgb, "BMP"),
        "bmp-palette": _save(rgb.convert("P"), "BMP"),
        "bmp-gray": _save(rgb.convert("L"), "BMP"),
        "bmp-1bit": _save(rgb.convert("1"), "BMP"),
        "bmp-rgba": _save(rgb.convert("RGBA"), "BMP"),
        "bmp-core": _bmp_core(8, 6),
        "png-animated": _animated(rgb, "PNG"),
        "webp-animated": _animated(rgb, "WEBP"),
    }


def _animated(image: Image.Image, fmt: str) -> bytes:
    second = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return _save(image, fmt, save_all=True, append_images=[second], duration=50, loop=0)


SEEDS = image_seeds()
SEED_LIST = list(SEEDS.values())


# Mutations ------------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes], max_ops: int = 4) -> bytes:
    """One of `seeds` with 0..max_ops mutations; positions favour the first 64 bytes (headers)."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, max_ops))):
        end = len(data)
        pos = draw(st.one_of(st.integers(0, 63), st.integers(0, max(end - 1, 0))))
        pos = min(pos, end)
        op = draw(st.sampled_from(("cut", "flip", "byte", "int", "insert", "delete", "copy")))
        if op == "cut":
            del data[pos:]
        elif op == "flip" and pos < end:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and pos < end:
            data[pos] = draw(st.integers(0, 255))
        elif op == "int":
            fmt = draw(st.sampled_from(INT_FORMATS))
            size = {"B": 1, "H": 2, "I": 4}[fmt[-1]]
            value = draw(st.sampled_from(INTERESTING)) % (1 << (8 * size))
            data[pos : pos + size] = value.to_bytes(size, "big" if fmt[0] == ">" else "little")
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "copy":
            other = draw(st.sampled_from(seeds))
            start = draw(st.integers(0, len(other)))
            data[pos:] = other[start:]
    return bytes(data)


def _maybe_mutated(message: Any) -> st.SearchStrategy[bytes]:
    """A message's serialisation, as it is or byte-mutated (if small: mutating megabytes of
    zeros finds nothing that mutating the small messages does not, and is slow)."""
    wire = message.SerializeToString()
    if len(wire) > 1 << 16:
        return st.just(wire)
    return st.one_of(st.just(wire), mutated([wire], max_ops=3))


ENUMS = st.one_of(st.integers(0, 5), st.integers(-(2**31), 2**31 - 1))
SHORT_TEXT = st.one_of(st.sampled_from(["", "colour", MODEL, "x" * 5000]), st.text(max_size=12))


# Targets --------------------------------------------------------------------------------------


@st.composite
def _decode_input(draw: st.DrawFn) -> tuple[bytes, str, tuple[int, int] | None, bool]:
    data = draw(mutated(SEED_LIST))
    order = draw(st.sampled_from(("RGB", "BGR")))
    min_size = draw(st.one_of(st.none(), st.tuples(st.integers(1, 64), st.integers(1, 64))))
    return data, order, min_size, draw(st.booleans())


def _decode(case: tuple[bytes, str, tuple[int, int] | None, bool]) -> None:
    data, order, min_size, ignore_exif = case
    out = decode(data, LIMITS, order=order, min_size=min_size, ignore_exif_orientation=ignore_exif)  # type: ignore[arg-type]
    assert out.pixels.dtype == np.uint8 and out.pixels.ndim == 3 and out.pixels.shape[2] == 3
    assert 0 < out.original_width <= LIMITS.max_side and out.original_height > 0
    shown = out.pixels.shape[1], out.pixels.shape[0]
    if min_size is None or out.format not in ("JPEG", "PNG", "WebP", "BMP"):  # reduced_scale
        assert shown == (out.original_width, out.original_height), (shown, out)
    else:
        assert 0 < shown[0] <= out.original_width and 0 < shown[1] <= out.original_height


def _header(data: bytes) -> None:
    fmt = sniff_format(data)
    width, height = image_size(data, fmt)
    assert isinstance(width, int) and isinstance(height, int) and width >= 0 and height >= 0
    assert 1 <= exif_orientation(data, fmt) <= 8


SIZES = st.one_of(st.integers(0, 80), st.sampled_from(INTERESTING), st.integers(0, 2**32 - 1))


@st.composite
def _raw_input(draw: st.DrawFn) -> bytes:
    width, height = draw(SIZES), draw(SIZES)
    pixel_format = _enum(draw(ENUMS))
    expected = width * height * (1 if pixel_format == pb.PIXEL_FORMAT_GRAY8 else 3)
    length = draw(
        st.one_of(
            st.just(expected), st.integers(0, 64), st.integers(expected - 4, expected + 4)
        ).filter(lambda n: 0 <= n <= 1 << 20)
        | st.integers(0, 64)
    )
    raw = pb.RawImage(pixels=bytes(length), width=width, height=height, format=pixel_format)
    wire: bytes = pb.SegmentRequest(model="colour", image=pb.Image(raw=raw)).SerializeToString()
    return wire


def _raw(wire: bytes) -> None:
    request = to_segment_input(parse(pb.SegmentRequest, wire))
    assert isinstance(request.image, RawPixels)
    out = from_raw(request.image, LIMITS)
    assert out.pixels.shape[:2] == (request.image.height, request.image.width)


@st.composite
def _segment_request(draw: st.DrawFn) -> pb.SegmentRequest:
    request = pb.SegmentRequest(
        model=draw(SHORT_TEXT),
        model_version=draw(st.integers(-(2**63), 2**63 - 1)),
        output_size=_enum(draw(ENUMS)),
        priority=draw(st.integers(0, 2**32 - 1)),
        timeout_us=draw(st.integers(0, 2**64 - 1)),
        polygon_tolerance_px=draw(st.floats(width=32)),
        confidence_threshold=draw(st.floats(width=32)),
        include_confidence=draw(st.booleans()),
        ignore_exif_orientation=draw(st.booleans()),
    )
    request.encodings.extend(draw(st.lists(ENUMS, max_size=4)))
    request.annotations.extend(draw(st.lists(ENUMS, max_size=3)))
    kind = draw(st.sampled_from(("encoded", "raw", "none")))
    if kind == "encoded":
        request.image.encoded = draw(st.sampled_from(SEED_LIST))
    elif kind == "raw":
        request.image.raw.CopyFrom(
            pb.RawImage(
                pixels=bytes(draw(st.integers(0, 64))), width=draw(SIZES), format=_enum(draw(ENUMS))
            )
        )
    return request


def _segment(wire: bytes) -> None:
    to_segment_input(parse(pb.SegmentRequest, wire))


@st.composite
def _stream_frame(draw: st.DrawFn) -> bytes:
    frame = pb.SegmentStreamRequest(
        frame_id=draw(st.integers(0, 2**64 - 1)),
        policy=_enum(draw(ENUMS)),
        max_age_ms=draw(st.integers(0, 2**32 - 1)),
        capture_time_us=draw(st.integers(-(2**63), 2**63 - 1)),
    )
    if draw(st.booleans()):
        frame.options.CopyFrom(
            pb.StreamOptions(
                policy=_enum(draw(ENUMS)),
                max_age_ms=draw(st.integers(0, 2**32 - 1)),
                priority=draw(st.integers(0, 2**32 - 1)),
            )
        )
    if draw(st.booleans()):
        frame.request.CopyFrom(draw(_segment_request()))
    return draw(_maybe_mutated(frame))


def _frame(wire: bytes) -> None:
    frame = to_frame_in(parse(pb.SegmentStreamRequest, wire))
    assert frame.error is None or isinstance(frame.error, SegserveError)


DIMS = st.one_of(
    st.sampled_from((0, 1, 2, 3, 8, 9, 360, 480, -1, 2**31, 2**62, 2**63 - 1, -(2**63))),
    st.integers(-(2**63), 2**63 - 1),
)
NAMES = st.sampled_from(("image", "IMAGE_BYTES", "labels", "", "x"))
PARAMETER_KEYS = st.sampled_from(
    (
        "mask_encoding",
        "output_size",
        "embed_palette",
        "ignore_exif_orientation",
        "priority",
        "timeout",
        "headers",
        "triton_enable_empty_final_response",
        "bogus",
        "sequence_id",
    )
)
PARAMETER_VALUES = st.one_of(
    st.booleans().map(lambda v: kserve.InferParameter(bool_param=v)),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: kserve.InferParameter(int64_param=v)),
    st.integers(0, 2**64 - 1).map(lambda v: kserve.InferParameter(uint64_param=v)),
    st.floats().map(lambda v: kserve.InferParameter(double_param=v)),
    st.sampled_from(("srle", "PNG", "raw", "model", "original", "x", "")).map(
        lambda v: kserve.InferParameter(string_param=v)
    ),
)


def _length_prefixed(elements: list[bytes]) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


@st.composite
def _kserve_request(draw: st.DrawFn) -> bytes:
    request = kserve.ModelInferRequest(
        model_name=draw(st.sampled_from((MODEL, MODEL + ".image", "", "nope", "nope.image"))),
        model_version=draw(
            st.one_of(
                st.sampled_from(("", "-1", "1", "2", " 1", "99" * 20)),
                st.text(max_size=4),
                st.text(st.characters(categories=("Nd", "No")), min_size=1, max_size=3),
            )
        ),
        id=draw(st.text(max_size=4)),
    )
    for key, value in draw(st.dictionaries(PARAMETER_KEYS, PARAMETER_VALUES, max_size=3)).items():
        request.parameters[key].CopyFrom(value)
    raw_contents = draw(st.booleans())
    for _ in range(draw(st.integers(0, 2))):
        tensor = request.inputs.add(
            name=draw(NAMES),
            datatype=draw(
                st.one_of(st.sampled_from(sorted(DATATYPES)), st.sampled_from(("", "FP8", "fp32")))
            ),
            shape=draw(st.lists(DIMS, max_size=5)),
        )
        if draw(st.integers(0, 9)) == 0:
            tensor.parameters["shared_memory_region"].string_param = "region"
        if tensor.datatype == "BYTES":
            elements = draw(st.lists(st.sampled_from([*SEED_LIST[:4], b"", b"x"]), max_size=3))
            if raw_contents:
                request.raw_input_contents.append(draw(_maybe_bytes(_length_prefixed(elements))))
            else:
                tensor.contents.bytes_contents.extend(elements)
        elif raw_contents:
            needed = 3 * 360 * 480 * DATATYPES.get(tensor.datatype, np.dtype(np.float32)).itemsize
            request.raw_input_contents.append(
                bytes(draw(st.sampled_from((0, 1, 4, needed - 4, needed, needed + 4))))
            )
        else:
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=4)))
            tensor.contents.int_contents.extend(
                draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=3))
            )
            tensor.contents.uint_contents.extend(
                draw(st.lists(st.integers(0, 2**32 - 1), max_size=3))
            )
    for _ in range(draw(st.integers(0, 2))):
        output = request.outputs.add(
            name=draw(st.sampled_from(("labels", "MASK_BYTES", "MASK_SHAPE", "x")))
        )
        if draw(st.integers(0, 9)) == 0:
            output.parameters[
                draw(st.sampled_from(("classification", "shared_memory_region")))
            ].int64_param = 1
    return draw(_maybe_mutated(request))


@st.composite
def _tensors_input(draw: st.DrawFn) -> tuple[bytes, list[TensorSpec]]:
    """A request (as for kserve_request) and the spec of a model input that fits its first
    tensor more or less (any dim may be -1): decode_inputs beyond the bundled model's dims."""
    wire = draw(_kserve_request())
    try:
        request = kserve.ModelInferRequest.FromString(wire)
    except Exception:
        request = kserve.ModelInferRequest()
    if not request.inputs:
        return wire, [TensorSpec("image", "FP32", (-1, 3))]
    first = request.inputs[0]
    datatype = first.datatype if first.datatype in DATATYPES else "UINT8"
    shape = tuple(-1 if draw(st.booleans()) else d for d in first.shape)
    spec = TensorSpec(first.name, datatype, shape[: draw(st.integers(len(shape) - 1, len(shape)))])
    count = math.prod(first.shape)
    if request.raw_input_contents and 0 <= count <= 1 << 16 and draw(st.booleans()):
        del request.raw_input_contents[:]
        if datatype == "BYTES":
            request.raw_input_contents.append(_length_prefixed([b"x"] * count))
        else:
            request.raw_input_contents.append(bytes(count * DATATYPES[datatype].itemsize))
        wire = request.SerializeToString()
    return wire, [spec]


def _tensors(case: tuple[bytes, list[TensorSpec]]) -> None:
    wire, specs = case
    request = parse(kserve.ModelInferRequest, wire)
    for name, array in decode_inputs(request, specs).items():
        (spec,) = (s for s in specs if s.name == name)
        assert array.ndim == len(spec.shape) and array.dtype == DATATYPES[spec.datatype]


def _maybe_bytes(data: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.just(data), mutated([data], max_ops=2))


_API: list[TensorAPI] = []


def _kserve(wire: bytes) -> None:
    request = to_infer_request(parse(kserve.ModelInferRequest, wire), _API[0])
    admission_of(request.parameters)
    if request.route.endswith(".image"):
        image_options(request.parameters)


# The exceptions a target may raise: a refusal, counted by type (anything else is a bug).
ALLOWED: tuple[type[Exception], ...] = (SegserveError,)


@dataclass(frozen=True)
class Target:
    name: str
    strategy: Callable[[], st.SearchStrategy[Any]]
    run: Callable[[Any], None]


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target("decode", _decode_input, _decode),
        Target("header", lambda: mutated(SEED_LIST), _header),
        Target("raw", _raw_input, _raw),
        Target("segment_request", lambda: _segment_request().flatmap(_maybe_mutated), _segment),
        Target("stream_frame", _stream_frame, _frame),
        Target("kserve_request", _kserve_request, _kserve),
        Target("kserve_tensors", _tensors_input, _tensors),
    )
}


class LoadedTensorAPI:
    """A real TensorAPI over a copy of the bundled synthetic model, loaded, for the KServe
    target; `with LoadedTensorAPI() as api:`."""

    def __enter__(self) -> TensorAPI:
        self._dir = tempfile.TemporaryDirectory(prefix="segserve-fuzz-")
        repository = Path(self._dir.name)
        shutil.copytree(ROOT / "model_repository" / MODEL, repository / MODEL)
        settings_ = _settings(model_repository=repository, worker_threads=1, ort_intra_op_threads=1)
        self._loop = asyncio.new_event_loop()
        self._core = SegmentationCore(settings_)
        self._loop.run_until_complete(self._core.start())
        api = TensorAPI(self._core, max_images_per_request=settings_.kserve_max_images_per_request)
        _API[:] = [api]
        return api

    def __exit__(self, *exc: object) -> None:
        _API.clear()
        self._loop.run_until_complete(self._core.stop(timeout_s=5))
        self._loop.close()
        self._dir.cleanup()
