"""Label Studio brush masks: the `rle` of a `brushlabels` result, encoded with numpy alone.

Label Studio stores a brush mask as thi-ng's `rle-pack` bitstream over the image's flattened
RGBA bytes (H*W*4, row-major; the mask is the alpha channel, and the converter's `mask2rle`
repeats each mask value 4 times), given as a list of byte values. The stream, most significant
bit first:

- header: the element count (32 bits), word size - 1 (5 bits; the word size is 8), then the four
  run-size fields, each size - 1 in 4 bits (sizes 3, 4, 8 and 16);
- each run: 1 flag bit (1 = one value repeated, 0 = literal values), a 2-bit index into the run
  sizes, the run length - 1 in that many bits, then the value (repeated) or the values (literal),
  8 bits each;
- zero bits up to the next byte boundary.

`labelstudio_rle` reproduces the converter's `brush.encode_rle` byte for byte
(label_studio_converter 0.0.59, and label-studio-sdk's `converter.brush`), its choice of run
encodings included: a run of 1 is a literal of one value, runs of 2-8, 9-16 and 17-256 use the
3-, 4- and 8-bit sizes, longer runs the 16-bit size in pieces of 65536 and a remainder; and,
like it, it pads a stream that already ends on a byte boundary with one more zero byte. The
reference builds a string of '0' and '1' in Python (all 12 classes of a 1920x1080 CamVid map
in about 150 ms, a random 640x480 mask in 190 ms); this one packs the bits with numpy from the
runs of the (H, W) mask, never building the H*W*4 array (benchmarks/encodings.py).
`decode_labelstudio_rle` reads any rle-pack stream (literal runs, word sizes up to 8) with one
Python step per run and returns the alpha channel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypedDict

import numpy as np
import numpy.typing as npt

__all__ = [
    "LabelStudioClassMask",
    "decode_labelstudio_rle",
    "decode_rle_pack",
    "encode_rle_pack",
    "labelstudio_rle",
    "labelstudio_rle_per_class",
]

_WORD_SIZE = 8
_RUN_SIZES = (3, 4, 8, 16)
_CHANNELS = 4
_PIECE = 1 << 16


class LabelStudioClassMask(TypedDict):
    """One class of a label map as a brush `rle` (the value of the alpha channel is 255)."""

    class_id: int
    rle: list[int]


def _header_fields(count: int) -> tuple[list[int], list[int]]:
    codes = [count, _WORD_SIZE - 1, *(size - 1 for size in _RUN_SIZES)]
    widths = [32, 5, 4, 4, 4, 4]
    return codes, widths


def _pack(codes: npt.NDArray[np.int64], widths: npt.NDArray[np.int64]) -> list[int]:
    """Concatenates bit fields (each at most 32 bits, most significant bit first) into bytes,
    with the converter's padding: 1 to 8 zero bits, up to the next byte boundary."""
    ends = np.cumsum(widths)
    total_bits = int(ends[-1])
    n_bytes = total_bits // 8 + 1
    n_words = (total_bits >> 5) + 2
    offsets = ends - widths
    word = offsets >> 5
    # The field in a 64-bit window starting at its word: the high half lands in that word, the
    # low half in the next. Fields never overlap, so adding their parts is or-ing them.
    window = codes.astype(np.uint64) << (64 - (offsets & 31) - widths).astype(np.uint64)
    high = (window >> np.uint64(32)).astype(np.float64)
    low = (window & np.uint64(0xFFFFFFFF)).astype(np.float64)
    words = np.bincount(word, weights=high, minlength=n_words)
    words += np.bincount(word + 1, weights=low, minlength=n_words)
    data = words.astype(np.uint32).astype(">u4").tobytes()[:n_bytes]
    return list(data)


def _stream_of_runs(
    lengths: npt.NDArray[np.int64], values: npt.NDArray[np.uint8], count: int
) -> list[int]:
    """The converter's encoding of runs (lengths >= 1, consecutive values different)."""
    long_run = lengths > 256
    pieces = np.where(long_run, (lengths + _PIECE - 1) // _PIECE, 1)
    piece_length = np.repeat(lengths, pieces)
    piece_value = np.repeat(values.astype(np.int64), pieces)
    piece_long = np.repeat(long_run, pieces)
    # Pieces of a long run: full 65536s, then the remainder (1 to 65536).
    if long_run.any():
        last = np.cumsum(pieces) - 1
        first = last - pieces + 1
        index = np.arange(piece_length.size) - np.repeat(first, pieces)
        remainder = lengths - (pieces - 1) * _PIECE
        piece_length = np.where(
            piece_long & (index < np.repeat(pieces - 1, pieces)),
            _PIECE,
            np.where(piece_long, np.repeat(remainder, pieces), piece_length),
        )
    n = piece_length.size
    size_index = np.select(
        [piece_long, piece_length <= 8, piece_length <= 16], [3, 0, 1], default=2
    ).astype(np.int64)
    size_bits = np.asarray(_RUN_SIZES, dtype=np.int64)[size_index]
    # The converter writes a run of 1 as a literal, except the last piece of a long run.
    repeated = ((piece_length > 1) | piece_long).astype(np.int64)
    # flag (1) | size index (2) | length - 1 (size bits) | value (8)
    codes = (
        (repeated << (size_bits + 10))
        | (size_index << (size_bits + 8))
        | ((piece_length - 1) << 8)
        | piece_value
    )
    widths = 3 + size_bits + _WORD_SIZE
    head_codes, head_widths = _header_fields(count)
    all_codes = np.empty(n + len(head_codes), dtype=np.int64)
    all_widths = np.empty_like(all_codes)
    all_codes[: len(head_codes)] = head_codes
    all_widths[: len(head_codes)] = head_widths
    all_codes[len(head_codes) :] = codes
    all_widths[len(head_codes) :] = widths
    return _pack(all_codes, all_widths)


def _alpha(mask: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    array = np.asarray(mask)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"a mask is a non-empty 2-D array, got shape {array.shape}")
    if array.dtype == np.bool_:
        return array.view(np.uint8) * np.uint8(255)
    if array.dtype != np.uint8:
        raise ValueError(f"a brush mask is bool or uint8 alpha, got {array.dtype}")
    return array


def encode_rle_pack(values: npt.ArrayLike) -> list[int]:
    """Any flat uint8 array as rle-pack bytes, as the converter's `brush.encode_rle` writes it."""
    flat = np.asarray(values)
    if flat.ndim != 1 or flat.size == 0 or flat.dtype != np.uint8:
        raise ValueError(
            f"rle-pack values are a non-empty 1-D uint8 array, got {flat.dtype} {flat.shape}"
        )
    if flat.size >= 1 << 32:
        raise ValueError(f"rle-pack holds fewer than 2**32 values, not {flat.size}")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    return _stream_of_runs(np.diff(bounds), flat[bounds[:-1]], flat.size)


def _check_count(pixels: int) -> None:
    if pixels * _CHANNELS >= 1 << 32:
        raise ValueError(f"a brush holds fewer than 2**32 RGBA values, not {pixels}x{_CHANNELS}")


def labelstudio_rle(mask: npt.ArrayLike) -> list[int]:
    """A 2-D mask as a Label Studio brush `rle`: bool (set = alpha 255) or uint8 alpha values.

    Byte for byte what `label_studio_converter.brush.mask2rle(alpha)` returns.
    """
    alpha = _alpha(mask)
    _check_count(alpha.size)
    flat = np.ascontiguousarray(alpha).reshape(-1)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    lengths = np.diff(bounds) * _CHANNELS
    return _stream_of_runs(lengths, flat[bounds[:-1]], flat.size * _CHANNELS)


def labelstudio_rle_per_class(
    labels: npt.ArrayLike, class_ids: Iterable[int] | None = None
) -> list[LabelStudioClassMask]:
    """One brush `rle` per class of a (H, W) label map (alpha 255 on the class), from one pass.

    `class_ids` None: the classes present, in increasing order; given: those, absent ones left
    out (an empty brush is no annotation).
    """
    array = np.asarray(labels)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"a label map is a non-empty 2-D array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"a label map holds integer class ids, got {array.dtype}")
    _check_count(array.size)
    flat = np.ascontiguousarray(array).reshape(-1)
    total = flat.size
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], changes))
    ends = np.concatenate((changes, [total]))
    values = flat[starts]
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    wanted = (
        [int(c) for c in np.unique(sorted_values)]
        if class_ids is None
        else [int(c) for c in class_ids]
    )
    result: list[LabelStudioClassMask] = []
    for class_id in wanted:
        lo = int(np.searchsorted(sorted_values, class_id, side="left"))
        hi = int(np.searchsorted(sorted_values, class_id, side="right"))
        if lo == hi:
            continue
        runs = order[lo:hi]
        bounds = np.empty(2 * runs.size + 2, dtype=np.int64)
        bounds[0] = 0
        bounds[1:-1:2] = starts[runs]
        bounds[2:-1:2] = ends[runs]
        bounds[-1] = total
        lengths = np.diff(bounds)
        run_values = np.zeros(lengths.size, dtype=np.uint8)
        run_values[1::2] = 255
        # Drop the empty background runs at either end (a class run never touches another).
        keep = lengths > 0
        result.append(
            {
                "class_id": class_id,
                "rle": _stream_of_runs(
                    lengths[keep] * _CHANNELS, run_values[keep], total * _CHANNELS
                ),
            }
        )
    return result


def _rle_pack_runs(rle: Sequence[int] | bytes) -> tuple[npt.NDArray[np.uint8], list[int]]:
    """Reads an rle-pack stream (word size up to 8) as runs: (values, lengths).

    One Python step per run or literal value, never per repeated value.
    """
    data = bytes(rle)
    size = 8 * len(data)
    if size < 53:
        raise ValueError("the rle-pack stream is shorter than its header")
    # windows[b]: the 40 bits from byte b on, so any field of up to 32 bits is one lookup.
    padded = np.frombuffer(data + b"\0" * 4, dtype=np.uint8).astype(np.int64)
    windows: list[int] = (
        (padded[:-4] << 32)
        | (padded[1:-3] << 24)
        | (padded[2:-2] << 16)
        | (padded[3:-1] << 8)
        | padded[4:]
    ).tolist()

    def read(position: int, width: int) -> int:
        return (windows[position >> 3] >> (40 - (position & 7) - width)) & ((1 << width) - 1)

    count = read(0, 32)
    word_size = read(32, 5) + 1
    if word_size > 8:
        raise ValueError(f"word size {word_size} does not fit uint8 values")
    sizes = [read(37 + 4 * i, 4) + 1 for i in range(4)]
    # Every run takes at least 3 + word_size bits: a larger count is corrupt input.
    if count > (size - 53) // (word_size + 3) * (1 << max(sizes)):
        raise ValueError(f"the rle-pack stream cannot hold {count} values")
    word_mask = (1 << word_size) - 1
    run_values: list[int] = []
    run_lengths: list[int] = []
    done = 0
    position = 53
    while done < count:
        if position + 3 + word_size > size:
            raise ValueError("the rle-pack stream ends early")
        # The 32 bits from here hold the flag, the size index, the length and (repeated) the
        # value: 3 + 16 + 8 bits at most.
        head = (windows[position >> 3] >> (8 - (position & 7))) & 0xFFFFFFFF
        bits = sizes[(head >> 29) & 3]
        length = ((head >> (29 - bits)) & ((1 << bits) - 1)) + 1
        if head >> 31:
            run_values.append((head >> (29 - bits - word_size)) & word_mask)
            run_lengths.append(length)
            position += 3 + bits + word_size
        else:
            position += 3 + bits
            if position + length * word_size > size:
                raise ValueError("the rle-pack stream ends early")
            for _ in range(length):
                run_values.append(read(position, word_size))
                position += word_size
            run_lengths.extend([1] * length)
        done += length
    if position > size:
        raise ValueError("the rle-pack stream ends early")
    if done != count:
        raise ValueError(f"the rle-pack runs give {done} values, not {count}")
    return np.asarray(run_values, dtype=np.uint8), run_lengths


def decode_rle_pack(rle: Sequence[int] | bytes) -> npt.NDArray[np.uint8]:
    """Decodes an rle-pack stream (word size up to 8) to its flat uint8 values."""
    values, lengths = _rle_pack_runs(rle)
    return np.repeat(values, lengths)


def decode_labelstudio_rle(
    rle: Sequence[int] | bytes, height: int, width: int
) -> npt.NDArray[np.uint8]:
    """A Label Studio brush `rle` to its (height, width) uint8 alpha channel (0 = not set)."""
    values, lengths = _rle_pack_runs(rle)
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
    total = int(ends[-1]) if ends.size else 0
    if total != height * width * _CHANNELS:
        raise ValueError(f"the brush holds {total} values, not {height}x{width}x{_CHANNELS}")
    # The alpha values are elements 3, 7, 11, ...: those before element x number x // 4.
    before = ends // _CHANNELS
    per_run = np.diff(before, prepend=0)
    return np.repeat(values, per_run).reshape(height, width)
