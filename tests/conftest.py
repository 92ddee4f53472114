"""Shared fixtures: a real model repository of ONNX models, a real server on loopback, images."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import cv2
import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_server.server import Server
from segserve_server.settings import Settings
from tests.harness.synthetic_models import write_entry

ROOT = Path(__file__).resolve().parent.parent
CAMVID = Path(os.environ.get("SEGSERVE_CAMVID", ROOT.parent / "shared" / "data" / "camvid"))

# Test servers (in-process and `segserve serve` subprocesses) pick a free KServe port rather than
# Triton's fixed 8001.
os.environ.setdefault("SEGSERVE_KSERVE_PORT", "0")
os.environ.setdefault("SEGSERVE_HTTP_PORT", "0")  # and HTTP port, not Triton's 8000

# Model input sizes of the test repository.
H, W = 48, 64


def build_test_repository(root: Path) -> Path:
    """Models for the tests: each is a real ONNX model run by onnxruntime."""
    write_entry(root, "colour", H, W, max_batch_size=8, max_queue_delay_us=2000, max_queue_size=64)
    write_entry(
        root,
        "colour_logits",
        H,
        W,
        output="logits",
        versions=(1, 2, 3),
        extra="version_policy: { specific: { versions: [1, 2] } }",
    )
    # Batches run only when 4 requests are queued (or after 30 s): batch forming is observable.
    write_entry(
        root,
        "colour_batch4",
        H,
        W,
        max_batch_size=4,
        preferred_batch_sizes=(4,),
        max_queue_delay_us=30_000_000,
        max_queue_size=6,
    )
    # Waits 30 s for a batch of 8 and queues at most 2: a full queue is observable. Requests
    # may shorten their queue timeout (Triton's `timeout` parameter, SegmentRequest.timeout_us).
    write_entry(
        root,
        "colour_queue2",
        H,
        W,
        max_batch_size=8,
        preferred_batch_sizes=(8,),
        max_queue_delay_us=30_000_000,
        max_queue_size=2,
        allow_timeout_override=True,
    )
    # Slow enough per request (tens of ms) that requests are in flight when a test acts.
    write_entry(root, "colour_busy", 256, 256, busy_layers=24, max_batch_size=2)
    # Declares (H, W) labels but answers (H, W + 1): a model that misbehaves at run time.
    misshapen = write_entry(root, "misshapen", H, W)
    onnx.save(padded_labels_model(), misshapen / "1" / "model.onnx")
    broken = root / "broken_config"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text(
        'name: "broken_config" platform: "onnxruntime_onnx" input ['
    )
    missing = write_entry(root, "missing_file", H, W)
    (missing / "1" / "model.onnx").unlink()
    return root


def padded_labels_model() -> onnx.ModelProto:
    """uint8 labels of shape (N, H, W + 1) for (N, 3, H, W) input: one column too many."""
    nodes = [
        helper.make_node("ReduceMax", ["image"], ["peak"], axes=[1], keepdims=0),
        helper.make_node("Cast", ["peak"], ["ids"], to=TensorProto.UINT8),
        helper.make_node("Pad", ["ids", "pads"], ["labels"]),
    ]
    pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 1], dtype=np.int64), "pads")
    graph = helper.make_graph(
        nodes,
        "padded",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, H, W])],
        [helper.make_tensor_value_info("labels", TensorProto.UINT8, ["N", H, W + 1])],
        [pads],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_repository(tmp_path_factory.mktemp("repository"))


def make_settings(repository: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "model_repository": repository,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "worker_threads": 2,
        "ort_intra_op_threads": 1,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
async def server(repository: Path) -> AsyncIterator[Server]:
    srv = Server(make_settings(repository))
    await srv.start()
    yield srv
    await srv.stop(timeout_s=5)


@pytest.fixture(scope="session")
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.aio.Channel) -> pb_grpc.SegmentationStub:
    return pb_grpc.SegmentationStub(channel)


def quadrant_image(height: int = H, width: int = W) -> np.ndarray:
    """An RGB image with four flat quadrants: red, green, blue, white (classes 1, 2, 3, 4)."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    h2, w2 = height // 2, width // 2
    image[:h2, :w2] = (255, 0, 0)
    image[:h2, w2:] = (0, 255, 0)
    image[h2:, :w2] = (0, 0, 255)
    image[h2:, w2:] = (255, 255, 255)
    return image


def encode(rgb: np.ndarray, ext: str = ".png", **params: int) -> bytes:
    flags: list[int] = []
    if ext == ".jpg":
        flags = [cv2.IMWRITE_JPEG_QUALITY, params.get("quality", 95)]
    ok, data = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), flags)
    assert ok
    return data.tobytes()


@pytest.fixture(scope="session")
def camvid_frame() -> Iterator[bytes]:
    """A real CamVid street scene as PNG bytes (skipped where ../shared/data is absent)."""
    frames = sorted((CAMVID / "val").glob("*.png"))
    if not frames:
        pytest.skip(f"CamVid not found at {CAMVID}")
    yield frames[0].read_bytes()


# Real tritonserver processes (tests/test_triton_*.py): the binary nvidia-pytriton bundles, from
# the Triton venv that `make triton-env` creates. Without it those tests skip and say why.
TRITON_VENV = Path(os.environ.get("SEGSERVE_TRITON_VENV", ROOT / ".venv-triton"))
TRITON_MODELS = (
    "colour",
    "colour_logits",
    "colour_busy",
    "colour_slow",
    "synthetic_colour_classes",
)
# Seconds each batch of `colour_slow` takes on the test Triton servers: far past the deadlines
# the deadline tests give it, far short of triton_timeout_s.
TRITON_SLOW_S = 3.0


def build_triton_source_repository(root: Path) -> Path:
    """The models the test Triton servers serve, as segserve has them (ONNX, config.pbtxt)."""
    write_entry(root, "colour", H, W, max_batch_size=8, max_queue_delay_us=2000)
    write_entry(root, "colour_logits", H, W, output="logits", max_batch_size=8)
    write_entry(root, "colour_busy", 256, 256, busy_layers=24, max_batch_size=2)
    write_entry(
        root,
        "colour_slow",
        H,
        W,
        max_batch_size=8,
        extra=(
            "instance_group [ { count: 2 kind: KIND_CPU } ] parameters { key: "
            f'"segserve.test_delay_s" value: {{ string_value: "{TRITON_SLOW_S}" }} }}'
        ),
    )
    shutil.copytree(
        ROOT / "model_repository" / "synthetic_colour_classes", root / "synthetic_colour_classes"
    )
    return root


@pytest.fixture(scope="session")
def triton_install():
    from tests.harness.triton_local import TritonInstall, TritonUnavailable

    try:
        return TritonInstall.find(TRITON_VENV)
    except TritonUnavailable as exc:
        error = TRITON_VENV.with_name(TRITON_VENV.name + ".error")
        why = f" ({error.read_text().strip()})" if error.is_file() else ""
        pytest.skip(f"no real Triton server: {exc}{why}")


@pytest.fixture(scope="session")
def triton_servers(triton_install, tmp_path_factory: pytest.TempPathFactory):
    """Two tritonserver processes on loopback serving TRITON_MODELS through the Python backend.

    A test may kill one; it must start it again (same port) before it ends.
    """
    from tests.harness.triton_local import TritonProcess, write_python_backend_repository

    source = build_triton_source_repository(tmp_path_factory.mktemp("triton-source"))
    repository = tmp_path_factory.mktemp("triton-repository")
    write_python_backend_repository(source, repository)
    logs = tmp_path_factory.mktemp("triton-logs")
    servers = [
        TritonProcess(triton_install, repository, log_path=logs / f"triton-{i}.log")
        for i in range(2)
    ]
    try:
        for triton in servers:
            triton.start()
        for triton in servers:
            triton.wait_ready(90)
        yield servers
    finally:
        for triton in servers:
            triton.kill()  # graceful stops take 4-6 s each; nothing is left to answer here


async def start_cli_server(
    repository: Path, *, drain_timeout_s: float, extra_args: Sequence[str] = ()
) -> tuple[subprocess.Popen[str], int, int]:
    """A real `segserve serve` subprocess on 127.0.0.1 (ports picked by the OS; `extra_args`
    appended to its flags); returns it with its gRPC and metrics ports once it logs that it
    listens."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "segserve_server.cli",
            "serve",
            "--model-repository",
            str(repository),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--drain-timeout-s",
            f"{drain_timeout_s:g}",
            "--ort-intra-op-threads",
            "1",
            *extra_args,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = await asyncio.to_thread(process.stderr.readline)
        if match := re.search(r"listening on 127\.0\.0\.1:(\d+) \(metrics on (\d+)\)", line):
            return process, int(match.group(1)), int(match.group(2))
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError("segserve serve did not start")
