"""segserve_client.formats: the annotation tools' mask formats, checked against the tools' own
codecs (pycocotools, cvat_sdk.masks, label_studio_converter.brush) and their specifications, on
CamVid label maps, synthetic maps and edge cases."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from segserve_client.formats import (
    coco_rle,
    coco_rle_per_class,
    connected_regions,
    cvat_bitmap,
    cvat_mask,
    cvat_masks_per_class,
    decode_coco_rle,
    decode_cvat_bitmap,
    decode_cvat_mask,
    decode_labelstudio_rle,
    labelstudio_rle,
    labelstudio_rle_per_class,
    polygons_per_class,
    rasterize,
)
from segserve_client.formats.coco import coco_counts, counts_from_string, counts_to_string
from segserve_client.formats.labelstudio import decode_rle_pack, encode_rle_pack
from segserve_client.formats.polygons import polygons
from tests.conftest import CAMVID, ROOT

coco_mask = pytest.importorskip("pycocotools.mask")
cvat_masks = pytest.importorskip("cvat_sdk.masks")

# pycocotools 2.0.11's decode with numpy 2 (its own code, not the masks it is given).
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

VALANNOT = CAMVID / "valannot"
CAMVID_FILES = sorted(VALANNOT.glob("*.png")) if VALANNOT.is_dir() else []
needs_camvid = pytest.mark.skipif(not CAMVID_FILES, reason=f"no CamVid label maps in {VALANNOT}")

# Shapes with 1-pixel and odd sides.
SHAPES = [(1, 1), (1, 9), (9, 1), (2, 2), (5, 7), (7, 5), (31, 17), (64, 48)]
DENSITIES = [0.0, 0.03, 0.5, 0.97, 1.0]


def read_label_map(path: Path) -> np.ndarray:
    labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert labels is not None and labels.ndim == 2 and labels.dtype == np.uint8
    return labels


def camvid_maps(step: int = 1) -> Iterator[tuple[str, np.ndarray]]:
    for path in CAMVID_FILES[::step]:
        yield path.name, read_label_map(path)


def upscaled_camvid() -> np.ndarray:
    """The first CamVid val map at 1920x1080 (nearest neighbour), as the benchmark uses it."""
    labels = read_label_map(CAMVID_FILES[0])
    return cv2.resize(labels, (1920, 1080), interpolation=cv2.INTER_NEAREST)


def random_masks(seed: int = 0) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        for density in DENSITIES:
            yield rng.random(shape) < density
        # A mask whose first pixel (in both orders) is set and last is not, and the reverse.
        corner = np.zeros(shape, dtype=bool)
        corner[0, 0] = True
        yield corner
        yield ~corner


def blocky_map(shape: tuple[int, int], seed: int = 0, classes: int = 12) -> np.ndarray:
    """Rectangles of a few classes over each other, as a segmentation looks."""
    rng = np.random.default_rng(seed)
    height, width = shape
    labels = np.full(shape, rng.integers(0, classes), dtype=np.uint8)
    for _ in range(8):
        y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        labels[y : y + h, x : x + w] = rng.integers(0, classes)
    return labels


def synthetic_maps() -> Iterator[np.ndarray]:
    rng = np.random.default_rng(3)
    for seed, shape in enumerate([(1, 1), (1, 37), (37, 1), (5, 7), (48, 64), (61, 83)]):
        yield blocky_map(shape, seed)
        yield rng.integers(0, 4, size=shape, dtype=np.uint8)
    yield np.zeros((9, 11), dtype=np.uint8)
    yield np.full((9, 11), 7, dtype=np.uint8)


def reference_coco(mask: np.ndarray) -> dict:
    return coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))


# --- COCO ---------------------------------------------------------------------------------------


def test_coco_rle_equals_pycocotools_on_random_and_edge_masks() -> None:
    for mask in random_masks():
        ours = coco_rle(mask)
        ref = reference_coco(mask)
        assert ours["size"] == ref["size"]
        assert ours["counts"] == ref["counts"].decode("ascii")
        assert np.array_equal(coco_mask.decode({**ours, "counts": ours["counts"].encode()}), mask)
        assert np.array_equal(decode_coco_rle(ours), mask)
        assert np.array_equal(decode_coco_rle(ref), mask)


def test_coco_counts_start_with_background() -> None:
    mask = np.array([[True, False], [True, True]])
    # Column-major: T T | F T -> 0 background, 2 set, 1 background, 1 set.
    assert coco_counts(mask).tolist() == [0, 2, 1, 1]
    assert coco_counts(np.zeros((2, 3), dtype=bool)).tolist() == [6]
    assert coco_counts(np.ones((2, 3), dtype=bool)).tolist() == [0, 6]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5_000_000), min_size=1, max_size=40))
def test_coco_string_round_trips_any_counts_as_pycocotools_writes_them(counts: list[int]) -> None:
    """Large counts and negative differences (the delta coding from the 4th count on)."""
    total = sum(counts)
    if total == 0:
        return
    ref = coco_mask.frPyObjects({"counts": counts, "size": [total, 1]}, total, 1)
    text = counts_to_string(counts)
    assert text == ref["counts"].decode("ascii")
    assert counts_from_string(text).tolist() == counts


def test_coco_per_class_equals_pycocotools_on_synthetic_maps() -> None:
    for labels in synthetic_maps():
        check_coco_per_class(labels)


@needs_camvid
def test_coco_per_class_equals_pycocotools_on_camvid() -> None:
    for _, labels in camvid_maps(step=10):
        check_coco_per_class(labels)
    check_coco_per_class(upscaled_camvid())


def check_coco_per_class(labels: np.ndarray) -> None:
    height, width = labels.shape
    classes = coco_rle_per_class(labels)
    assert [c["class_id"] for c in classes] == np.unique(labels).tolist()
    for entry in classes:
        mask = labels == entry["class_id"]
        ref = reference_coco(mask)
        assert entry["rle"] == {"size": [height, width], "counts": ref["counts"].decode()}
        assert entry["area"] == int(coco_mask.area(ref))
        assert entry["bbox"] == coco_mask.toBbox(ref).tolist()
        assert np.array_equal(decode_coco_rle(entry["rle"]), mask)


def test_coco_per_class_names_absent_classes_as_empty() -> None:
    labels = np.array([[1, 1, 2], [2, 2, 2]], dtype=np.uint8)
    classes = coco_rle_per_class(labels, class_ids=[2, 5, 1])
    assert [c["class_id"] for c in classes] == [2, 5, 1]
    empty = classes[1]
    ref = reference_coco(np.zeros_like(labels, dtype=bool))
    assert empty["rle"]["counts"] == ref["counts"].decode()
    assert empty["area"] == 0 and empty["bbox"] == coco_mask.toBbox(ref).tolist() == [0, 0, 0, 0]
    full = coco_rle_per_class(np.full((3, 4), 9, dtype=np.uint8))[0]
    assert full["area"] == 12 and full["bbox"] == [0, 0, 4, 3]


def test_decode_coco_rle_reads_uncompressed_counts_and_rejects_bad_input() -> None:
    mask = np.array([[True, False, True]])
    assert np.array_equal(decode_coco_rle({"size": [1, 3], "counts": [0, 1, 1, 1]}), mask)
    with pytest.raises(ValueError, match="cover"):
        decode_coco_rle({"size": [2, 3], "counts": [0, 1, 1, 1]})
    with pytest.raises(ValueError, match="characters"):
        decode_coco_rle({"size": [1, 3], "counts": "0 1"})
    with pytest.raises(ValueError, match="ends inside"):
        decode_coco_rle({"size": [1, 3], "counts": "1P"})  # 'P' has the "more" bit
    with pytest.raises(ValueError, match="negative"):
        decode_coco_rle({"size": [1, 3], "counts": [4, -1]})
    with pytest.raises(ValueError, match="2-D"):
        coco_rle(np.zeros(5, dtype=bool))


# --- CVAT ---------------------------------------------------------------------------------------


def test_cvat_mask_equals_cvat_sdk_on_random_and_edge_masks() -> None:
    for mask in random_masks(seed=1):
        height, width = mask.shape
        ours = cvat_mask(mask)
        ref = cvat_masks.encode_mask(mask)
        assert ours == ref
        assert all(type(v) is int for v in ours)
        assert np.array_equal(decode_cvat_mask(ours, height, width), mask)
        decoded = cvat_masks.decode_mask(ours, image_width=width, image_height=height)
        assert np.array_equal(decoded, mask)


def test_cvat_mask_layout() -> None:
    mask = np.zeros((4, 6), dtype=bool)
    mask[1, 2:4] = True
    mask[2, 3:5] = True
    # Box x 2..4, y 1..2 (3x2), row-major: T T F | F T T -> 0 background first.
    assert cvat_mask(mask) == [0, 2, 2, 2, 2, 1, 4, 2]
    assert cvat_mask(np.zeros((3, 3), dtype=bool)) == [1, 0, 0, 0, 0]


def test_cvat_per_class_equals_cvat_sdk_on_synthetic_maps() -> None:
    for labels in synthetic_maps():
        check_cvat_per_class(labels)


@needs_camvid
def test_cvat_per_class_and_per_region_on_camvid() -> None:
    for _, labels in camvid_maps(step=10):
        check_cvat_per_class(labels)
    labels = upscaled_camvid()
    check_cvat_per_class(labels, regions=False)
    shapes = cvat_masks_per_class(labels, connectivity=8)
    for class_id in np.unique(labels).tolist():
        count, _ = cv2.connectedComponents((labels == class_id).view(np.uint8), connectivity=8)
        assert len([s for s in shapes if s["class_id"] == class_id]) == count - 1


def check_cvat_per_class(labels: np.ndarray, regions: bool = True) -> None:
    height, width = labels.shape
    shapes = cvat_masks_per_class(labels)
    assert [s["class_id"] for s in shapes] == np.unique(labels).tolist()
    for shape in shapes:
        mask = labels == shape["class_id"]
        assert shape["points"] == cvat_masks.encode_mask(mask)
        assert np.array_equal(decode_cvat_mask(shape["points"], height, width), mask)
    for connectivity in (4, 8) if regions else ():
        shapes = cvat_masks_per_class(labels, connectivity=connectivity)
        for class_id in np.unique(labels).tolist():
            mask = labels == class_id
            count, components = cv2.connectedComponents(
                mask.view(np.uint8), connectivity=connectivity
            )
            mine = [s for s in shapes if s["class_id"] == class_id]
            assert len(mine) == count - 1
            pieces = [decode_cvat_mask(s["points"], height, width) for s in mine]
            covered = np.zeros_like(mask)
            for piece in pieces:
                assert piece.any() and not (covered & piece).any()
                covered |= piece
                # Each piece is exactly one of OpenCV's components.
                ids = np.unique(components[piece])
                assert ids.size == 1 and np.array_equal(components == ids[0], piece)
            assert np.array_equal(covered, mask)
            firsts = [int(np.flatnonzero(piece.reshape(-1))[0]) for piece in pieces]
            assert firsts == sorted(firsts)
        for shape in shapes:
            piece = decode_cvat_mask(shape["points"], height, width)
            assert shape["points"] == cvat_masks.encode_mask(piece)


def test_connectivity_4_and_8_differ_on_diagonals() -> None:
    mask = np.eye(4, dtype=bool)
    assert connected_regions(mask, 8)[1] == 1
    assert connected_regions(mask, 4)[1] == 4
    labels = np.where(mask, 3, 0).astype(np.uint8)
    assert len([s for s in cvat_masks_per_class(labels, connectivity=8) if s["class_id"] == 3]) == 1
    assert len([s for s in cvat_masks_per_class(labels, connectivity=4) if s["class_id"] == 3]) == 4
    # A serpentine: one region, a chain of runs joined alternately at the left and right ends,
    # and a comb whose teeth join only through the bottom row (several hooking rounds).
    serpentine = np.zeros((41, 30), dtype=bool)
    serpentine[::2] = True
    serpentine[1::4, -1] = True
    serpentine[3::4, 0] = True
    comb = np.zeros((30, 41), dtype=bool)
    comb[:, ::2] = True
    comb[-1] = True
    for mask in (serpentine, comb):
        for connectivity in (4, 8):
            regions, count = connected_regions(mask, connectivity)
            assert count == 1 and np.array_equal(regions == 1, mask)


def test_connected_regions_match_opencv_on_random_masks() -> None:
    for mask in random_masks(seed=2):
        for connectivity in (4, 8):
            regions, count = connected_regions(mask, connectivity)
            ref_count, ref = cv2.connectedComponents(mask.view(np.uint8), connectivity=connectivity)
            assert count == ref_count - 1
            assert np.array_equal(regions == 0, ~mask)
            pairs = set(zip(regions[mask].tolist(), ref[mask].tolist(), strict=True))
            assert len(pairs) == count
            # Numbered in row-major order of each region's first pixel.
            firsts = [int(np.flatnonzero(regions.reshape(-1) == i)[0]) for i in range(1, count + 1)]
            assert firsts == sorted(firsts)


def test_cvat_bitmap_is_the_serverless_layout() -> None:
    mask = np.zeros((4, 6), dtype=bool)
    mask[1, 2:4] = True
    mask[2, 3:5] = True
    assert cvat_bitmap(mask) == [1, 1, 0, 0, 1, 1, 2, 1, 4, 2]
    for mask in random_masks(seed=3):
        height, width = mask.shape
        bitmap = cvat_bitmap(mask)
        assert np.array_equal(decode_cvat_bitmap(bitmap, height, width), mask)
        # CVAT's lambda manager turns the bitmap into points: the same as cvat_mask.
        flat = np.array(bitmap[:-4])
        runs = np.diff(np.flatnonzero(np.diff(flat, prepend=1 - flat[0], append=1 - flat[-1])))
        expected = ([0] if flat[0] else []) + runs.tolist() + bitmap[-4:]
        assert cvat_mask(mask) == expected


def test_decode_cvat_mask_rejects_bad_points() -> None:
    with pytest.raises(ValueError, match="at least"):
        decode_cvat_mask([0, 0, 0, 0], 3, 3)
    with pytest.raises(ValueError, match="box"):
        decode_cvat_mask([1, 0, 0, 3, 0], 3, 3)
    with pytest.raises(ValueError, match="cover"):
        decode_cvat_mask([2, 0, 0, 0, 0], 3, 3)
    with pytest.raises(ValueError, match="integers"):
        decode_cvat_mask([0.5, 0.5, 0, 0, 0, 0], 3, 3)


# --- Label Studio brush -------------------------------------------------------------------------
# The format, transcribed bit by bit from its description (rle-pack as Label Studio's converter
# writes it): an encoder and a decoder over strings of '0' and '1', for small inputs.


def spec_encode(values: list[int]) -> list[int]:
    bits = f"{len(values):032b}" + f"{8 - 1:05b}" + "".join(f"{s - 1:04b}" for s in (3, 4, 8, 16))
    for value, group in itertools.groupby(values):
        n = len(list(group))
        word = f"{value:08b}"
        if n == 1:
            bits += "0" + "00" + "000" + word  # a literal of one value
        elif n <= 8:
            bits += "1" + "00" + f"{n - 1:03b}" + word
        elif n <= 16:
            bits += "1" + "01" + f"{n - 1:04b}" + word
        elif n <= 256:
            bits += "1" + "10" + f"{n - 1:08b}" + word
        else:
            while n > 2**16:
                bits += "1" + "11" + f"{2**16 - 1:016b}" + word
                n -= 2**16
            bits += "1" + "11" + f"{n - 1:016b}" + word
    bits += "0" * (8 - len(bits) % 8)  # 1 to 8 zero bits
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def spec_decode(data: list[int]) -> list[int]:
    bits = "".join(f"{b:08b}" for b in data)
    position = 0

    def read(width: int) -> int:
        nonlocal position
        value = int(bits[position : position + width], 2)
        position += width
        return value

    count = read(32)
    word_size = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out: list[int] = []
    while len(out) < count:
        repeated = read(1)
        length = 1 + read(sizes[read(2)])
        if repeated:
            out += [read(word_size)] * length
        else:
            out += [read(word_size) for _ in range(length)]
    return out


def rgba_values(alpha: np.ndarray) -> list[int]:
    return np.repeat(alpha.reshape(-1), 4).tolist()


def test_labelstudio_header_and_a_hand_made_stream() -> None:
    # 1x1, set: 4 values of 255 = one repeated run of 4.
    bits = (
        f"{4:032b}"
        + "00111"
        + "0010" + "0011" + "0111" + "1111"
        + "1" + "00" + "011" + "11111111"
    )  # fmt: skip
    bits += "0" * (8 - len(bits) % 8)
    expected = [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]
    assert labelstudio_rle(np.ones((1, 1), dtype=bool)) == expected
    assert spec_encode([255] * 4) == expected


def test_labelstudio_rle_matches_the_specification() -> None:
    rng = np.random.default_rng(4)
    for mask in random_masks(seed=4):
        alpha = mask.astype(np.uint8) * 255
        ours = labelstudio_rle(mask)
        assert ours == labelstudio_rle(alpha)
        assert ours == spec_encode(rgba_values(alpha))
        assert spec_decode(ours) == rgba_values(alpha)
        assert np.array_equal(decode_labelstudio_rle(ours, *mask.shape), alpha)
        grey = (rng.integers(0, 3, size=mask.shape) * 100).astype(np.uint8)
        assert labelstudio_rle(grey) == spec_encode(rgba_values(grey))


def test_labelstudio_long_runs_and_byte_aligned_ends() -> None:
    """Run lengths (in RGBA values) across the size limits, and 65536 pieces; a stream that
    ends on a byte boundary still gets a zero byte of padding."""
    for side in (1, 2, 3, 4, 5, 64, 65, 16384, 16385, 40000):
        mask = np.zeros((1, side + 2), dtype=bool)
        mask[0, 1 : side + 1] = True
        ours = labelstudio_rle(mask)
        values = rgba_values(mask.astype(np.uint8) * 255)
        assert ours == spec_encode(values)
        assert decode_rle_pack(ours).tolist() == values
    big = np.ones((300, 500), dtype=bool)  # one run of 600,000 values: 10 pieces
    assert labelstudio_rle(big) == spec_encode(rgba_values(big.astype(np.uint8) * 255))
    # Five runs of 3 pixels (12 values, 15 bits each) after the 53-bit header: 128 bits, on a
    # byte boundary, and still a zero byte of padding.
    mask = np.array([[1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1]], dtype=bool)
    stream = labelstudio_rle(mask)
    assert len(stream) == 128 // 8 + 1 and stream[-1] == 0
    assert stream == spec_encode(rgba_values(mask.astype(np.uint8) * 255))


def test_rle_pack_of_any_runs() -> None:
    """Runs of any length (not only multiples of 4): single values are literals; a long run's
    last piece of 1 is still a repeated run."""
    for lengths in (
        [1],
        [1, 2, 1],
        [65536, 1],
        [65537, 3],
        [131073],
        [257, 256, 255],
        [16, 17, 8, 9],
    ):
        values = np.concatenate(
            [np.full(n, (37 * i) % 256, dtype=np.uint8) for i, n in enumerate(lengths)]
        )
        stream = encode_rle_pack(values)
        assert stream == spec_encode(values.tolist())
        assert np.array_equal(decode_rle_pack(stream), values)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([0, 1, 255]), st.integers(1, 300)), min_size=1, max_size=12)
)
def test_rle_pack_property(runs: list[tuple[int, int]]) -> None:
    values = np.concatenate([np.full(n, v, dtype=np.uint8) for v, n in runs])
    stream = encode_rle_pack(values)
    assert stream == spec_encode(values.tolist())
    assert spec_decode(stream) == values.tolist()
    assert np.array_equal(decode_rle_pack(stream), values)


def test_decode_labelstudio_reads_literal_runs() -> None:
    # Literal runs of length 1 (the converter's only literals) and longer literal runs.
    values = [3, 1, 4, 1, 5, 9, 9, 9, 2, 6]
    assert decode_rle_pack(spec_encode(values)).tolist() == values
    bits = f"{4:032b}" + "00111" + "0010" + "0011" + "0111" + "1111" + "0" + "00" + "011"
    bits += "".join(f"{v:08b}" for v in (10, 20, 30, 40))
    bits += "0" * (8 - len(bits) % 8)
    stream = [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]
    assert decode_rle_pack(stream).tolist() == [10, 20, 30, 40]
    with pytest.raises(ValueError, match="ends early"):
        decode_rle_pack(stream[:-3])
    with pytest.raises(ValueError, match="not 2x2x4"):
        decode_labelstudio_rle(labelstudio_rle(np.ones((1, 1), dtype=bool)), 2, 2)


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(
        np.uint8,
        hnp.array_shapes(min_dims=2, max_dims=2, max_side=12),
        elements=st.sampled_from([0, 0, 255, 17]),
    )
)
def test_labelstudio_property(alpha: np.ndarray) -> None:
    ours = labelstudio_rle(alpha)
    assert ours == spec_encode(rgba_values(alpha))
    assert np.array_equal(decode_labelstudio_rle(ours, *alpha.shape), alpha)


def check_labelstudio_per_class(labels: np.ndarray, reference: Any = None) -> None:
    for entry in labelstudio_rle_per_class(labels):
        alpha = (labels == entry["class_id"]).astype(np.uint8) * 255
        assert entry["rle"] == labelstudio_rle(alpha)
        assert np.array_equal(decode_labelstudio_rle(entry["rle"], *labels.shape), alpha)
        if reference is not None:
            assert entry["rle"] == reference.mask2rle(alpha)
            decoded = reference.decode_rle(entry["rle"])
            assert np.array_equal(decoded.reshape(*labels.shape, 4)[:, :, 3], alpha)


def test_labelstudio_per_class_on_synthetic_maps() -> None:
    for labels in synthetic_maps():
        check_labelstudio_per_class(labels)
        for entry in labelstudio_rle_per_class(labels):
            if labels.size <= 400:
                alpha = (labels == entry["class_id"]).astype(np.uint8) * 255
                assert entry["rle"] == spec_encode(rgba_values(alpha))


def label_studio_brush() -> Any:
    for name in ("label_studio_converter.brush", "label_studio_sdk.converter.brush"):
        try:
            return __import__(name, fromlist=["brush"])
        except ImportError:
            continue
    return None


@needs_camvid
def test_labelstudio_per_class_on_camvid_against_the_converter() -> None:
    brush = label_studio_brush()
    if brush is None:
        pytest.skip("label_studio_converter (or label-studio-sdk) is not installed")
    for _, labels in camvid_maps(step=25):
        check_labelstudio_per_class(labels, brush)
    labels = upscaled_camvid()
    for entry in labelstudio_rle_per_class(labels, class_ids=[0, 3]):
        alpha = (labels == entry["class_id"]).astype(np.uint8) * 255
        assert entry["rle"] == brush.mask2rle(alpha)


def test_rle_pack_against_the_converter() -> None:
    brush = label_studio_brush()
    if brush is None:
        pytest.skip("label_studio_converter (or label-studio-sdk) is not installed")
    rng = np.random.default_rng(7)
    for lengths in ([1], [1, 2, 1], [65536, 1], [65537, 3], [131073], [257, 256, 255]):
        values = np.concatenate(
            [np.full(n, (37 * i) % 256, dtype=np.uint8) for i, n in enumerate(lengths)]
        )
        assert encode_rle_pack(values) == brush.encode_rle(values)
    noisy = rng.integers(0, 3, size=5000).astype(np.uint8)
    assert encode_rle_pack(noisy) == brush.encode_rle(noisy)
    assert np.array_equal(decode_rle_pack(brush.encode_rle(noisy)), noisy)


REFERENCE_SCRIPT = """
import json, sys
import numpy as np
try:
    from label_studio_converter import brush
except ImportError:
    from label_studio_sdk.converter import brush
masks = np.load(sys.argv[1])
out = {}
for name in masks.files:
    alpha = masks[name]
    out[name] = {"rle": brush.mask2rle(alpha)}
print(json.dumps(out))
"""


def test_labelstudio_against_a_converter_in_another_python(tmp_path: Path) -> None:
    """SEGSERVE_LABEL_STUDIO_PYTHON: a Python (its own venv) with label-studio-converter or
    label-studio-sdk, where they cannot join this one."""
    python = os.environ.get("SEGSERVE_LABEL_STUDIO_PYTHON")
    if not python or not Path(python).exists():
        pytest.skip("SEGSERVE_LABEL_STUDIO_PYTHON is not set to a Python with the converter")
    masks = [m.astype(np.uint8) * 255 for m in random_masks(seed=5)]
    if CAMVID_FILES:
        labels = read_label_map(CAMVID_FILES[0])
        masks += [(labels == c).astype(np.uint8) * 255 for c in np.unique(labels).tolist()]
    path = tmp_path / "masks.npz"
    np.savez(path, *masks)
    done = subprocess.run(
        [python, "-c", REFERENCE_SCRIPT, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    reference = json.loads(done.stdout)
    for index, alpha in enumerate(masks):
        assert labelstudio_rle(alpha) == reference[f"arr_{index}"]["rle"], index


# --- polygons -----------------------------------------------------------------------------------


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def shapes_mask() -> np.ndarray:
    mask = np.zeros((40, 50), dtype=bool)
    mask[2:30, 2:30] = True
    mask[8:22, 8:22] = False  # a hole
    mask[12:16, 12:16] = True  # an island in the hole
    mask[25, 40] = True  # one pixel
    mask[33, 5:45] = True  # a 1-pixel line
    mask[0:40, 47] = True  # a column touching two borders
    mask[35:39, 30:34] = np.eye(4, dtype=bool)  # a diagonal (8-connected)
    mask[3:6, 35:45] = True
    mask[4, 37] = False  # a 1-pixel hole
    return mask


def test_polygons_structure() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[1:9, 1:9] = True
    mask[3:6, 3:6] = False
    (region,) = polygons(mask, tolerance_px=0)
    assert sorted(map(tuple, region["outer"])) == [(1, 1), (1, 8), (8, 1), (8, 8)]
    (hole,) = region["holes"]
    assert all(isinstance(v, int) for point in hole for v in point)
    assert np.array_equal(rasterize([region], 10, 12), mask)
    assert polygons(np.zeros((3, 3), dtype=bool)) == []


def test_polygons_at_tolerance_0_give_back_the_mask_exactly() -> None:
    mask = shapes_mask()
    regions = polygons(mask, tolerance_px=0)
    assert len(regions) == len([r for r in regions if r["outer"]])
    assert np.array_equal(rasterize(regions, *mask.shape), mask)
    for shape in [(1, 1), (1, 9), (9, 1), (5, 7)]:
        for density in DENSITIES:
            m = np.random.default_rng(6).random(shape) < density
            assert np.array_equal(rasterize(polygons(m, tolerance_px=0), *shape), m)
    for labels in synthetic_maps():
        for entry in polygons_per_class(labels, tolerance_px=0):
            got = rasterize(entry["regions"], *labels.shape)
            assert np.array_equal(got, labels == entry["class_id"])


@needs_camvid
def test_polygons_iou_on_camvid() -> None:
    """Measured on the 101 CamVid val maps (480x360): tolerance 0 gives every class back exactly;
    tolerance 1 px gives a pixel-weighted IoU per map of 0.980 at worst (mean 0.986) and 0.973
    at worst for classes of 10,000 pixels or more; thin classes (poles, signs) lose most. On a
    map upscaled to 1920x1080 tolerance 1 gives 0.996."""
    worst_map = worst_large_class = 1.0
    for _, labels in camvid_maps():
        exact = polygons_per_class(labels, tolerance_px=0)
        for entry in exact:
            got = rasterize(entry["regions"], *labels.shape)
            assert np.array_equal(got, labels == entry["class_id"])
        inter = union = 0
        for entry in polygons_per_class(labels, tolerance_px=1.0):
            mask = labels == entry["class_id"]
            got = rasterize(entry["regions"], *labels.shape)
            inter += int(np.count_nonzero(mask & got))
            union += int(np.count_nonzero(mask | got))
            if mask.sum() >= 10_000:
                worst_large_class = min(worst_large_class, iou(mask, got))
        worst_map = min(worst_map, inter / union)
    assert worst_map >= 0.97
    assert worst_large_class >= 0.96
    labels = upscaled_camvid()
    inter = union = 0
    for entry in polygons_per_class(labels, tolerance_px=1.0):
        mask = labels == entry["class_id"]
        got = rasterize(entry["regions"], *labels.shape)
        inter += int(np.count_nonzero(mask & got))
        union += int(np.count_nonzero(mask | got))
    assert inter / union >= 0.99


def test_polygons_per_class_absent_classes_and_offsets() -> None:
    labels = np.zeros((6, 8), dtype=np.uint8)
    labels[4:6, 5:8] = 2
    entries = polygons_per_class(labels, class_ids=[2, 7], tolerance_px=0)
    assert entries[1] == {"class_id": 7, "regions": []}
    (region,) = entries[0]["regions"]
    assert sorted(map(tuple, region["outer"])) == [(5, 4), (5, 5), (7, 4), (7, 5)]
    with pytest.raises(ValueError, match="tolerance"):
        polygons(labels == 2, tolerance_px=-1)


NO_CV2 = """
import sys
sys.modules["cv2"] = None  # importing cv2 fails
import numpy as np
import segserve_client.formats as f
mask = np.zeros((4, 5), dtype=bool); mask[1:3, 1:4] = True
labels = mask.astype(np.uint8)
assert np.array_equal(f.decode_coco_rle(f.coco_rle(mask)), mask)
assert np.array_equal(f.decode_cvat_mask(f.cvat_mask(mask), 4, 5), mask)
assert f.cvat_masks_per_class(labels, connectivity=8)
assert (f.decode_labelstudio_rle(f.labelstudio_rle(mask), 4, 5) > 0).sum() == 6
assert "cv2" not in [m for m in sys.modules if sys.modules[m] is not None]
try:
    f.polygons.polygons(mask)
except ImportError as exc:
    assert "opencv-python-headless" in str(exc), exc
    print("ok")
"""


def test_formats_work_without_opencv_except_polygons() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_CV2],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT / "clients")},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@needs_camvid
def test_encodings_benchmark_runs() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "encodings.py"),
            "--runs",
            "1",
            "--size",
            "640x360",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "| COCO RLE per class |" in done.stdout
    assert "| Label Studio brush RLE per class |" in done.stdout
