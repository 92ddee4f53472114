"""TensorRT: `segserve build-engine` (training/engine.py), the TensorRT backend, and ONNX Runtime's
CUDA / TensorRT execution providers.

On a machine without CUDA the parts that need none run: the config.pbtxt written for Triton's
tensorrt_plan platform, version numbering, the choice of the version to build from (the latest
unquantized one; a quantized QDQ version named is refused), the atomic install, the refusal to build (nothing
written), a plan model failing to load with the reason, the optimisation profile, and the
provider choice. The engine build and serving it skip with the reason; tools/gpu_check.sh runs
them on a GPU host.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import grpc
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_client.masks import decode_srle
from segserve_server.backends.onnxruntime import choose_providers, provider_options
from segserve_server.model_repository import parse_config, scan_repository
from segserve_server.server import Server
from segserve_server.training.engine import (
    EngineError,
    EngineOptions,
    main,
    next_version,
    plan_config_text,
    quantization_reason,
    source_entry,
    source_version,
    write_engine_version,
)
from segserve_server.training.repository import QUANTIZATION_REPORT
from tests.conftest import ROOT, H, W, encode, make_settings, quadrant_image
from tests.harness.synthetic_models import expected_colour_labels, write_entry

ACCELERATED = (
    "optimization { execution_accelerators { gpu_execution_accelerator: "
    '[ { name: "tensorrt" } ] } }'
)


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(
    not (HAS_TENSORRT and cuda_available()),
    reason="needs TensorRT and CUDA (the gpu extra on a GPU host: tools/gpu_check.sh)",
)


@pytest.fixture
def entry_dir(tmp_path: Path) -> Path:
    return write_entry(
        tmp_path, "colour", H, W, versions=(1, 2), max_batch_size=8, preferred_batch_sizes=(4,),
        extra=ACCELERATED,
    )  # fmt: skip


def entry_of(model_dir: Path):
    (entry,) = [e for e in scan_repository(model_dir.parent) if e.name == model_dir.name]
    assert entry.config is not None, entry.error
    return entry


def test_plan_config_suits_tensorrt_plan_and_serves_only_the_new_version(entry_dir):
    entry = entry_of(entry_dir)
    text = plan_config_text(entry.config, 3, instances=2, device="cuda:1")
    plan = parse_config(text, entry_dir)
    assert plan.platform == "tensorrt_plan" and plan.model_filename == "model.plan"
    assert (plan.instance_count, plan.use_gpu, plan.accelerators) == (2, True, ())
    assert list(plan.raw.instance_group[0].gpus) == [1]
    assert (plan.pipeline, plan.device) == ("device", "cuda:1")
    # What Triton checks against the engine is unchanged: I/O, batching, classes.
    source = entry.config
    for field in ("input_name", "input_dtype", "input_height", "input_width", "output_name"):
        assert getattr(plan, field) == getattr(source, field), field
    assert plan.batching == source.batching and plan.classes == source.classes
    (entry_dir / "config.pbtxt").write_text(text)
    (entry_dir / "3").mkdir()
    assert entry_of(entry_dir).versions_to_load == [3]  # the ONNX versions stay, unloaded


def test_versions_are_numbered_after_the_highest(entry_dir):
    entry = entry_of(entry_dir)
    assert next_version(entry) == 3
    assert next_version(entry, 7) == 7
    with pytest.raises(EngineError, match="version 2 of model 'colour' exists"):
        next_version(entry, 2)


def with_qdq_input(model_path: Path) -> None:
    """Rewrites the model with a QuantizeLinear / DequantizeLinear pair on its input, UINT8 with a
    non-zero zero point: what ONNX Runtime's static quantization writes (segserve quantize)."""
    model = onnx.load(model_path)
    graph = model.graph
    name = graph.input[0].name
    for node in graph.node:
        node.input[:] = [f"{name}_dq" if i == name else i for i in node.input]
    graph.initializer.extend([
        numpy_helper.from_array(np.array(1 / 255, np.float32), "qdq_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "qdq_zero"),
    ])  # fmt: skip
    quantize = helper.make_node("QuantizeLinear", [name, "qdq_scale", "qdq_zero"], ["q"])
    dequantize = helper.make_node(
        "DequantizeLinear", ["q", "qdq_scale", "qdq_zero"], [f"{name}_dq"]
    )
    graph.node.insert(0, quantize)
    graph.node.insert(1, dequantize)
    onnx.checker.check_model(model)
    onnx.save(model, model_path)


def test_the_engine_is_built_from_the_latest_unquantized_version(entry_dir):
    entry = entry_of(entry_dir)
    assert source_version(entry, entry.config, None) == 2
    assert source_version(entry, entry.config, 1) == 1
    (entry_dir / "2" / QUANTIZATION_REPORT).write_text("{}")
    assert "quantization.json" in str(quantization_reason(entry_dir / "2", "model.onnx"))
    assert source_version(entry, entry.config, None) == 1
    (entry_dir / "2" / QUANTIZATION_REPORT).unlink()
    with_qdq_input(entry_dir / "2" / "model.onnx")  # no report: the graph tells
    assert quantization_reason(entry_dir / "2", "model.onnx") == (
        "its graph has 2 QuantizeLinear/DequantizeLinear nodes"
    )
    assert quantization_reason(entry_dir / "1", "model.onnx") is None
    assert source_version(entry, entry.config, None) == 1


def test_a_quantized_or_missing_source_version_is_refused(entry_dir):
    entry = entry_of(entry_dir)
    with_qdq_input(entry_dir / "2" / "model.onnx")
    with pytest.raises(EngineError, match="version 2 of model 'colour' is a quantized") as info:
        source_version(entry, entry.config, 2)
    assert "symmetric INT8" in str(info.value) and "--precision int8" in str(info.value)
    with pytest.raises(EngineError, match="has no version 9"):
        source_version(entry, entry.config, 9)
    (entry_dir / "1" / QUANTIZATION_REPORT).write_text("{}")
    with pytest.raises(EngineError, match="no unquantized version to build from"):
        source_version(entry, entry.config, None)


def test_build_engine_refuses_a_qdq_version_before_tensorrt_and_writes_nothing(entry_dir, capsys):
    """The refusal comes before TensorRT or a GPU is asked for: the same here and on a GPU."""
    with_qdq_input(entry_dir / "2" / "model.onnx")
    before = sorted(str(p.relative_to(entry_dir)) for p in entry_dir.rglob("*"))
    argv = ["colour", "--model-repository", str(entry_dir.parent), "--from-version", "2"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "quantized (QDQ)" in error and "gpu extra" not in error, error
    assert sorted(str(p.relative_to(entry_dir)) for p in entry_dir.rglob("*")) == before


@pytest.mark.parametrize("model", ["deeplabv3plus_camvid", "unet_camvid"])
def test_the_bundled_models_build_from_their_fp32_version(model):
    """Their version 2 is segserve quantize's UINT8 QDQ model, which TensorRT's parser refuses."""
    entry, config = source_entry(ROOT / "model_repository", model)
    assert max(entry.versions) == 2 and quantization_reason(entry.versions[2], "model.onnx")
    assert source_version(entry, config, None) == 1


async def test_an_engine_version_installs_whole_and_the_server_names_what_it_needs(entry_dir):
    """The install step with plan bytes no GPU made: the layout Triton reads; segserve then
    fails that model (no TensorRT or CUDA here) with the reason, and serves the others."""
    if HAS_TENSORRT and cuda_available():
        pytest.skip("TensorRT and CUDA are here: the real build runs in test_build_and_serve")
    entry = entry_of(entry_dir)
    before = (entry_dir / "config.pbtxt").read_text()
    options = EngineOptions(instances=1)
    target = write_engine_version(
        entry, entry.config, 3, b"not an engine", {"precision": "fp16"}, options=options,
        check=False,
    )  # fmt: skip
    assert sorted(p.name for p in entry_dir.iterdir()) == [
        "1", "2", "3", "config.pbtxt", "labels.txt"
    ]  # fmt: skip
    assert sorted(p.name for p in target.iterdir()) == [
        "build.json", "model.plan", "source_config.pbtxt"
    ]  # fmt: skip
    assert (target / "source_config.pbtxt").read_text() == before
    assert entry_of(entry_dir).config.platform == "tensorrt_plan"
    write_entry(entry_dir.parent, "other", H, W)
    settings = make_settings(entry_dir.parent, metrics_port=None)
    server = Server(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.SegmentationStub(channel)
            info = await stub.GetModel(pb.GetModelRequest(name="colour"))
            other = await stub.GetModel(pb.GetModelRequest(name="other"))
    finally:
        await server.stop(timeout_s=5)
    assert info.state == pb.MODEL_STATE_FAILED and info.version == 3
    assert "segserve[server,gpu]" in info.reason or "CUDA is not available" in info.reason
    assert info.platform == "tensorrt_plan" and info.pipeline == "device:cuda:0"
    assert other.state == pb.MODEL_STATE_READY


def test_build_engine_without_a_gpu_writes_nothing(entry_dir):
    if HAS_TENSORRT and cuda_available():
        pytest.skip("TensorRT and CUDA are here: the build would run")
    before = sorted(str(p.relative_to(entry_dir)) for p in entry_dir.rglob("*"))
    config = (entry_dir / "config.pbtxt").read_text()
    done = subprocess.run(
        [sys.executable, "-m", "segserve_server.cli", "build-engine", "colour",
         "--model-repository", str(entry_dir.parent)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "gpu extra" in done.stderr or "needs a CUDA GPU" in done.stderr
    assert sorted(str(p.relative_to(entry_dir)) for p in entry_dir.rglob("*")) == before
    assert (entry_dir / "config.pbtxt").read_text() == config


def test_the_optimisation_profile_spans_the_batch_sizes(entry_dir):
    pytest.importorskip("torch", reason="backends.tensorrt imports torch (gpu extra)")
    from segserve_server.backends.tensorrt import profile_shapes

    config = entry_of(entry_dir).config
    assert profile_shapes(config) == ((1, 3, H, W), (4, 3, H, W), (8, 3, H, W))
    assert profile_shapes(config, opt_batch=16)[1] == (8, 3, H, W)
    assert profile_shapes(config, opt_batch=2)[1] == (2, 3, H, W)


def test_gpu_configs_ask_onnxruntime_for_cuda_and_tensorrt(entry_dir, caplog):
    """KIND_GPU with the tensorrt accelerator asks for TensorRT, then CUDA; a build without
    them (onnxruntime, not onnxruntime-gpu) falls back to the CPU and says so."""
    import onnxruntime as ort

    text = (entry_dir / "config.pbtxt").read_text().replace("KIND_CPU", "KIND_GPU")
    config = parse_config(text, entry_dir)
    available = set(ort.get_available_providers())
    with caplog.at_level(logging.WARNING):
        chosen = choose_providers(config, make_settings(entry_dir.parent))
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert chosen == [p for p in wanted if p in available] + ["CPUExecutionProvider"]
    if not available.issuperset(wanted):
        assert "not installed" in caplog.text
    options = provider_options(chosen, config, entry_dir / "1" / "model.onnx")
    assert options[-1] == {}
    tensorrt = provider_options(wanted, config, entry_dir / "1" / "model.onnx")[0]
    assert tensorrt["trt_fp16_enable"] == "True" and tensorrt["device_id"] == "0"
    assert tensorrt["trt_engine_cache_path"] == str(entry_dir / "1" / ".ort_trt_cache")


# On a GPU host (tools/gpu_check.sh) -------------------------------------------------------------


def onnxruntime_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and cuda_available()


@pytest.mark.gpu
@pytest.mark.skipif(
    not onnxruntime_has_cuda(),
    reason="needs onnxruntime-gpu and CUDA (docs/gpu.md, 'ONNX Runtime on the GPU')",
)
async def test_onnxruntime_cuda_serves_a_gpu_model(entry_dir):
    text = (entry_dir / "config.pbtxt").read_text().replace("KIND_CPU", "KIND_GPU")
    (entry_dir / "config.pbtxt").write_text(text.replace(ACCELERATED, ""))
    server = Server(make_settings(entry_dir.parent, metrics_port=None))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.SegmentationStub(channel)
            info = await stub.GetModel(pb.GetModelRequest(name="colour"))
            answer = await stub.Segment(
                pb.SegmentRequest(model="colour", image=pb.Image(encoded=encode(quadrant_image())))
            )
    finally:
        await server.stop(timeout_s=5)
    assert info.backend == "onnxruntime:CUDAExecutionProvider"
    np.testing.assert_array_equal(
        decode_srle(answer.masks[0].data), expected_colour_labels(quadrant_image())
    )


@pytest.mark.gpu
@needs_tensorrt
async def test_build_and_serve_an_fp16_engine(entry_dir, tmp_path):
    """build-engine, then the TensorRT backend on the device pipeline serves the same masks."""
    cache = tmp_path / "timing.cache"
    done = subprocess.run(
        [sys.executable, "-m", "segserve_server.cli", "build-engine", "colour",
         "--model-repository", str(entry_dir.parent), "--timing-cache", str(cache)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (entry_dir / "3" / "model.plan").is_file() and cache.is_file()
    image = cv2.resize(quadrant_image(), (640, 480), interpolation=cv2.INTER_NEAREST)
    server = Server(make_settings(entry_dir.parent, metrics_port=None))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.SegmentationStub(channel)
            info = await stub.GetModel(pb.GetModelRequest(name="colour"))
            answer = await stub.Segment(
                pb.SegmentRequest(model="colour", image=pb.Image(encoded=encode(image)))
            )
    finally:
        await server.stop(timeout_s=5)
    assert info.state == pb.MODEL_STATE_READY, info.reason
    assert info.backend.startswith("tensorrt:") and info.pipeline == "device:cuda:0"
    labels = decode_srle(answer.masks[0].data)
    np.testing.assert_array_equal(labels, expected_colour_labels(image))
