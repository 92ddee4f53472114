"""Image decoding: format sniffing, header-only size checks, then decode (JPEG via libjpeg-turbo).

Sizes are read from the file header and checked against the limits before a pixel is decoded,
so a 100000x100000 PNG of a few hundred bytes costs nothing. JPEGs decode at a reduced DCT scale
when the model's input is smaller than the image (the label map is resized back anyway): the
smallest of 1/8, 1/4 and 1/2 that still covers the model's input, the scales libjpeg-turbo has
SIMD code for (1/2 decodes a 1920x1080 frame in 3.2 ms; 3/8, smaller, takes 3.9 ms).

EXIF orientation (tag 0x0112 of IFD0; JPEG APP1 "Exif", PNG eXIf, WebP EXIF chunks) is applied
to the decoded pixels, so the pixels, and the original size reported, are in display orientation
(what image viewers and annotation tools show); `ignore_exif_orientation` keeps the stored one.
The size limits apply to the stored size (the same pixel count). The EXIF parser reads only the
header bytes, bounded; malformed EXIF is ignored (orientation 1).

16-bit PNGs become 8-bit by the request's `DecodeOptions` scaling (pipeline/scaling.py; default
SHIFT, the top 8 bits, what OpenCV's 8-bit conversion gave before). DICOM and TIFF / GeoTIFF
(the `formats` extra) are sniffed here and decoded by pipeline/formats_dicom.py and
formats_geotiff.py, imported only when such an image arrives.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import simplejpeg

from segserve_server.errors import InvalidArgument
from segserve_server.pipeline.scaling import DecodeOptions, to_uint8

__all__ = [
    "FAST_DCT_SCALES",
    "RAW_CHANNELS",
    "ChannelOrder",
    "DecodeOptions",
    "DecodedImage",
    "ImageLimits",
    "RawPixels",
    "apply_orientation",
    "check_size",
    "dct_scaled_size",
    "decode",
    "exif_orientation",
    "from_raw",
    "image_size",
    "reduced_scale",
    "sniff_format",
    "tiff_orientation",
]

ChannelOrder = Literal["RGB", "BGR", "GRAY"]
RAW_CHANNELS: dict[str, int] = {"RGB": 3, "BGR": 3, "GRAY": 1}


@dataclass(frozen=True)
class RawPixels:
    """Uncompressed pixels as a camera stack sends them."""

    data: bytes | memoryview
    width: int
    height: int
    order: ChannelOrder


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int
    max_side: int


@dataclass(frozen=True)
class DecodedImage:
    """Pixels (h, w, 3) or (h, w) and the original size; h, w may be smaller (DCT scaling)."""

    pixels: np.ndarray
    order: ChannelOrder
    original_width: int
    original_height: int
    format: str


def sniff_format(data: bytes | memoryview) -> str:
    head = bytes(data[:16])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head.startswith(b"BM"):
        return "BMP"
    if len(data) >= 132 and bytes(data[128:132]) == b"DICM":
        return "DICOM"
    if _tiff_ifd_plausible(data):
        return "TIFF"
    raise InvalidArgument(
        f"unrecognised image format (first bytes {head[:8].hex()}); send JPEG, PNG, WebP, BMP, "
        "DICOM (Part 10) or TIFF (its IFD0 offset within the file)"
    )


def _tiff_ifd_plausible(data: bytes | memoryview) -> bool:
    """A TIFF or BigTIFF header whose IFD0 offset points past the header and into the data."""
    head = bytes(data[:16])
    endian = "<" if head[:2] == b"II" else ">" if head[:2] == b"MM" else ""
    if not endian or len(head) < 8:
        return False
    (magic,) = struct.unpack(endian + "H", head[2:4])
    if magic == 42:
        offset: int = struct.unpack(endian + "I", head[4:8])[0]
        return 8 <= offset < len(data)
    if magic == 43 and len(head) == 16:
        offset = struct.unpack(endian + "Q", head[8:16])[0]
        return 16 <= offset < len(data)
    return False


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise InvalidArgument("PNG is truncated or corrupt: no IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    raise InvalidArgument("WebP is truncated or corrupt: no VP8/VP8L/VP8X header")


_MAX_PNG_CHUNKS = 1 << 17  # 64 MiB of 512-byte IDATs; encoders write 8 KiB or more each


def _check_png_chunks(data: bytes | memoryview) -> None:
    """Every chunk's length fits in the data, up to IEND. OpenCV's reader allocates what a
    length says before it reads: a 1.3 KB PNG whose IDAT claimed 4 GB held a decode thread
    for 30 s (a fuzz finding). Data that ends at a chunk boundary is left to the decoder."""
    view = memoryview(data)
    pos, end = 8, len(view)
    for _ in range(_MAX_PNG_CHUNKS):
        if pos + 12 > end or bytes(view[pos + 4 : pos + 8]) == b"IEND":
            return
        (length,) = struct.unpack_from(">I", view, pos)
        if length > end - pos - 12:
            kind = bytes(view[pos + 4 : pos + 8]).decode("latin-1")
            raise InvalidArgument(
                f"PNG is corrupt or truncated: chunk {kind!r} at byte {pos} says {length} bytes, "
                f"{end - pos - 12} remain"
            )
        pos += 12 + length
    raise InvalidArgument(f"PNG has more than {_MAX_PNG_CHUNKS} chunks")


def _bmp_size(data: bytes) -> tuple[int, int]:
    if len(data) < 26:
        raise InvalidArgument("BMP is truncated: header incomplete")
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:
        width, height = struct.unpack("<HH", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)


def _jpeg_size(data: bytes | memoryview) -> tuple[int, int]:
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as exc:
        raise InvalidArgument(f"JPEG header is corrupt or truncated: {exc}") from exc
    return width, height


def image_size(data: bytes | memoryview, fmt: str) -> tuple[int, int]:
    """(width, height) from the header of an encoded image, without decoding it."""
    if fmt == "JPEG":
        return _jpeg_size(data)
    if fmt == "DICOM":
        from segserve_server.pipeline import formats_dicom

        return formats_dicom.dicom_size(formats_dicom.read_header(data))
    if fmt == "TIFF":
        from segserve_server.pipeline import formats_geotiff

        return formats_geotiff.tiff_size(data)
    head = bytes(data[:32])
    return {"PNG": _png_size, "WebP": _webp_size, "BMP": _bmp_size}[fmt](head)


def check_size(width: int, height: int, limits: ImageLimits, what: str = "image") -> None:
    if width <= 0 or height <= 0:
        raise InvalidArgument(f"{what} has an empty size {width}x{height}")
    if width > limits.max_side or height > limits.max_side:
        raise InvalidArgument(
            f"{what} is {width}x{height} pixels; the largest side accepted is {limits.max_side}"
        )
    if width * height > limits.max_pixels:
        raise InvalidArgument(
            f"{what} is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
        )


FAST_DCT_SCALES = (8, 4, 2)
"""Denominators of the DCT scales tried (1/8, 1/4, 1/2): libjpeg-turbo has SIMD IDCTs for them."""


def dct_scaled_size(width: int, height: int, min_size: tuple[int, int] | None) -> tuple[int, int]:
    """The size to ask the JPEG decoder for: the image at the smallest scale of FAST_DCT_SCALES
    that is at least min_size (w, h), or (0, 0) for full size."""
    if min_size is None:
        return 0, 0
    for denominator in FAST_DCT_SCALES:
        scaled = (-(-width // denominator), -(-height // denominator))  # libjpeg rounds up
        if scaled[0] >= min_size[0] and scaled[1] >= min_size[1]:
            return scaled
    return 0, 0


_REDUCED_FLAGS = {1: 0, 2: 16, 4: 32, 8: 64}  # OpenCV's IMREAD_REDUCED_* bit, colour-free


def reduced_scale(width: int, height: int, min_size: tuple[int, int] | None) -> int:
    """The denominator (8, 4, 2, or 1: full size) PNG, WebP and BMP are decoded at: the largest
    whose size (width // d, height // d, as OpenCV's IMREAD_REDUCED_*) still covers min_size.
    OpenCV decodes the full image into its own buffer and hands back only the reduced copy, so
    a large image costs one full decoded copy at the peak, not two (its full-size decode is
    copied again into the array it returns)."""
    if min_size is None:
        return 1
    for denominator in FAST_DCT_SCALES:
        if width // denominator >= min_size[0] and height // denominator >= min_size[1]:
            return denominator
    return 1


def decode(
    data: bytes | memoryview,
    limits: ImageLimits,
    *,
    order: Literal["RGB", "BGR"] = "RGB",
    min_size: tuple[int, int] | None = None,
    ignore_exif_orientation: bool = False,
    options: DecodeOptions | None = None,
) -> DecodedImage:
    """Decodes an encoded image into `order`; JPEGs at the smallest DCT scale >= min_size (w, h),
    8-bit PNG, WebP and BMP at `reduced_scale`.

    The pixels and original size are in display orientation: the EXIF orientation is applied
    unless ignore_exif_orientation. `options`: wide samples' scaling, TIFF bands, DICOM window."""
    if len(data) == 0:
        raise InvalidArgument("image is empty (0 bytes)")
    fmt = sniff_format(data)
    options = options or DecodeOptions()
    if fmt == "DICOM":
        from segserve_server.pipeline.formats_dicom import decode_dicom

        return decode_dicom(data, limits, options, order=order)
    if fmt == "TIFF":
        from segserve_server.pipeline.formats_geotiff import decode_tiff

        return decode_tiff(data, limits, options, order=order)
    width, height = image_size(data, fmt)
    check_size(width, height, limits, f"{fmt} image")
    orientation = 1 if ignore_exif_orientation else exif_orientation(data, fmt)
    if orientation >= 5 and min_size is not None:
        min_size = (min_size[1], min_size[0])  # the stored image is transposed to display
    if fmt == "JPEG":
        min_w, min_h = dct_scaled_size(width, height, min_size)
        try:
            pixels = simplejpeg.decode_jpeg(
                data, colorspace=order, min_width=min_w, min_height=min_h, strict=True
            )
        except ValueError as exc:
            raise InvalidArgument(f"JPEG does not decode: {exc}") from exc
    else:
        if fmt == "PNG":
            _check_png_chunks(data)
        wide = fmt == "PNG" and len(data) > 24 and data[24] == 16  # IHDR bit depth 16
        reduce = 1 if wide else reduced_scale(width, height, min_size)
        if wide:
            flag = cv2.IMREAD_UNCHANGED
        else:
            flag = cv2.IMREAD_COLOR_RGB if order == "RGB" else cv2.IMREAD_COLOR_BGR
            flag |= _REDUCED_FLAGS[reduce]
        flag |= cv2.IMREAD_IGNORE_ORIENTATION  # applied below, from our own parse
        pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
        if pixels is None:
            raise InvalidArgument(f"{fmt} image does not decode: corrupt or truncated")
        if wide:
            pixels = _scaled_colour(pixels, options, order)
        if pixels.shape[:2] != (height // reduce, width // reduce):
            raise InvalidArgument(
                f"{fmt} header says {width}x{height} but the pixels are "
                f"{pixels.shape[1]}x{pixels.shape[0]}"
            )
    if orientation != 1:
        pixels = apply_orientation(pixels, orientation)
        if orientation >= 5:
            width, height = height, width
    return DecodedImage(pixels, order, width, height, fmt)


def _scaled_colour(
    pixels: np.ndarray, options: DecodeOptions, order: Literal["RGB", "BGR"]
) -> np.ndarray:
    """OpenCV's unchanged decode (grey, BGR or BGRA, any depth) as 8-bit colour in `order`, by
    the request's scaling (default SHIFT: the top 8 bits). Alpha is dropped."""
    if pixels.ndim == 3:
        pixels = pixels[:, :, :3] if pixels.shape[2] >= 3 else pixels[:, :, 0]
    pixels = to_uint8(pixels, options, default=options.integer_default)
    if pixels.ndim == 2:
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    return np.ascontiguousarray(pixels[:, :, ::-1]) if order == "RGB" else pixels


# EXIF orientation ------------------------------------------------------------------------------

_ORIENTATION_TAG = 0x0112
_MAX_IFD_ENTRIES = 1024  # IFD0 has a few dozen at most; a bogus count is cut to this
_MAX_JPEG_SEGMENTS = 64  # markers walked before the first scan
_MAX_CHUNKS = 256  # PNG / WebP chunks walked


def tiff_orientation(tiff: bytes | memoryview) -> int:
    """The Orientation (1..8) in IFD0 of a TIFF-structured EXIF block; 1 if absent or malformed."""
    tiff = bytes(tiff)
    if len(tiff) < 8:
        return 1
    if tiff[:4] == b"II*\x00":
        endian = "<"
    elif tiff[:4] == b"MM\x00*":
        endian = ">"
    else:
        return 1
    (ifd,) = struct.unpack(endian + "I", tiff[4:8])
    if ifd < 8 or ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(endian + "H", tiff[ifd : ifd + 2])
    count = min(count, _MAX_IFD_ENTRIES, (len(tiff) - ifd - 2) // 12)
    for i in range(count):
        start = ifd + 2 + 12 * i
        tag, kind, n = struct.unpack(endian + "HHI", tiff[start : start + 8])
        if tag != _ORIENTATION_TAG:
            continue
        if kind != 3 or n < 1:  # SHORT, inline in the first two bytes of the value field
            return 1
        (value,) = struct.unpack(endian + "H", tiff[start + 8 : start + 10])
        return value if 1 <= value <= 8 else 1
    return 1


def _exif_block(payload: bytes | memoryview) -> int:
    """Orientation of an EXIF payload, with or without the "Exif\\0\\0" prefix."""
    payload = bytes(payload)
    if payload.startswith(b"Exif\x00\x00"):
        payload = payload[6:]
    return tiff_orientation(payload)


def _jpeg_orientation(data: bytes | memoryview) -> int:
    pos = 2
    for _ in range(_MAX_JPEG_SEGMENTS):
        if pos + 4 > len(data) or data[pos] != 0xFF:
            return 1
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no more headers
            return 1
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2:
            return 1
        if marker == 0xE1 and bytes(data[pos + 4 : pos + 10]) == b"Exif\x00\x00":
            return tiff_orientation(data[pos + 10 : pos + 2 + length])
        pos += 2 + length
    return 1


def _png_orientation(data: bytes | memoryview) -> int:
    pos = 8
    for _ in range(_MAX_CHUNKS):
        if pos + 8 > len(data):
            return 1
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = bytes(data[pos + 4 : pos + 8])
        if kind == b"eXIf":
            return _exif_block(data[pos + 8 : pos + 8 + length])
        if kind in (b"IDAT", b"IEND"):  # eXIf comes before the image data
            return 1
        pos += 12 + length
    return 1


def _webp_orientation(data: bytes | memoryview) -> int:
    if bytes(data[12:16]) != b"VP8X" or len(data) < 21 or not data[20] & 0x08:  # EXIF flag
        return 1
    pos = 12
    for _ in range(_MAX_CHUNKS):
        if pos + 8 > len(data):
            return 1
        kind = bytes(data[pos : pos + 4])
        (length,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        if kind == b"EXIF":
            return _exif_block(data[pos + 8 : pos + 8 + length])
        pos += 8 + length + (length & 1)
    return 1


def exif_orientation(data: bytes | memoryview, fmt: str) -> int:
    """The EXIF orientation (1..8) of an encoded image; 1 without EXIF, for BMP, or malformed."""
    parser = {"JPEG": _jpeg_orientation, "PNG": _png_orientation, "WebP": _webp_orientation}
    try:
        return parser[fmt](data) if fmt in parser else 1
    except (struct.error, ValueError, IndexError):
        return 1


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Pixels (h, w[, c]) in stored orientation → display orientation (EXIF values 1..8)."""
    if orientation == 2:
        out = pixels[:, ::-1]  # mirror
    elif orientation == 3:
        out = pixels[::-1, ::-1]  # rotate 180
    elif orientation == 4:
        out = pixels[::-1]  # flip
    elif orientation == 5:
        out = pixels.swapaxes(0, 1)  # transpose
    elif orientation == 6:
        out = np.rot90(pixels, -1)  # rotate 90 clockwise
    elif orientation == 7:
        out = pixels[::-1, ::-1].swapaxes(0, 1)  # transverse
    elif orientation == 8:
        out = np.rot90(pixels, 1)  # rotate 90 counter-clockwise
    else:
        return pixels
    return np.ascontiguousarray(out)


def from_raw(raw: RawPixels, limits: ImageLimits) -> DecodedImage:
    """Wraps raw pixels without copying them, after checking the size and byte count."""
    if raw.order not in RAW_CHANNELS:
        raise InvalidArgument(
            f"raw pixel format {raw.order!r} is not one of {sorted(RAW_CHANNELS)}"
        )
    check_size(raw.width, raw.height, limits, "raw image")
    channels = RAW_CHANNELS[raw.order]
    expected = raw.width * raw.height * channels
    if len(raw.data) != expected:
        raise InvalidArgument(
            f"raw {raw.order} image of {raw.width}x{raw.height} needs {expected} bytes, "
            f"got {len(raw.data)}"
        )
    shape = (raw.height, raw.width, channels) if channels == 3 else (raw.height, raw.width)
    pixels = np.frombuffer(raw.data, dtype=np.uint8).reshape(shape)
    return DecodedImage(pixels, raw.order, raw.width, raw.height, f"raw {raw.order}")
