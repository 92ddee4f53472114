"""Confidence for review routing through the real server: a label model with a confidence
output (added to its graph by tools/add_confidence.py), a scores model (softmax in the server),
and a labels-only model (FAILED_PRECONDITION)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_client.masks import decode_png
from segserve_server.errors import ModelConfigError
from segserve_server.model_repository import parse_config
from segserve_server.server import Server
from tests.conftest import H, W, encode, make_settings
from tests.harness.synthetic_models import (
    confidence_output,
    config_pbtxt,
    with_second_output,
    write_confidence_entry,
    write_entry,
)

CONFIDENCE_OUTPUT = confidence_output(H, W)


@pytest.fixture(scope="module")
async def confident(tmp_path_factory) -> AsyncIterator[tuple[Server, pb_grpc.SegmentationStub]]:
    root = tmp_path_factory.mktemp("confidence-repository")
    write_confidence_entry(root, "colour_confident", H, W, max_batch_size=4)
    write_entry(root, "colour_logits", H, W, output="logits", max_batch_size=4)
    write_entry(root, "colour", H, W, max_batch_size=4)
    server = Server(make_settings(root, metrics_port=None))
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield server, pb_grpc.SegmentationStub(channel)
    await server.stop(timeout_s=5)


def soft_image(height: int = H, width: int = W) -> np.ndarray:
    """Colour ramps: the model is sure on the flat ends and unsure where colours blend."""
    image = np.zeros((height, width, 3), np.uint8)
    ramp = np.linspace(0, 255, width).astype(np.uint8)
    image[:, :, 0] = ramp
    image[:, :, 1] = ramp[::-1]
    image[height // 2 :, :, 2] = 200
    return image


async def segment(stub, model: str, threshold: float = 0.0) -> pb.SegmentResponse:
    return await stub.Segment(
        pb.SegmentRequest(
            model=model,
            image=pb.Image(encoded=encode(soft_image())),
            encodings=[pb.MASK_ENCODING_RAW],
            output_size=pb.OUTPUT_SIZE_MODEL,
            include_confidence=True,
            confidence_threshold=threshold,
        ),
        timeout=30,
    )


def check_scores(response: pb.SegmentResponse, threshold: float) -> np.ndarray:
    labels = np.frombuffer(response.masks[0].data, np.uint8).reshape(H, W)
    assert response.confidence.encoding == pb.MASK_ENCODING_PNG
    confidence, _palette = decode_png(response.confidence.data)
    assert confidence.shape == (H, W) and confidence.dtype == np.uint8
    assert confidence.min() >= 255 // 5  # 1 / classes at worst: the colour model has 5
    assert confidence.min() < confidence.max()  # the ramp is not equally sure everywhere
    present = sorted(int(c) for c in np.unique(labels))
    assert [c.class_id for c in response.class_confidence] == present
    for entry in response.class_confidence:
        expected = confidence[labels == entry.class_id].mean() / 255
        assert entry.mean == pytest.approx(expected, abs=1e-5)
    scores = response.scores
    assert scores.uncertainty == pytest.approx(
        (confidence < round(255 * threshold)).mean(), abs=1e-6
    )
    assert scores.mean_confidence == pytest.approx(confidence.mean() / 255, abs=1e-5)
    edges = (labels[:, 1:] != labels[:, :-1]).sum() + (labels[1:] != labels[:-1]).sum()
    assert scores.boundary_length == edges
    regions = sum(
        cv2.connectedComponents((labels == c).astype(np.uint8), None, 8)[0] - 1 for c in present
    )
    assert scores.regions == regions
    return confidence


async def test_a_confidence_output_gives_map_means_and_scores(confident):
    _, stub = confident
    response = await segment(stub, "colour_confident", threshold=0.9)
    check_scores(response, 0.9)
    info = await stub.GetModel(pb.GetModelRequest(name="colour_confident"))
    assert info.has_confidence


async def test_scores_models_give_confidence_from_their_softmax(confident):
    """colour_logits answers scores: the server takes the softmax maximum itself, and the same
    image through the label model with the in-graph confidence agrees within a step."""
    _, stub = confident
    from_scores = check_scores(await segment(stub, "colour_logits"), 0.5)
    from_graph = check_scores(await segment(stub, "colour_confident"), 0.5)
    assert np.abs(from_scores.astype(int) - from_graph.astype(int)).max() <= 1


async def test_labels_only_models_say_confidence_is_unavailable(confident):
    _, stub = confident
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await segment(stub, "colour")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "confidence unavailable" in (err.value.details() or "")
    assert not (await stub.GetModel(pb.GetModelRequest(name="colour"))).has_confidence
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await segment(stub, "colour_confident", threshold=1.5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_kserve_raw_route_answers_both_outputs(confident):
    import tritonclient.grpc as tg
    from tritonclient.grpc import aio as ta

    server, _ = confident
    pixels = np.zeros((2, 3, H, W), np.float32)
    pixels[:, 1] = 1.0
    tensor = tg.InferInput("image", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    async with ta.InferenceServerClient(f"127.0.0.1:{server.kserve_port}") as client:
        metadata = await client.get_model_metadata("colour_confident")
        assert [o.name for o in metadata.outputs] == ["labels", "confidence"]
        result = await client.infer("colour_confident", [tensor])
    labels, confidence = result.as_numpy("labels"), result.as_numpy("confidence")
    assert labels.shape == confidence.shape == (2, H, W)
    assert labels.dtype == confidence.dtype == np.uint8
    assert (labels == 2).all() and (confidence > 200).all()  # green, and sure of it


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (confidence_output(H, W, data_type="TYPE_FP32"), "TYPE_UINT8"),
        (confidence_output(H, W + 1), "labels' dims"),
    ],
)
def test_bad_confidence_outputs_are_named(tmp_path: Path, second: str, message: str):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "labels.txt").write_text("a\nb\nc\nd\ne\n")
    with pytest.raises(ModelConfigError, match=message):
        parse_config(with_second_output(config_pbtxt("m", H, W), second), model_dir)
    logits = config_pbtxt("m", H, W, output="logits")
    with pytest.raises(ModelConfigError, match="scores model"):
        parse_config(with_second_output(logits, CONFIDENCE_OUTPUT), model_dir)
