"""The device pipeline (pipeline/device.py, backends/device.py) on "cpu" against the host path.

The same torch code runs on "cuda" in production. Tolerance, measured on the seeded scenes below
(noisy colour fields: class boundaries everywhere, a worst case): inputs at the model's size
give identical tensors and label maps; a resized input differs from OpenCV's by at most one grey
level per channel (OpenCV's 11-bit fixed-point bilinear weights against torch's float ones), on
6-12 % of the values, which flips at most 0.4 % of the label map's pixels (the most seen: 120 of
30000 at 200x150); LABEL_TOLERANCE allows 0.5 %. Given the same model output, postprocessing is
exact: labels, classes present, pixel counts and confidence all equal the host path's.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the device pipeline needs torch (gpu or train extra)")

from segserve.v1 import segserve_pb2 as pb  # noqa: E402
from segserve.v1 import segserve_pb2_grpc as pb_grpc  # noqa: E402
from segserve_client.masks import decode_png, decode_srle  # noqa: E402
from segserve_server.backends.device import DeviceBatchBackend  # noqa: E402
from segserve_server.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from segserve_server.errors import ModelConfigError  # noqa: E402
from segserve_server.model_repository import ModelConfig, parse_config  # noqa: E402
from segserve_server.pipeline import decode, postprocess  # noqa: E402
from segserve_server.pipeline.device import DevicePipeline, apply_orientation  # noqa: E402
from segserve_server.pipeline.preprocess import Preprocessor  # noqa: E402
from segserve_server.server import Server  # noqa: E402
from tests.conftest import H, W, encode, make_settings, quadrant_image  # noqa: E402
from tests.harness.synthetic_models import write_entry  # noqa: E402

LABEL_TOLERANCE = 0.005  # share of a label map's pixels that may differ from the host path's
GREY_LEVEL = 1.0 / 255.0  # one grey level after normalisation (the models' std is 1)
SIZES = [(H, W), (37, 53), (150, 200), (480, 640), (1080, 1920)]
FORMATS = [".jpg", ".png", ".webp", ".bmp"]
# Every format at every size, but 1080p only as JPEG and PNG (WebP there takes seconds).
CASES = [
    pytest.param(size, ext, id=f"{ext[1:]}-{size[1]}x{size[0]}")
    for size in SIZES
    for ext in FORMATS
    if size != (1080, 1920) or ext in (".jpg", ".png")
]
DEVICE_PARAMS = (
    'parameters { key: "segserve.pipeline" value: { string_value: "device" } }\n'
    'parameters { key: "segserve.device" value: { string_value: "cpu" } }'
)
LIMITS = decode.ImageLimits(max_pixels=1 << 26, max_side=1 << 14)


def scene(height: int, width: int, seed: int = 1) -> np.ndarray:
    """A noisy field of smoothly varying colours (RGB): class boundaries all over."""
    rng = np.random.default_rng(seed + height * 7 + width)
    coarse = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    noisy = smooth + rng.integers(-20, 20, smooth.shape, dtype=np.int16)
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("device_repository")
    for output in ("labels", "logits"):
        write_entry(root, f"host_{output}", H, W, output=output)
        write_entry(root, f"device_{output}", H, W, output=output, extra=DEVICE_PARAMS)
    cuda = DEVICE_PARAMS.replace('"cpu"', '"cuda:0"')
    write_entry(root, "device_cuda", H, W, extra=cuda)
    return root


def config_of(repository: Path, name: str) -> ModelConfig:
    return parse_config((repository / name / "config.pbtxt").read_text(), repository / name)


class Paths:
    """The host stages and the device pipeline of one model, in-process."""

    def __init__(self, repository: Path, output: str) -> None:
        settings = make_settings(repository)
        self.config = config_of(repository, f"device_{output}")
        model = repository / f"device_{output}" / "1" / "model.onnx"
        self.host = OnnxRuntimeBackend(self.config, model, settings)
        inner = OnnxRuntimeBackend(self.config, model, settings)
        self.device = DeviceBatchBackend(inner, "cpu", self.config)
        self.pipeline = DevicePipeline(self.config, self.device.tensors, self.device.device, LIMITS)
        self.preprocess = Preprocessor(self.config)

    def host_tensor(self, data: bytes) -> tuple[np.ndarray, decode.DecodedImage]:
        decoded = decode.decode(data, LIMITS, order="RGB", min_size=(W, H))
        return self.preprocess(decoded), decoded

    def host_answer(self, data: bytes, **options: bool) -> postprocess.Postprocessed:
        tensor, decoded = self.host_tensor(data)
        output = self.host.infer(np.ascontiguousarray(tensor)[np.newaxis])[0]
        return postprocess.postprocess(
            output, self.config, decoded.original_width, decoded.original_height, **options
        )

    def device_answer(self, data: bytes, **options: bool) -> postprocess.Postprocessed:
        prepared = self.pipeline.prepare(data, min_size=(W, H))
        outputs = self.device.infer(prepared.handle[np.newaxis])
        return self.pipeline.postprocess(outputs[0], prepared.width, prepared.height, **options)


@pytest.fixture(scope="module")
def paths(repository: Path) -> dict[str, Paths]:
    return {output: Paths(repository, output) for output in ("labels", "logits")}


@pytest.mark.parametrize(("size", "ext"), CASES)
def test_preprocessed_tensors_are_within_one_grey_level(paths, size, ext):
    data = encode(scene(*size), ext)
    side = paths["labels"]
    host, _ = side.host_tensor(data)
    prepared = side.pipeline.prepare(data, min_size=(W, H))
    (device,) = side.device.tensors.get(prepared.handle)
    assert device.shape == host.shape and device.dtype == torch.float32
    difference = np.abs(device.numpy() - host)
    if size == (H, W):
        assert difference.max() == 0  # no resize: the same pixels, the same multiply-add
    else:
        assert difference.max() <= GREY_LEVEL + 1e-6


@pytest.mark.parametrize("output", ["labels", "logits"])
@pytest.mark.parametrize(("size", "ext"), CASES)
def test_label_maps_match_the_host_path(paths, output, size, ext):
    data = encode(scene(*size), ext)
    side = paths[output]
    host = side.host_answer(data, count_pixels=True)
    device = side.device_answer(data, count_pixels=True)
    assert device.labels.shape == host.labels.shape == size
    assert device.labels.dtype == np.uint8
    differing = int((device.labels != host.labels).sum())
    if size == (H, W):
        assert differing == 0
    assert differing <= LABEL_TOLERANCE * host.labels.size, f"{differing} pixels differ"
    assert [c for c, _ in device.present] == [c for c, _ in host.present]
    assert sum(n for _, n in device.present) == host.labels.size


@pytest.mark.parametrize("output", ["labels", "logits"])
@pytest.mark.parametrize(
    "target", [(H, W), (20, 30), (47, 65), (480, 640), (1080, 1920), (7, 1000)]
)
def test_postprocess_equals_the_host_given_the_same_output(paths, output, target):
    """Argmax, the nearest resize back, the classes present and their counts, confidence."""
    side = paths[output]
    tensor, _ = side.host_tensor(encode(scene(150, 200), ".png"))
    model_output = side.host.infer(np.ascontiguousarray(tensor)[np.newaxis])[0]
    handle = side.device.tensors.put(torch.from_numpy(model_output.copy()))
    height, width = target
    for count_pixels in (False, True):
        confidence = output == "logits"
        host = postprocess.postprocess(
            model_output,
            side.config,
            width,
            height,
            count_pixels=count_pixels,
            confidence=confidence,
        )
        device = side.pipeline.postprocess(
            handle, width, height, count_pixels=count_pixels, confidence=confidence
        )
        np.testing.assert_array_equal(device.labels, host.labels)
        assert device.present == host.present
        if confidence:
            assert device.confidence is not None and host.confidence is not None
            np.testing.assert_array_equal(device.confidence, host.confidence)
            np.testing.assert_array_equal(device.model_labels, host.model_labels)


def test_raw_tensors_run_through_the_device_backend(paths):
    """KServe's raw inputs are no handles: the device backend runs them and answers numpy."""
    side = paths["logits"]
    batch = np.random.default_rng(3).random((3, 3, H, W), dtype=np.float32)
    np.testing.assert_array_equal(side.device.infer(batch), side.host.infer(batch))


def test_no_device_tensor_outlives_its_handle(paths):
    side = paths["labels"]
    held = len(side.device.tensors)
    prepared = side.pipeline.prepare(encode(quadrant_image()))
    outputs = side.device.infer(prepared.handle[np.newaxis])
    assert len(side.device.tensors) == held + 2  # the input and the output
    del prepared
    assert len(side.device.tensors) == held + 1
    row = outputs[0]
    del outputs
    assert len(side.device.tensors) == held + 1  # a view keeps the batch's handles alive
    del row
    assert len(side.device.tensors) == held


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_as_the_host_applies_it(orientation):
    pixels = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    expected = decode.apply_orientation(pixels, orientation)
    got = apply_orientation(torch.from_numpy(pixels), orientation).numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"segserve.pipeline": "gpu"}, "segserve.pipeline 'gpu'"),
        ({"segserve.pipeline": "device", "segserve.device": "tpu:0"}, "segserve.device 'tpu:0'"),
        ({"segserve.pipeline": "device", "segserve.device": "cuda:x"}, "segserve.device 'cuda:x'"),
    ],
)
def test_bad_pipeline_parameters_are_config_errors(repository, parameters, message):
    text = (repository / "host_labels" / "config.pbtxt").read_text()
    for key, value in parameters.items():
        text += f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
    with pytest.raises(ModelConfigError, match=message):
        parse_config(text, repository / "host_labels")


def test_pipeline_parameters_parse(repository):
    assert config_of(repository, "host_labels").pipeline == "host"
    device = config_of(repository, "device_labels")
    assert (device.pipeline, device.device) == ("device", "cpu")
    text = (repository / "host_labels" / "config.pbtxt").read_text()
    text += 'parameters { key: "segserve.pipeline" value: { string_value: "device" } }\n'
    assert parse_config(text, repository / "host_labels").device == "cuda:0"


@pytest.fixture(scope="module")
async def stub(repository):
    server = Server(make_settings(repository, metrics_port=None))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield pb_grpc.SegmentationStub(channel)
    finally:
        await server.stop(timeout_s=5)


async def segment(stub, model: str, data: bytes, **fields) -> pb.SegmentResponse:
    return await stub.Segment(
        pb.SegmentRequest(model=model, image=pb.Image(encoded=data), **fields)
    )


@pytest.mark.parametrize(
    ("image", "ext"),
    [(quadrant_image(), ".png"), (scene(480, 640), ".jpg"), (scene(150, 200), ".webp")],
    ids=["quadrants-png", "scene-jpg-640x480", "scene-webp-200x150"],
)
async def test_a_device_model_serves_the_host_masks_over_grpc(stub, image, ext):
    data = encode(image, ext)
    fields = {"include_pixel_counts": True}
    host = await segment(stub, "host_labels", data, **fields)
    device = await segment(stub, "device_labels", data, **fields)
    host_labels, device_labels = decode_srle(host.masks[0].data), decode_srle(device.masks[0].data)
    assert device_labels.shape == host_labels.shape == image.shape[:2]
    differing = int((device_labels != host_labels).sum())
    assert differing <= LABEL_TOLERANCE * host_labels.size
    if image.shape[:2] == (H, W):
        assert differing == 0
    assert [c.name for c in device.classes] == [c.name for c in host.classes]
    assert device.timings.decode_us > 0 and device.timings.postprocess_us > 0


async def test_device_confidence_over_grpc(stub):
    data = encode(scene(H, W), ".png")
    fields = {"include_confidence": True, "confidence_threshold": 0.5}
    host = await segment(stub, "host_logits", data, **fields)
    device = await segment(stub, "device_logits", data, **fields)
    host_map, _ = decode_png(host.confidence.data)
    device_map, _ = decode_png(device.confidence.data)
    np.testing.assert_array_equal(device_map, host_map)
    assert device.scores.mean_confidence == pytest.approx(host.scores.mean_confidence)
    assert device.scores.regions == host.scores.regions > 0


async def test_get_model_reports_the_pipeline(stub):
    host = await stub.GetModel(pb.GetModelRequest(name="host_labels"))
    device = await stub.GetModel(pb.GetModelRequest(name="device_labels"))
    assert (host.pipeline, device.pipeline) == ("host", "device:cpu")
    assert device.backend == "onnxruntime:CPUExecutionProvider"


async def test_a_cuda_model_without_cuda_fails_with_the_reason(stub):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the cuda model loads")
    info = await stub.GetModel(pb.GetModelRequest(name="device_cuda"))
    assert info.state == pb.MODEL_STATE_FAILED
    assert "CUDA is not available" in info.reason and "gpu extra" in info.reason
    assert info.pipeline == "device:cuda:0"


# On a GPU host (tools/gpu_check.sh) -------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (torch sees no GPU here)"
)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_cuda_pipeline_matches_cpu_pipeline(paths, ext):
    """On CUDA: PNG decodes on the host (same pixels); JPEG on nvJPEG (its IDCT may differ from
    libjpeg-turbo's by a grey level or two, so the same label tolerance applies)."""
    side = paths["logits"]
    cuda_backend = DeviceBatchBackend(side.device.inner, "cuda:0", side.config)
    cuda = DevicePipeline(side.config, cuda_backend.tensors, cuda_backend.device, LIMITS)
    assert cuda.gpu_decode, "the gpu extra's torchvision decodes JPEG on the GPU"
    data = encode(scene(1080, 1920), ext)
    prepared = cuda.prepare(data)
    outputs = cuda_backend.infer(prepared.handle[np.newaxis])
    on_cuda = cuda.postprocess(outputs[0], prepared.width, prepared.height)
    on_cpu = side.device_answer(data)
    differing = int((on_cuda.labels != on_cpu.labels).sum())
    assert differing <= LABEL_TOLERANCE * on_cpu.labels.size


def test_the_device_check_parses_and_its_pipeline_bench_runs_on_cpu(tmp_path, capsys):
    """tools/gpu_check.sh is valid bash; benchmarks/gpu_bench.py's pipeline stage (the same torch
    code as on CUDA) runs here, on small frames, and reports every stage in its table and JSON."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run(["bash", "-n", str(root / "tools" / "gpu_check.sh")], check=True)
    spec = importlib.util.spec_from_file_location("gpu_bench", root / "benchmarks" / "gpu_bench.py")
    assert spec is not None and spec.loader is not None
    gpu_bench = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(root / "benchmarks"))  # as when it runs as a script
    try:
        spec.loader.exec_module(gpu_bench)
    finally:
        sys.path.remove(str(root / "benchmarks"))
    out = tmp_path / "bench.json"
    assert gpu_bench.main(
        ["--device", "cpu", "--stages", "pipeline", "--model", "synthetic_colour_classes",
         "--frames", "2", "--frame-size", "320x180", "--batch", "2", "--rounds", "1",
         "--work", str(tmp_path), "--out", str(out), "--note", "GPU tests=none here"]
    ) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "pipeline per 320x180 frame" in table and "GPU tests" in table
    result = json.loads(out.read_text())["pipeline"]
    assert (result["device"], result["gpu_decode"], result["batch"]) == ("cpu", False, 2)
    for stage in ("decode_ms", "preprocess_ms", "postprocess_ms"):
        assert result[stage] > 0, stage
    assert result["total_ms"] == pytest.approx(
        result["decode_ms"] + result["preprocess_ms"] + result["postprocess_ms"], abs=0.01
    )
