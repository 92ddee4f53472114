"""The fast paths of the request path give the answers of the plain ones.

DCT-scaled JPEG decoding, per-plane normalisation, classes found on the smaller label map, the
batch of one without a copy, ONNX Runtime's CPU lanes and the batch size limit they ask for.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segserve_server.backends.base import SyncBackend
from segserve_server.backends.onnxruntime import OnnxRuntimeBackend, cpu_count
from segserve_server.model_repository import BatchingConfig, parse_config
from segserve_server.pipeline import decode, postprocess
from segserve_server.pipeline.batcher import Batcher, _stack
from segserve_server.pipeline.preprocess import Preprocessor
from tests.conftest import encode, make_settings, quadrant_image
from tests.harness.synthetic_models import write_entry

LIMITS = decode.ImageLimits(40_000_000, 16384)


@pytest.mark.parametrize(
    ("size", "min_size", "expected"),
    [
        ((1920, 1080), (480, 360), (960, 540)),  # 1/4 would be 270 rows: too few
        ((1920, 1440), (480, 360), (480, 360)),  # 1/4 fits exactly
        ((3840, 2160), (480, 360), (960, 540)),
        ((1919, 1079), (480, 360), (960, 540)),  # libjpeg rounds scaled sizes up
        ((600, 450), (480, 360), (0, 0)),  # no fast scale fits: full size
        ((1920, 1080), None, (0, 0)),
    ],
)
def test_dct_scaled_size(
    size: tuple[int, int], min_size: tuple[int, int] | None, expected: tuple[int, int]
) -> None:
    assert decode.dct_scaled_size(*size, min_size) == expected


def test_jpeg_decodes_at_half_scale_and_keeps_its_size():
    big = cv2.resize(quadrant_image(), (1920, 1080), interpolation=cv2.INTER_NEAREST)
    decoded = decode.decode(encode(big, ".jpg"), LIMITS, min_size=(480, 360))
    assert decoded.pixels.shape == (540, 960, 3)
    assert (decoded.original_width, decoded.original_height) == (1920, 1080)
    full = decode.decode(encode(big, ".jpg"), LIMITS)
    assert full.pixels.shape == (1080, 1920, 3)


def _config(tmp_path: Path, dtype: str = "TYPE_FP32", order: str = "RGB"):
    text = f"""name: "m" platform: "onnxruntime_onnx" max_batch_size: 4
input [ {{ name: "image" data_type: {dtype} format: FORMAT_NCHW dims: [ 3, 36, 48 ] }} ]
output [ {{ name: "labels" data_type: TYPE_UINT8 dims: [ 36, 48 ] label_filename: "labels.txt" }} ]
parameters {{ key: "segserve.channel_order" value: {{ string_value: "{order}" }} }}"""
    model_dir = tmp_path / "m"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "labels.txt").write_text("a\nb\n")
    return parse_config(text, model_dir)


@pytest.mark.parametrize(("dtype", "order"), [("TYPE_FP32", "RGB"), ("TYPE_FP16", "BGR")])
def test_preprocess_planes_match_the_formula(tmp_path, dtype, order):
    config = _config(tmp_path, dtype, order)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)
    tensor = Preprocessor(config)(decode.DecodedImage(rgb, "RGB", 96, 72, "raw RGB"))
    assert tensor.shape == (3, 36, 48) and tensor.dtype == config.input_dtype
    assert tensor.flags.c_contiguous
    resized = cv2.resize(rgb, (48, 36), interpolation=cv2.INTER_LINEAR)
    if order == "BGR":
        resized = resized[:, :, ::-1]
    mean, std = np.asarray(config.mean), np.asarray(config.std)
    expected = ((resized / 255.0 - mean) / std).transpose(2, 0, 1)
    tolerance = 1e-5 if dtype == "TYPE_FP32" else 5e-3
    np.testing.assert_allclose(tensor.astype(np.float64), expected, atol=tolerance)


@settings(max_examples=40, deadline=None)
@given(
    source=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    output=st.tuples(st.integers(1, 90), st.integers(1, 90)),
    classes=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_classes_present_and_counts_match_the_full_map(source, output, classes, seed):
    rng = np.random.default_rng(seed)
    model_labels = rng.integers(0, classes, source, dtype=np.uint8)
    labels = postprocess.resize_labels(model_labels, output[1], output[0])
    counts = np.bincount(labels.reshape(-1), minlength=classes)
    np.testing.assert_array_equal(postprocess.class_pixel_counts(labels, classes), counts)
    np.testing.assert_array_equal(
        postprocess.classes_present(model_labels, labels, classes), np.flatnonzero(counts)
    )


def test_a_batch_of_one_is_a_view():
    tensor = np.zeros((3, 4, 5), np.float32)
    assert np.shares_memory(_stack([tensor]), tensor)
    assert _stack([tensor]).shape == (1, 3, 4, 5)
    assert not np.shares_memory(_stack([tensor.transpose(0, 2, 1)]), tensor)
    assert _stack([tensor, tensor]).shape == (2, 3, 4, 5)


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lanes")
    entry = write_entry(root, "lanes", 36, 48, max_batch_size=8, max_queue_delay_us=0)
    return root, entry


def _backend(colour_model, threads: int) -> OnnxRuntimeBackend:
    root, entry = colour_model
    config = parse_config((entry / "config.pbtxt").read_text(), entry)
    settings_ = make_settings(root, ort_intra_op_threads=threads)
    return OnnxRuntimeBackend(config, entry / "1" / config.model_filename, settings_)


def test_cpu_lanes_when_threads_are_left_to_segserve(colour_model):
    lanes = _backend(colour_model, 0)
    assert lanes.max_concurrent_batches == cpu_count()
    assert lanes.batch_size_limit == 1
    configured = _backend(colour_model, 1)
    assert configured.max_concurrent_batches is None and configured.batch_size_limit is None

    rng = np.random.default_rng(2)
    batch = rng.random((1, 3, 36, 48), dtype=np.float32)
    expected = configured.infer(batch)
    results: list[np.ndarray] = []

    def infer_many() -> None:
        results.extend(lanes.infer(batch) for _ in range(5))

    threads = [threading.Thread(target=infer_many) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 15
    for result in results:
        np.testing.assert_array_equal(result, expected)


class RecordingBackend(SyncBackend):
    def __init__(self, limit: int | None) -> None:
        self._limit = limit
        self.sizes: list[int] = []

    @property
    def batch_size_limit(self) -> int | None:
        return self._limit

    @property
    def description(self) -> str:
        return "recording"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        return batch


@pytest.mark.parametrize(
    ("limit", "preferred", "expected_max"),
    [(1, (), 1), (None, (), 6), (1, (6,), 6)],  # explicitly preferred sizes win over the limit
)
async def test_batcher_honours_the_backends_batch_size_limit(limit, preferred, expected_max):
    backend = RecordingBackend(limit)
    config = BatchingConfig(8, preferred, 50_000, 0, enabled=True)
    batcher = Batcher(backend, config, name="recording")
    await batcher.start()
    try:
        inputs = [np.full((2,), i, np.float32) for i in range(6)]
        outcomes = await asyncio.gather(*(batcher.submit(x) for x in inputs))
    finally:
        await batcher.stop(5)
    for x, outcome in zip(inputs, outcomes, strict=True):
        np.testing.assert_array_equal(outcome.output, x)
    assert max(backend.sizes) == expected_max and sum(backend.sizes) == 6
