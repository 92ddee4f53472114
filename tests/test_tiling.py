"""Tiled inference (core/tiling.py) through the real server: the tile plan, exactness against
per-tile answers, the three stitching rules, batching and deadlines of an image's tiles.

The models here see context: a 5x5 box blur with zero padding runs before the colour
classifier, so a pixel's answer depends on where its tile's edges are. A stitch that put a
tile's answer in the wrong place, or cut tiles other than the plan says, would not match."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_client.masks import decode_png
from segserve_server.core.tiling import axis_cuts, axis_starts, axis_weights
from segserve_server.errors import ModelConfigError
from segserve_server.model_repository import parse_config
from segserve_server.server import Server
from segserve_server.training.confidence import add_confidence
from tests.conftest import H, W, encode, make_settings
from tests.harness.synthetic_models import config_pbtxt, write_entry

WEIGHTS = np.array([[-1, -1, -1], [2, -1, -1], [-1, 2, -1], [-1, -1, 2], [1, 1, 1]], np.float32)
BIASES = np.array([0.5, 0, 0, 0, -2.4], dtype=np.float32)


def blurred_colour_model(output: str) -> onnx.ModelProto:
    """The colour classifier after a 5x5 zero-padded box blur: context-dependent answers."""
    nodes = [
        helper.make_node(
            "AveragePool", ["image"], ["blurred"], kernel_shape=[5, 5], pads=[2, 2, 2, 2],
            count_include_pad=1,
        ),
        helper.make_node("Conv", ["blurred", "w", "b"], ["logits"]),
    ]  # fmt: skip
    if output == "labels":
        nodes.append(helper.make_node("ArgMax", ["logits"], ["argmax"], axis=1, keepdims=0))
        nodes.append(helper.make_node("Cast", ["argmax"], ["labels"], to=TensorProto.UINT8))
        out = helper.make_tensor_value_info("labels", TensorProto.UINT8, ["N", H, W])
    else:
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5, H, W])
    graph = helper.make_graph(
        nodes,
        "blurred_colour",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, H, W])],
        [out],
        [
            numpy_helper.from_array(WEIGHTS.reshape(5, 3, 1, 1), "w"),
            numpy_helper.from_array(BIASES, "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def tiling_params(overlap_px: int, scale: float = 1.0, blend: str = "auto") -> str:
    values = {"tiling": "on", "tile_overlap_px": overlap_px, "tile_scale": scale}
    values["tile_blend"] = blend
    return "\n".join(
        f'parameters {{ key: "segserve.{k}" value: {{ string_value: "{v}" }} }}'
        for k, v in values.items()
    )


# name: (output, overlap, blend, with a confidence output)
MODELS = {
    "plain_labels": ("labels", 0, "auto", False),  # tiling off: the per-tile reference
    "plain_logits": ("logits", 0, "auto", False),
    "plain_confident": ("labels", 0, "auto", True),
    "tiled_labels_0": ("labels", 0, "auto", False),
    "tiled_labels_16": ("labels", 16, "auto", False),
    "tiled_logits_16": ("logits", 16, "auto", False),
    "tiled_confident_16": ("labels", 16, "auto", True),
}


def write_models(root: Path) -> None:
    for name, (output, overlap, blend, confident) in MODELS.items():
        extra = "" if name.startswith("plain") else tiling_params(overlap, blend=blend)
        entry = write_entry(root, name, H, W, output=output, max_batch_size=8, extra=extra)
        model = blurred_colour_model(output)
        if confident:
            model = add_confidence(model)
            config = entry / "config.pbtxt"
            text = config.read_text()
            end = text.index("} ]", text.index("output [ {")) + 1
            second = f'{{ name: "confidence" data_type: TYPE_UINT8 dims: [ {H}, {W} ] }}'
            config.write_text(text[:end] + ", " + second + text[end:])
        onnx.save(model, entry / "1" / "model.onnx")
    # Batches only of 4 (or after 30 s): tiles batching together is observable.
    write_entry(
        root, "tiled_batch4", H, W, max_batch_size=4, preferred_batch_sizes=(4,),
        max_queue_delay_us=30_000_000, extra=tiling_params(0),
    )  # fmt: skip
    onnx.save(blurred_colour_model("labels"), root / "tiled_batch4" / "1" / "model.onnx")
    write_entry(root, "tiled_scale2", H, W, extra=tiling_params(8, scale=2.0))


@pytest.fixture(scope="module")
async def stub(tmp_path_factory) -> AsyncIterator[pb_grpc.SegmentationStub]:
    root = tmp_path_factory.mktemp("tiling-repository")
    write_models(root)
    server = Server(make_settings(root, metrics_port=None))
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.SegmentationStub(channel)
    await server.stop(timeout_s=5)


def speckled(height: int, width: int, seed: int) -> np.ndarray:
    """Random flat 6x6 patches of saturated colours: many class edges for the blur to move."""
    rng = np.random.default_rng(seed)
    palette = np.array([(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)])
    cells = rng.integers(0, len(palette), size=(height // 6 + 1, width // 6 + 1))
    image = palette[cells].repeat(6, axis=0).repeat(6, axis=1)[:height, :width]
    return image.astype(np.uint8)


async def segment(
    stub, model: str, image: np.ndarray, *, confidence: bool = False, **options
) -> tuple[np.ndarray, pb.SegmentResponse]:
    response = await stub.Segment(
        pb.SegmentRequest(
            model=model,
            image=pb.Image(encoded=encode(image)),
            encodings=[pb.MASK_ENCODING_RAW],
            include_confidence=confidence,
            **options,
        ),
        timeout=60,
    )
    return np.frombuffer(response.masks[0].data, np.uint8).reshape(
        response.height, response.width
    ), response


def test_plan_covers_the_axis_with_at_least_the_overlap():
    assert axis_starts(64, 64, 16) == (0,)
    assert axis_starts(256, 64, 0) == (0, 64, 128, 192)  # exact multiples: the blocks
    for length, tile, overlap in itertools.product((65, 100, 191, 257, 1000), (48, 64), (0, 7, 23)):
        starts = axis_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == length
        gaps = np.diff(starts)
        assert (gaps <= tile - overlap).all() and (gaps > 0).all(), (length, tile, overlap)
        assert len(starts) == 1 + -(-(length - tile) // (tile - overlap))  # the fewest tiles
        cuts = axis_cuts(starts, tile, length)
        for i, start in enumerate(starts):  # each tile's own pixels lie inside it
            assert start <= cuts[i] < cuts[i + 1] <= start + tile
        for x in range(length):  # and are the pixels nearest its centre
            owner = int(np.searchsorted(cuts, x, side="right")) - 1
            distances = [abs(x + 0.5 - s - tile / 2) for s in starts]
            assert owner == int(np.argmin(distances)), (length, tile, overlap, x)


def test_blend_weights_cross_fade_to_one():
    starts = axis_starts(200, 64, 20)
    total = np.zeros(200, np.float32)
    for i, start in enumerate(starts):
        weights = axis_weights(starts, i, 64)
        assert weights.min() > 0 and weights.max() == 1
        total[start : start + 64] += weights
    np.testing.assert_allclose(total, 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ('"segserve.tiling" value: { string_value: "maybe" }', "segserve.tiling"),
        ('"segserve.tile_overlap_px" value: { string_value: "24" }', "outside 0..23"),
        ('"segserve.tile_overlap_px" value: { string_value: "lots" }', "not a number"),
        ('"segserve.tile_scale" value: { string_value: "0" }', "outside 0.05..64"),
        ('"segserve.tile_blend" value: { string_value: "max" }', "tile_blend"),
        ('"segserve.pipeline" value: { string_value: "device" }', 'pipeline "host" only'),
    ],
)
def test_bad_tiling_parameters_are_named(tmp_path: Path, params: str, message: str):
    (tmp_path / "labels.txt").write_text("a\nb\nc\nd\ne\n")
    extra = 'parameters { key: "segserve.tiling" value: { string_value: "on" } }\n'
    text = config_pbtxt(tmp_path.name, H, W, extra=extra + f"parameters {{ key: {params} }}")
    with pytest.raises(ModelConfigError, match=message):
        parse_config(text, tmp_path)


async def test_get_model_reports_tiling(stub):
    info = await stub.GetModel(pb.GetModelRequest(name="tiled_logits_16"))
    assert info.tiling == pb.TilingInfo(enabled=True, overlap_px=16, scale=1.0, blend="scores")
    info = await stub.GetModel(pb.GetModelRequest(name="tiled_confident_16"))
    assert info.tiling.blend == "confidence"
    info = await stub.GetModel(pb.GetModelRequest(name="plain_labels"))
    assert not info.tiling.enabled and info.tiling.blend == "centre"


@pytest.mark.parametrize("model", ["tiled_labels_0", "tiled_batch4"])
async def test_repeated_blocks_with_no_overlap_equal_the_per_block_answer(stub, model):
    block = speckled(H, W, seed=1)
    expected, _ = await segment(stub, "plain_labels", block)
    big = np.tile(block, (3, 4, 1))  # 144 x 256: 3 x 4 model-sized blocks
    labels, response = await segment(stub, model, big, include_pixel_counts=True)
    np.testing.assert_array_equal(labels, np.tile(expected, (3, 4)))
    if model == "tiled_batch4":  # the 12 tiles ran 4 at a time on the model's one batcher
        assert response.timings.batch_size == 4
    counts = {c.class_id: c.pixel_count for c in response.classes}
    assert counts == {int(c): int((labels == c).sum()) for c in np.unique(labels)}
    # The same image resized to the model is another answer: tiling made the difference.
    resized, _ = await segment(stub, "plain_labels", big)
    assert (resized != labels).mean() > 0.05


async def tile_answers(stub, reference: str, image: np.ndarray, overlap: int):
    """Each tile of the plan, segmented on its own by the untiled model of the same graph."""
    ys, xs = axis_starts(image.shape[0], H, overlap), axis_starts(image.shape[1], W, overlap)
    answers = {}
    for y, x in itertools.product(ys, xs):
        crop = np.ascontiguousarray(image[y : y + H, x : x + W])
        answers[y, x] = await segment(stub, reference, crop, confidence=reference != "plain_labels")
    return ys, xs, answers


async def test_labels_only_take_the_nearest_centre_tile(stub):
    image = speckled(150, 250, seed=2)
    labels, _ = await segment(stub, "tiled_labels_16", image)
    ys, xs, answers = await tile_answers(stub, "plain_labels", image, 16)
    y_cuts, x_cuts = axis_cuts(ys, H, 150), axis_cuts(xs, W, 250)
    assert len(ys) == 5 and len(xs) == 5  # overlaps of 24-26 and 46-47 px
    expected = np.zeros_like(labels)
    for (i, y), (j, x) in itertools.product(enumerate(ys), enumerate(xs)):
        rows, cols = slice(y_cuts[i], y_cuts[i + 1]), slice(x_cuts[j], x_cuts[j + 1])
        tile = answers[y, x][0]
        expected[rows, cols] = tile[rows.start - y : rows.stop - y, cols.start - x : cols.stop - x]
    np.testing.assert_array_equal(labels, expected)


def coverage(ys, xs, height: int, width: int) -> np.ndarray:
    covered = np.zeros((height, width), np.int32)
    for y, x in itertools.product(ys, xs):
        covered[y : y + H, x : x + W] += 1
    return covered


@pytest.mark.parametrize(
    ("model", "reference"),
    [("tiled_logits_16", "plain_logits"), ("tiled_confident_16", "plain_confident")],
)
async def test_overlaps_blend_and_single_tile_regions_are_exact(stub, model, reference):
    image = speckled(150, 250, seed=3)
    labels, response = await segment(stub, model, image, confidence=True)
    confidence, _ = decode_png(response.confidence.data)
    assert confidence.shape == labels.shape == (150, 250)
    ys, xs, answers = await tile_answers(stub, reference, image, 16)
    covered = coverage(ys, xs, 150, 250)
    candidates = np.zeros((len(answers), 150, 250), np.int16) - 1
    for k, ((y, x), (tile, tile_response)) in enumerate(answers.items()):
        own = covered[y : y + H, x : x + W] == 1
        np.testing.assert_array_equal(labels[y : y + H, x : x + W][own], tile[own])
        tile_confidence, _ = decode_png(tile_response.confidence.data)
        got = confidence[y : y + H, x : x + W][own].astype(int)
        assert np.abs(got - tile_confidence[own]).max() <= 1  # rounding of the blend
        candidates[k, y : y + H, x : x + W] = tile
    shared = covered > 1
    assert shared.mean() > 0.2
    agrees = (candidates == labels[None]).any(axis=0)
    if model == "tiled_confident_16":  # always the label of one of the tiles covering it
        assert agrees[shared].all()
    else:  # blended scores: nearly always one of theirs, and not always the nearest centre's
        assert agrees[shared].mean() > 0.99
        centre, _ = await segment(stub, "tiled_labels_16", image)
        assert (centre[shared] != labels[shared]).any()


async def test_tile_scale_answers_at_the_image_size(stub):
    image = np.zeros((192, 256, 3), np.uint8)
    image[:, :128] = (255, 0, 0)
    image[:96, 128:] = (0, 255, 0)
    image[96:, 128:] = (0, 0, 255)  # canvas 96 x 128 at scale 2: 2 x 2 tiles of 48 x 64
    labels, _ = await segment(stub, "tiled_scale2", image)
    assert labels.shape == (192, 256)
    assert (labels[:, :120] == 1).all() and (labels[:90, 136:] == 2).all()
    assert (labels[102:, 136:] == 3).all()
    small, response = await segment(stub, "tiled_scale2", image, output_size=pb.OUTPUT_SIZE_MODEL)
    assert (response.width, response.height) == (128, 96)
    assert (small == labels[::2, ::2]).mean() > 0.99


async def test_small_images_are_not_tiled(stub):
    image = speckled(H, W, seed=4)
    tiled, _ = await segment(stub, "tiled_labels_16", image)
    plain, _ = await segment(stub, "plain_labels", image)
    np.testing.assert_array_equal(tiled, plain)


async def test_the_deadline_covers_every_tile(stub):
    # 6 tiles: the first 4 run, the last 2 wait for a batch of 4 that never comes (30 s).
    image = np.tile(speckled(H, W, seed=5), (2, 3, 1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await segment_with_timeout(stub, "tiled_batch4", image, timeout_s=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Its queued tiles went with it: a full image of 4 tiles runs at once afterwards.
    block = speckled(H, W, seed=6)
    labels, _ = await segment(stub, "tiled_batch4", np.tile(block, (2, 2, 1)))
    assert labels.shape == (2 * H, 2 * W)


async def segment_with_timeout(stub, model: str, image: np.ndarray, *, timeout_s: float):
    return await stub.Segment(
        pb.SegmentRequest(model=model, image=pb.Image(encoded=encode(image))), timeout=timeout_s
    )
