"""`segserve quantize`: a synthetic model with a body of 3x3 convolutions (and the bundled models'
tail: argmax and a confidence output) is quantized to INT8 as version 2, served as the latest
version by a real server on loopback, and agrees with the FP32 labels; bad arguments fail with
messages naming the bad value and leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_server.cli import main as segserve
from segserve_server.server import Server
from segserve_server.training.confidence import add_confidence
from segserve_server.training.quantize import QuantizeError, calibration_frames, quantize_model
from tests.conftest import H, W, encode, make_settings
from tests.harness.synthetic_models import (
    confidence_output,
    expected_colour_labels,
    with_second_output,
    write_entry,
)

# The quantized model must give the FP32 model's labels on at least this share of pixels (it
# reaches 100 % here: the colour classes are far apart compared with the 8-bit steps, and only
# pixels on a near-tie between two classes could flip).
AGREEMENT = 0.98
MODEL = "colour_deep"


def scene(seed: int) -> np.ndarray:
    """A street-like synthetic frame: blocks of the five colour classes with noise."""
    rng = np.random.default_rng(seed)
    colours = np.array([(20, 20, 20), (220, 40, 40), (40, 200, 40), (40, 80, 220), (250, 250, 250)])
    blocks = rng.integers(0, len(colours), size=(4, 4))
    image = colours[blocks].repeat(H // 4, axis=0).repeat(W // 4, axis=1).astype(np.int16)
    image += rng.integers(-25, 26, size=image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_deep_entry(root: Path) -> Path:
    """The colour model behind two 3x3 convolutions at 16 channels, with a confidence output."""
    entry = write_entry(root, MODEL, H, W, busy_layers=2, max_batch_size=4)
    path = entry / "1" / "model.onnx"
    onnx.save(add_confidence(onnx.load(path)), path)
    config = entry / "config.pbtxt"
    config.write_text(with_second_output(config.read_text(), confidence_output(H, W)))
    return entry


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("calibration")
    for index in range(12):
        (folder / f"frame_{index:03d}.png").write_bytes(encode(scene(index)))
    return folder


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory, calibration: Path) -> Path:
    """The repository after `segserve quantize colour_deep --calibration ... --frames 8`."""
    root = tmp_path_factory.mktemp("quantize-repository")
    write_deep_entry(root)
    code = segserve(
        ["quantize", MODEL, "--calibration", str(calibration), "--frames", "8",
         "--model-repository", str(root)]
    )  # fmt: skip
    assert code == 0
    return root


def test_quantize_writes_the_next_version_in_qdq_int8(quantized: Path) -> None:
    entry = quantized / MODEL
    assert sorted(p.name for p in entry.iterdir() if p.is_dir()) == ["1", "2"]
    model = onnx.load(entry / "2" / "model.onnx")
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    per_channel = [t for t in int8_weights if len(t.dims) == 4 and t.dims[0] == 16]
    assert per_channel  # the 16-channel 3x3 weights, stored as int8
    scales = {t.name: t for t in model.graph.initializer}
    dq_weight = [
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in
        {t.name for t in per_channel}
    ]  # fmt: skip
    assert dq_weight and all(len(scales[n.input[1]].dims) == 1 for n in dq_weight)  # per channel
    # The tail stays float: the ArgMax and the confidence read the float classifier's logits.
    producer = {out: n for n in model.graph.node for out in n.output}
    argmax = next(n for n in model.graph.node if n.op_type == "ArgMax")
    assert producer[argmax.input[0]].op_type == "Conv"
    readers = [n for n in model.graph.node if argmax.input[0] in n.input]
    assert {n.op_type for n in readers} == {"ArgMax", "Split"}
    report = json.loads((entry / "2" / "quantization.json").read_text())
    assert report["source_version"] == 1 and report["calibration_frames"] == 8
    assert report["label_agreement_on_calibration_frames"] >= AGREEMENT
    assert not list(entry.glob(".*"))  # no staging folder left


async def test_the_server_serves_the_int8_version_as_latest(quantized: Path) -> None:
    server = Server(make_settings(quantized, metrics_port=None))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.SegmentationStub(channel)
            for seed in (100, 101, 102):  # frames it was not calibrated on
                image = scene(seed)
                response = await stub.Segment(
                    pb.SegmentRequest(
                        model=MODEL,
                        image=pb.Image(encoded=encode(image)),
                        encodings=[pb.MASK_ENCODING_RAW],
                        output_size=pb.OUTPUT_SIZE_MODEL,
                        include_confidence=True,
                    ),
                    timeout=30,
                )
                assert response.model_version == 2
                labels = np.frombuffer(response.masks[0].data, np.uint8).reshape(H, W)
                agreement = float((labels == expected_colour_labels(image)).mean())
                assert agreement >= AGREEMENT, (seed, agreement)
                assert response.confidence.data  # the float tail's confidence output works
    finally:
        await server.stop(timeout_s=5)


def test_calibration_frames_are_spread_over_the_folder(calibration: Path) -> None:
    picked = [p.name for p in calibration_frames(calibration, 4)]
    assert picked == ["frame_000.png", "frame_004.png", "frame_007.png", "frame_011.png"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "nope"}, "model 'nope' is not in"),
        ({"calibration": "/does/not/exist"}, "'/does/not/exist' is not a folder"),
        ({"frames": 50}, "--frames 50: "),
        ({"frames": 0}, "--frames 0 is not in"),
        ({"version": 1}, "already has a version 1"),
        ({"from_version": 7}, "has no version 7"),
        ({"method": "kl"}, "--method 'kl' is not one of"),
    ],
)
def test_bad_arguments_name_the_bad_value(
    tmp_path: Path, calibration: Path, change: dict[str, object], message: str
) -> None:
    write_deep_entry(tmp_path)
    arguments: dict[str, object] = {"model": MODEL, "calibration": calibration, "frames": 4}
    arguments.update(change)
    model = str(arguments.pop("model"))
    folder = arguments.pop("calibration")
    with pytest.raises(QuantizeError, match=message):
        quantize_model(tmp_path, model, folder, **arguments)  # type: ignore[arg-type]
    assert sorted(p.name for p in (tmp_path / MODEL).iterdir() if p.is_dir()) == ["1"]


def test_empty_calibration_folder_and_cli_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_deep_entry(tmp_path / "repo")
    empty = tmp_path / "empty"
    empty.mkdir()
    code = segserve(
        ["quantize", MODEL, "--calibration", str(empty), "--model-repository", str(tmp_path / "repo")]
    )  # fmt: skip
    assert code == 2
    assert f"calibration folder {empty} holds no images" in capsys.readouterr().err


async def test_a_flip_averaged_model_gets_the_variant_of_its_int8_version(
    tmp_path: Path, calibration: Path
) -> None:
    entry = write_deep_entry(tmp_path)
    config = entry / "config.pbtxt"
    config.write_text(
        config.read_text()
        + 'parameters { key: "segserve.flip_average" value: { string_value: "true" } }\n'
    )
    quantize_model(tmp_path, MODEL, calibration, frames=4)
    assert (entry / "2" / "model.flip.onnx").is_file()
    server = Server(make_settings(tmp_path, metrics_port=None))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            image = scene(200)
            response = await pb_grpc.SegmentationStub(channel).Segment(
                pb.SegmentRequest(
                    model=MODEL,
                    image=pb.Image(encoded=encode(image)),
                    encodings=[pb.MASK_ENCODING_RAW],
                    output_size=pb.OUTPUT_SIZE_MODEL,
                ),
                timeout=30,
            )
        assert response.model_version == 2
        labels = np.frombuffer(response.masks[0].data, np.uint8).reshape(H, W)
        # The colour classes are per pixel, so the mirror leaves them as they are.
        assert (labels == expected_colour_labels(image)).mean() >= AGREEMENT
    finally:
        await server.stop(timeout_s=5)
