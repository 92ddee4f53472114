"""Test-time flip averaging through a real server: a synthetic model with a left/right bias in its
logits, so the mirror changes the answer in a known way; `segserve flip-average` writes the
variant, config.pbtxt's segserve.flip_average selects it at load time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_client.masks import decode_png
from segserve_server.cli import main as segserve
from segserve_server.errors import ModelConfigError
from segserve_server.model_repository import parse_config
from segserve_server.server import Server
from segserve_server.training.confidence import add_confidence
from segserve_server.training.flip import FlipError, flip_average
from tests.conftest import H, W, encode, make_settings, padded_labels_model
from tests.harness.synthetic_models import (
    colour_classes,
    confidence_output,
    config_pbtxt,
    with_second_output,
)

FLIP = 'parameters { key: "segserve.flip_average" value: { string_value: "true" } }'
RED, GREEN, DARK = 1, 2, 0


def side_bias() -> np.ndarray:
    """(1, 5, 1, W) logit bias: red +1.0 on the left quarter, green +0.8 on the right quarter."""
    bias = np.zeros((1, 5, 1, W), np.float32)
    bias[0, RED, 0, : W // 4] = 1.0
    bias[0, GREEN, 0, W - W // 4 :] = 0.8
    return bias


def biased_model(output: str = "labels") -> onnx.ModelProto:
    """The colour model's logits plus side_bias(): not mirror-symmetric, unlike the colours."""
    model = colour_classes(H, W, output="logits")
    graph = model.graph
    graph.node[-1].output[0] = "colour_logits"
    graph.initializer.append(numpy_helper.from_array(side_bias(), "side_bias"))
    graph.node.append(helper.make_node("Add", ["colour_logits", "side_bias"], ["logits"]))
    if output == "labels":
        del graph.output[:]
        graph.node.append(helper.make_node("ArgMax", ["logits"], ["argmax"], axis=1, keepdims=0))
        graph.node.append(helper.make_node("Cast", ["argmax"], ["labels"], to=TensorProto.UINT8))
        graph.output.append(helper.make_tensor_value_info("labels", TensorProto.UINT8, ["N", H, W]))
        model = add_confidence(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def colour_logits(rgb: np.ndarray) -> np.ndarray:
    """(5, H, W) logits of the colour model (its own weights) for an (H, W, 3) RGB image."""
    model = colour_classes(H, W, output="logits")
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    pixels = rgb.astype(np.float32) / 255.0
    logits = pixels @ weights["classify_w"].reshape(5, 3).T + weights["classify_b"]
    return np.asarray(logits.transpose(2, 0, 1))


def write_biased(root: Path, name: str, extra: str = "") -> Path:
    entry = root / name
    (entry / "1").mkdir(parents=True)
    onnx.save(biased_model(), entry / "1" / "model.onnx")
    text = config_pbtxt(name, H, W, max_batch_size=4, extra=extra)
    (entry / "config.pbtxt").write_text(with_second_output(text, confidence_output(H, W)))
    (entry / "labels.txt").write_text("dark\nred\ngreen\nblue\nbright\n")
    return entry


@pytest.fixture(scope="module")
async def flip_server(tmp_path_factory) -> AsyncIterator[pb_grpc.SegmentationStub]:
    root = tmp_path_factory.mktemp("flip-repository")
    write_biased(root, "biased")
    write_biased(root, "biased_flip", FLIP)
    write_biased(root, "flip_missing", FLIP)
    assert segserve(["flip-average", "biased_flip", "--model-repository", str(root)]) == 0
    assert (root / "biased_flip" / "1" / "model.flip.onnx").is_file()
    server = Server(make_settings(root, metrics_port=None))
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.SegmentationStub(channel)
    await server.stop(timeout_s=5)


async def segment(stub: pb_grpc.SegmentationStub, model: str, image: np.ndarray):
    response = await stub.Segment(
        pb.SegmentRequest(
            model=model,
            image=pb.Image(encoded=encode(image)),
            encodings=[pb.MASK_ENCODING_RAW],
            output_size=pb.OUTPUT_SIZE_MODEL,
            include_confidence=True,
        ),
        timeout=30,
    )
    labels = np.frombuffer(response.masks[0].data, np.uint8).reshape(H, W)
    confidence, _palette = decode_png(response.confidence.data)
    return labels, confidence


async def test_flip_averaging_mirrors_the_side_bias(flip_server) -> None:
    grey = np.full((H, W, 3), 20, np.uint8)  # dark everywhere, by 0.26 logits
    plain, _ = await segment(flip_server, "biased", grey)
    flipped, _ = await segment(flip_server, "biased_flip", grey)
    left, right, middle = slice(0, W // 4), slice(W - W // 4, W), slice(W // 4, W - W // 4)
    assert (plain[:, left] == RED).all() and (plain[:, right] == GREEN).all()
    assert (plain[:, middle] == DARK).all()
    # Mirrored and averaged: red 0.5 against green 0.4 on both sides, so both sides are red.
    assert (flipped[:, left] == RED).all() and (flipped[:, right] == RED).all()
    assert (flipped[:, middle] == DARK).all()


async def test_labels_and_confidence_are_those_of_the_mean_logits(flip_server) -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    bias = side_bias()[0]
    # The colours are per pixel (mirror-equivariant): the mean is the colours plus the mean bias.
    mean = colour_logits(image) + (bias + bias[:, :, ::-1]) / 2
    labels, confidence = await segment(flip_server, "biased_flip", image)
    # Integer pixels make exact ties between classes (r == g: red and green); float rounding
    # breaks those either way, so they are left out.
    top2 = np.sort(mean, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-4
    assert clear.mean() > 0.95
    assert (labels == mean.argmax(axis=0))[clear].all()
    shifted = np.exp(mean - mean.max(axis=0))
    expected = np.round(255 / shifted.sum(axis=0))
    assert np.abs(confidence.astype(int) - expected).max() <= 1
    plain, _ = await segment(flip_server, "biased", image)
    assert (plain != labels).mean() > 0.05  # the flip changed the answer


async def test_a_missing_variant_fails_the_model_and_names_the_file(flip_server) -> None:
    info = await flip_server.GetModel(pb.GetModelRequest(name="flip_missing"), timeout=10)
    assert info.state == pb.MODEL_STATE_FAILED
    assert "model.flip.onnx is missing" in info.reason
    assert "segserve flip-average flip_missing" in info.reason


def test_scores_models_average_their_scores_for_any_batch() -> None:
    model = biased_model(output="logits")
    variant = flip_average(model, input_name="image", output_name="logits")
    options = ort.SessionOptions()
    plain, flipped = (
        ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for m in (model, variant)
    )
    batch = np.random.default_rng(5).random((3, 3, H, W), dtype=np.float32)
    (a,) = plain.run(None, {"image": batch})
    (b,) = plain.run(None, {"image": np.ascontiguousarray(batch[..., ::-1])})
    (mean,) = flipped.run(None, {"image": batch})
    assert mean.shape == (3, 5, H, W)
    np.testing.assert_allclose(mean, (a + b[..., ::-1]) / 2, atol=1e-5)


def test_bad_models_and_parameters_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FlipError, match="neither float scores nor labels from an ArgMax"):
        flip_average(padded_labels_model(), input_name="image", output_name="labels")
    variant = flip_average(biased_model(), input_name="image", output_name="labels")
    with pytest.raises(FlipError, match="already flip-averaged"):
        flip_average(variant, input_name="image", output_name="labels")
    with pytest.raises(FlipError, match="no input 'img'"):
        flip_average(biased_model(), input_name="img", output_name="labels")
    bad = FLIP.replace('"true"', '"maybe"')
    with pytest.raises(
        ModelConfigError, match=r"segserve\.flip_average 'maybe' is not true or false"
    ):
        parse_config(config_pbtxt("m", H, W, extra=bad), write_biased(tmp_path, "m"))
    remote = FLIP + ' parameters { key: "segserve.backend" value: { string_value: "triton" } }'
    with pytest.raises(ModelConfigError, match=r"not segserve\.backend 'triton'"):
        parse_config(config_pbtxt("m", H, W, extra=remote), tmp_path / "m")


def test_the_command_names_an_unknown_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_biased(tmp_path, "biased")
    code = segserve(["flip-average", "nope", "--model-repository", str(tmp_path)])
    assert code == 2
    assert "model 'nope' is not in" in capsys.readouterr().err
