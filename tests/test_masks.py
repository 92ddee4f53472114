"""The label-map codecs of segserve_client.masks: round trips, the wire layout, corrupt input."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from segserve_client.masks import (
    SRLE_MAX_WIDTH,
    MaskDecodeError,
    decode_png,
    decode_srle,
    encode_png,
    encode_srle,
)

SHAPES = [(1, 1), (1, 37), (37, 1), (5, 7), (64, 48), (1, SRLE_MAX_WIDTH), (3, SRLE_MAX_WIDTH)]
PALETTE = [(i, 255 - i, (i * 7) % 256) for i in range(256)]


def random_map(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def blocky_map(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Few classes in rectangular blocks, as a segmentation looks."""
    rng = np.random.default_rng(seed)
    height, width = shape
    labels = np.zeros(shape, dtype=np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, height), rng.integers(0, width)
        labels[y : y + rng.integers(1, height + 1), x : x + rng.integers(1, width + 1)] = (
            rng.integers(0, 12)
        )
    return labels


MAPS = [
    pytest.param(kind(shape), id=f"{kind.__name__}-{shape[0]}x{shape[1]}")
    for kind in (random_map, blocky_map)
    for shape in SHAPES
]


def srle_body(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The run values and lengths of an SRLE encoding (zlib codec)."""
    body = zlib.decompress(data[16:])
    (runs,) = struct.unpack_from("<I", body)
    values = np.frombuffer(body, np.uint8, runs, 4)
    return values, np.frombuffer(body, "<u2", runs, 4 + runs)


# ----------------------------------------------------------------------------------------------
# SRLE
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", MAPS)
def test_srle_round_trip(labels: np.ndarray) -> None:
    decoded = decode_srle(encode_srle(labels))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, labels)


@pytest.mark.parametrize("labels", MAPS)
def test_srle_layout_follows_the_spec(labels: np.ndarray) -> None:
    data = encode_srle(labels)
    height, width = labels.shape
    assert data[:4] == b"SRL1"
    assert struct.unpack_from("<IIB3s", data, 4) == (width, height, 1, b"\0\0\0")
    values, lengths = srle_body(data)
    assert lengths.min() >= 1 and lengths.max() <= width
    # Every row starts a new run: the cumulative lengths hit each row end exactly.
    ends = np.cumsum(lengths, dtype=np.int64)
    assert set(range(width, width * height + 1, width)) <= set(ends.tolist())
    assert ends[-1] == width * height
    # Neighbouring runs within a row differ in value (maximal runs).
    starts_row = np.concatenate(([True], ends[:-1] % width == 0))
    assert np.all((values[1:] != values[:-1]) | starts_row[1:])


def test_srle_stored_codec_decodes() -> None:
    labels = blocky_map((9, 11))
    body = zlib.decompress(encode_srle(labels)[16:])
    stored = struct.pack("<4sIIB3x", b"SRL1", 11, 9, 0) + body
    np.testing.assert_array_equal(decode_srle(stored), labels)
    np.testing.assert_array_equal(decode_srle(memoryview(stored)), labels)


@pytest.mark.parametrize(
    "labels",
    [
        np.zeros((2, SRLE_MAX_WIDTH + 1), np.uint8),
        np.zeros((0, 3), np.uint8),
        np.zeros((2, 2), np.int32),
        np.zeros(4, np.uint8),
    ],
    ids=["too-wide", "empty", "int32", "1-d"],
)
def test_srle_refuses_what_it_cannot_encode(labels: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_srle(labels)


def srle_with(width: int, height: int, codec: int, body: bytes, magic: bytes = b"SRL1") -> bytes:
    return struct.pack("<4sIIB3x", magic, width, height, codec) + body


def runs(values: list[int], lengths: list[int]) -> bytes:
    return struct.pack("<I", len(values)) + bytes(values) + np.array(lengths, dtype="<u2").tobytes()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"SRL1\x02\0\0\0", id="short-header"),
        pytest.param(srle_with(2, 1, 0, runs([1], [2]), magic=b"SRL2"), id="magic"),
        pytest.param(srle_with(0, 1, 0, runs([1], [0])), id="width-0"),
        pytest.param(srle_with(2, 0, 0, runs([], [])), id="height-0"),
        pytest.param(srle_with(SRLE_MAX_WIDTH + 1, 1, 0, b""), id="width-65536"),
        pytest.param(srle_with(2, 1, 7, runs([1], [2])), id="codec"),
        pytest.param(srle_with(2, 1, 1, b"not zlib"), id="not-zlib"),
        pytest.param(srle_with(2, 1, 0, b"\1\0"), id="no-run-count"),
        pytest.param(srle_with(2, 1, 0, runs([1], [2])[:-1]), id="short-body"),
        pytest.param(srle_with(2, 1, 0, runs([1], [2]) + b"\0"), id="long-body"),
        pytest.param(srle_with(2, 2, 0, runs([1, 2], [2, 1])), id="too-few-pixels"),
        pytest.param(srle_with(2, 1, 0, runs([1, 2], [2, 2])), id="too-many-pixels"),
    ],
)
def test_srle_corrupt_input_raises(data: bytes) -> None:
    with pytest.raises(MaskDecodeError):
        decode_srle(data)


def test_srle_every_truncation_raises() -> None:
    data = encode_srle(blocky_map((20, 30)))
    for size in range(len(data)):
        with pytest.raises(MaskDecodeError):
            decode_srle(data[:size])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(srle_with(2, 2, 0, runs([1, 2, 3], [2, 0, 2])), id="zero-length-run"),
        pytest.param(srle_with(2, 2, 0, runs([1, 2, 3], [1, 2, 1])), id="run-crosses-row"),
    ],
)
def test_srle_runs_breaking_the_row_rules_raise(data: bytes) -> None:
    with pytest.raises(MaskDecodeError):
        decode_srle(data)


# ----------------------------------------------------------------------------------------------
# PNG
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", MAPS)
def test_png_grey_round_trip_and_opencv_reads_it(labels: np.ndarray) -> None:
    data = encode_png(labels)
    decoded, palette = decode_png(data)
    assert palette is None
    np.testing.assert_array_equal(decoded, labels)
    read = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(read, labels)


@pytest.mark.parametrize("labels", MAPS)
def test_png_palette_round_trip_and_opencv_shows_the_colours(labels: np.ndarray) -> None:
    data = encode_png(labels, palette=PALETTE)
    assert data[25] == 3  # IHDR colour type: indexed
    decoded, palette = decode_png(data)
    assert palette == PALETTE
    np.testing.assert_array_equal(decoded, labels)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(bgr, np.array(PALETTE, np.uint8)[labels][:, :, ::-1])


@pytest.mark.parametrize("kind", [random_map, blocky_map])
def test_png_written_by_opencv_decodes(kind: object) -> None:
    """libpng picks a filter per row (None, Sub, Up, Average, Paeth): all must decode."""
    labels = kind((40, 57))  # type: ignore[operator]
    ok, data = cv2.imencode(".png", labels, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok
    filters = set(png_rows(data.tobytes())[:, 0].tolist())
    assert len(filters) > 1, filters  # not only "Up", which the vectorised path handles
    np.testing.assert_array_equal(decode_png(data.tobytes())[0], labels)


def png_rows(data: bytes) -> np.ndarray:
    """The filtered rows of an 8-bit single-channel PNG: (H, 1 + W), the filter type first."""
    offset, idat, width = 8, b"", 0
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        kind, payload = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            width = struct.unpack_from(">I", payload)[0]
        elif kind == b"IDAT":
            idat += payload
        offset += 12 + length
    return np.frombuffer(zlib.decompress(idat), np.uint8).reshape(-1, width + 1)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_with(
    width: int = 3,
    height: int = 2,
    *,
    depth: int = 8,
    colour: int = 0,
    interlace: int = 0,
    rows: bytes | None = None,
    idat: bytes | None = None,
    ihdr: bytes | None = None,
) -> bytes:
    if ihdr is None:
        ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    if idat is None:
        idat = zlib.compress(rows if rows is not None else bytes(height * (width + 1)))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def test_png_split_idat_and_ancillary_chunks_decode() -> None:
    labels = blocky_map((10, 12))
    data = encode_png(labels)
    idat_start = 8 + 25
    (length,) = struct.unpack_from(">I", data, idat_start)
    stream = data[idat_start + 8 : idat_start + 8 + length]
    split = (
        data[:idat_start]
        + png_chunk(b"tEXt", b"Comment\0segserve")
        + png_chunk(b"IDAT", stream[:5])
        + png_chunk(b"IDAT", stream[5:])
        + png_chunk(b"IEND", b"")
    )
    np.testing.assert_array_equal(decode_png(split)[0], labels)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"GIF89a" + bytes(20), id="not-png"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IEND", b""), id="no-ihdr"),
        pytest.param(png_with(depth=16), id="16-bit"),
        pytest.param(png_with(colour=2), id="rgb"),
        pytest.param(png_with(colour=4), id="grey-alpha"),
        pytest.param(png_with(interlace=1), id="interlaced"),
        pytest.param(png_with(idat=b"not zlib"), id="not-zlib"),
        pytest.param(png_with(rows=bytes(3 * 4)), id="long-data"),
        pytest.param(png_with(rows=bytes(2 * 4 - 1)), id="short-data"),
        pytest.param(png_with(rows=b"\5" + bytes(7)), id="filter-5"),
    ],
)
def test_png_corrupt_input_raises(data: bytes) -> None:
    with pytest.raises(MaskDecodeError):
        decode_png(data)


def test_png_every_truncation_before_the_end_of_its_data_raises() -> None:
    data = encode_png(blocky_map((20, 30)), palette=PALETTE[:12])
    idat = data.index(b"IDAT")
    (length,) = struct.unpack_from(">I", data, idat - 4)
    for size in range(idat + 4 + length):  # up to the last byte of the IDAT payload
        with pytest.raises(MaskDecodeError):
            decode_png(data[:size])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(png_with(ihdr=struct.pack(">II", 3, 2)), id="short-ihdr"),
        pytest.param(png_with(width=0, rows=b"\0\0"), id="width-0"),
    ],
)
def test_png_malformed_header_raises(data: bytes) -> None:
    with pytest.raises(MaskDecodeError):
        decode_png(data)


@pytest.mark.parametrize("palette", [[], [*PALETTE, (0, 0, 0)]], ids=["none", "257"])
def test_png_refuses_bad_palettes(palette: list[tuple[int, int, int]]) -> None:
    with pytest.raises(ValueError):
        encode_png(np.zeros((2, 2), np.uint8), palette=palette)


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------

label_maps = hnp.arrays(
    np.uint8,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
    elements=st.integers(0, 255) | st.sampled_from([0, 1, 2]),
)


@settings(max_examples=60, deadline=None)
@given(labels=label_maps, use_palette=st.booleans())
def test_round_trip_property(labels: np.ndarray, use_palette: bool) -> None:
    np.testing.assert_array_equal(decode_srle(encode_srle(labels)), labels)
    palette = PALETTE if use_palette else None
    decoded, decoded_palette = decode_png(encode_png(labels, palette=palette))
    np.testing.assert_array_equal(decoded, labels)
    assert decoded_palette == palette


def test_srle_refuses_a_decompression_bomb() -> None:
    header = struct.pack("<4sIIB3x", b"SRL1", 2, 2, 1)
    bomb = header + zlib.compress(b"\0" * 50_000_000, 9)
    with pytest.raises(MaskDecodeError, match="larger than its size allows"):
        decode_srle(bomb)


def test_srle_refuses_trailing_bytes() -> None:
    data = encode_srle(np.zeros((3, 4), dtype=np.uint8))
    with pytest.raises(MaskDecodeError, match="after its end"):
        decode_srle(data + b"extra")
