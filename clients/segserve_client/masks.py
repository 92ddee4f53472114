"""Lossless label-map codecs shared by the server and the client: SRLE and 8-bit PNG.

Only numpy and the standard library are used, so a client decodes masks without OpenCV. The
byte layouts are specified in proto/segserve/v1/segserve.proto (MaskEncoding).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import numpy as np

__all__ = [
    "SRLE_CODEC_STORED",
    "SRLE_CODEC_ZLIB",
    "SRLE_MAGIC",
    "SRLE_MAX_WIDTH",
    "MaskDecodeError",
    "decode_png",
    "decode_srle",
    "encode_png",
    "encode_srle",
]

SRLE_MAGIC = b"SRL1"
SRLE_CODEC_STORED = 0
SRLE_CODEC_ZLIB = 1
_SRLE_HEADER = struct.Struct("<4sIIB3x")
SRLE_MAX_WIDTH = 65535

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class MaskDecodeError(ValueError):
    """The bytes are not a valid mask of the expected encoding."""


def _as_label_map(labels: np.ndarray) -> np.ndarray:
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"a label map is a 2-D uint8 array, got {labels.dtype} {labels.shape}")
    if labels.shape[0] == 0 or labels.shape[1] == 0:
        raise ValueError(f"a label map cannot be empty, got shape {labels.shape}")
    return np.ascontiguousarray(labels)


def encode_srle(labels: np.ndarray, *, zlib_level: int = 1) -> bytes:
    """Encodes a (H, W) uint8 label map as SRLE (row run-lengths, zlib-compressed)."""
    labels = _as_label_map(labels)
    height, width = labels.shape
    if width > SRLE_MAX_WIDTH:
        raise ValueError(f"SRLE supports widths up to {SRLE_MAX_WIDTH}, got {width}")
    flat = labels.reshape(-1)
    starts_run = np.empty(flat.size, dtype=bool)
    starts_run[0] = True
    np.not_equal(flat[1:], flat[:-1], out=starts_run[1:])
    starts_run[::width] = True
    starts = np.flatnonzero(starts_run)
    lengths = np.diff(starts, append=flat.size).astype("<u2")
    body = b"".join((struct.pack("<I", starts.size), flat[starts].tobytes(), lengths.tobytes()))
    header = _SRLE_HEADER.pack(SRLE_MAGIC, width, height, SRLE_CODEC_ZLIB)
    return header + zlib.compress(body, zlib_level)


def decode_srle(data: bytes | memoryview) -> np.ndarray:
    """Decodes SRLE bytes into a (H, W) uint8 label map, checking every length it reads."""
    if len(data) < _SRLE_HEADER.size:
        raise MaskDecodeError(f"SRLE data is {len(data)} bytes, shorter than its header")
    magic, width, height, codec = _SRLE_HEADER.unpack_from(data)
    if magic != SRLE_MAGIC:
        raise MaskDecodeError(f"not SRLE data: magic {magic!r}, expected {SRLE_MAGIC!r}")
    if not (0 < width <= SRLE_MAX_WIDTH) or height == 0:
        raise MaskDecodeError(f"SRLE header has invalid size {width}x{height}")
    if bytes(data[13:16]) != b"\0\0\0":
        raise MaskDecodeError("SRLE header's reserved bytes are not zero")
    payload = bytes(data[_SRLE_HEADER.size :])
    # At most one run per pixel: a larger body is corrupt (or a decompression bomb).
    max_body = 4 + 3 * width * height
    if codec == SRLE_CODEC_ZLIB:
        body = _inflate(payload, max_body, "SRLE body")
    elif codec == SRLE_CODEC_STORED:
        body = payload
    else:
        raise MaskDecodeError(f"unknown SRLE codec {codec}")
    if len(body) < 4:
        raise MaskDecodeError("SRLE body is too short for its run count")
    (runs,) = struct.unpack_from("<I", body)
    if len(body) != 4 + 3 * runs:
        raise MaskDecodeError(f"SRLE body is {len(body)} bytes, expected {4 + 3 * runs}")
    values = np.frombuffer(body, dtype=np.uint8, count=runs, offset=4)
    lengths = np.frombuffer(body, dtype="<u2", count=runs, offset=4 + runs)
    ends = np.cumsum(lengths, dtype=np.int64)
    if runs == 0 or int(ends[-1]) != width * height:
        covered = int(ends[-1]) if runs else 0
        raise MaskDecodeError(f"SRLE runs cover {covered} pixels, not {width}x{height}")
    if int(lengths.min()) == 0:
        raise MaskDecodeError("SRLE has a run of length 0")
    if np.any((ends - lengths) // width != (ends - 1) // width):
        raise MaskDecodeError("SRLE has a run that crosses the end of a row")
    return np.repeat(values, lengths).reshape(height, width)


def _inflate(payload: bytes, max_size: int, what: str) -> bytes:
    """zlib-decompresses at most max_size bytes; more, or trailing data, is corrupt input."""
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(payload, max_size)
    except zlib.error as exc:
        raise MaskDecodeError(f"{what} does not inflate: {exc}") from exc
    if inflater.unconsumed_tail or not inflater.eof:
        raise MaskDecodeError(f"{what} is larger than its size allows, or truncated")
    if inflater.unused_data:
        raise MaskDecodeError(f"{what} has {len(inflater.unused_data)} bytes after its end")
    return body


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(kind))
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def encode_png(
    labels: np.ndarray,
    *,
    palette: Sequence[tuple[int, int, int]] | None = None,
    zlib_level: int = 1,
) -> bytes:
    """Encodes a (H, W) uint8 label map as an 8-bit PNG, greyscale or indexed with `palette`.

    Every row uses PNG filter 2 ("Up"): label maps repeat row after row, so the filtered rows are
    mostly zeros and deflate fast at a low level.
    """
    labels = _as_label_map(labels)
    height, width = labels.shape
    colour_type = 0 if palette is None else 3
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    rows = np.empty((height, width + 1), dtype=np.uint8)
    rows[:, 0] = 2
    rows[0, 1:] = labels[0]
    np.subtract(labels[1:], labels[:-1], out=rows[1:, 1:])
    chunks = [_png_chunk(b"IHDR", header)]
    if palette is not None:
        if not 0 < len(palette) <= 256:
            raise ValueError(f"a PNG palette has 1 to 256 colours, got {len(palette)}")
        plte = bytes(channel for colour in palette for channel in colour)
        chunks.append(_png_chunk(b"PLTE", plte))
    chunks.append(_png_chunk(b"IDAT", zlib.compress(rows.tobytes(), zlib_level)))
    chunks.append(_png_chunk(b"IEND", b""))
    return _PNG_SIGNATURE + b"".join(chunks)


def _unfilter_rows(rows: np.ndarray) -> np.ndarray:
    """Reverses PNG filters for 1 byte per pixel; filters 0-2 vectorised, 3-4 row by row."""
    filters = rows[:, 0]
    data = rows[:, 1:].astype(np.uint8, copy=True)
    if np.all(filters == 2):
        return np.cumsum(data, axis=0, dtype=np.uint8)
    out = np.empty_like(data)
    previous = np.zeros(data.shape[1], dtype=np.uint8)
    for y, kind in enumerate(filters):
        line = data[y]
        if kind == 0:
            out[y] = line
        elif kind == 1:
            out[y] = np.cumsum(line, dtype=np.uint8)
        elif kind == 2:
            out[y] = line + previous
        elif kind in (3, 4):
            out[y] = _unfilter_sequential(line, previous, int(kind))
        else:
            raise MaskDecodeError(f"PNG row {y} has unknown filter type {kind}")
        previous = out[y]
    return out


def _unfilter_sequential(line: np.ndarray, above: np.ndarray, kind: int) -> np.ndarray:
    result = bytearray(line.tobytes())
    up = above.tolist()
    left = 0
    upper_left = 0
    for x, value in enumerate(result):
        if kind == 3:
            predicted = (left + up[x]) >> 1
        else:
            p = left + up[x] - upper_left
            pa, pb, pc = abs(p - left), abs(p - up[x]), abs(p - upper_left)
            predicted = left if pa <= pb and pa <= pc else (up[x] if pb <= pc else upper_left)
        left = (value + predicted) & 0xFF
        result[x] = left
        upper_left = up[x]
    return np.frombuffer(bytes(result), dtype=np.uint8)


def decode_png(data: bytes | memoryview) -> tuple[np.ndarray, list[tuple[int, int, int]] | None]:
    """Decodes an 8-bit single-channel PNG (greyscale or indexed, not interlaced).

    Returns the (H, W) uint8 map and the palette, if the PNG has one. Other PNG kinds raise
    MaskDecodeError: segserve never produces them.
    """
    data = bytes(data)
    if not data.startswith(_PNG_SIGNATURE):
        raise MaskDecodeError("not a PNG file")
    offset = len(_PNG_SIGNATURE)
    header: tuple[int, ...] | None = None
    palette: list[tuple[int, int, int]] | None = None
    idat: list[bytes] = []
    while offset + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        kind = data[offset + 4 : offset + 8]
        payload = data[offset + 8 : offset + 8 + length]
        if len(payload) != length:
            raise MaskDecodeError(f"PNG chunk {kind!r} is truncated")
        offset += 12 + length
        if kind == b"IHDR":
            if length != 13:
                raise MaskDecodeError(f"PNG IHDR chunk is {length} bytes, not 13")
            header = struct.unpack(">IIBBBBB", payload)
        elif kind == b"PLTE":
            palette = [tuple(payload[i : i + 3]) for i in range(0, length - 2, 3)]  # type: ignore[misc]
        elif kind == b"IDAT":
            idat.append(payload)
        elif kind == b"IEND":
            break
    if header is None:
        raise MaskDecodeError("PNG has no IHDR chunk")
    width, height, depth, colour_type, _, _, interlace = header
    if width == 0 or height == 0:
        raise MaskDecodeError(f"PNG has an empty size {width}x{height}")
    if depth != 8 or colour_type not in (0, 3) or interlace != 0:
        raise MaskDecodeError(
            f"PNG is bit depth {depth}, colour type {colour_type}, interlace {interlace}; "
            "expected an 8-bit greyscale or indexed, non-interlaced label map"
        )
    raw = _inflate(b"".join(idat), height * (width + 1), "PNG image data")
    if len(raw) != height * (width + 1):
        raise MaskDecodeError(
            f"PNG image data is {len(raw)} bytes, expected {height * (width + 1)}"
        )
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, width + 1)
    return _unfilter_rows(rows), palette
