"""ONNX Runtime by IOBinding on device tensors (backends/onnxruntime_iobinding.py), on "cpu".

The same code binds "cuda" memory on a GPU host; here the CPU provider reads the torch input in
place and writes into torch outputs, and every answer must equal `session.run`'s exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="IOBinding on device tensors needs torch")

from segserve_server.backends.device import DeviceBatchBackend  # noqa: E402
from segserve_server.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from segserve_server.backends.onnxruntime_iobinding import iobinding_runner  # noqa: E402
from segserve_server.errors import InferenceFailed  # noqa: E402
from segserve_server.model_repository import ModelConfig, parse_config  # noqa: E402
from tests.conftest import H, W, make_settings  # noqa: E402
from tests.harness.synthetic_models import write_confidence_entry, write_entry  # noqa: E402

MODELS = ("labels", "logits", "confidence")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("iobinding")
    write_entry(root, "labels", H, W, output="labels")
    write_entry(root, "logits", H, W, output="logits")
    write_confidence_entry(root, "confidence", H, W)
    return root


def load(repository: Path, name: str) -> tuple[ModelConfig, OnnxRuntimeBackend]:
    config = parse_config((repository / name / "config.pbtxt").read_text(), repository / name)
    model = repository / name / "1" / "model.onnx"
    return config, OnnxRuntimeBackend(config, model, make_settings(repository))


def batch(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-2.0, 2.0, (n, 3, H, W)).astype(np.float32)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [1, 3])
def test_bound_outputs_equal_session_run(repository, name, n):
    config, backend = load(repository, name)
    runner = iobinding_runner(backend, config, torch.device("cpu"))
    assert runner is not None
    inputs = batch(n, seed=n)
    expected = backend.infer(inputs)
    got = runner(torch.from_numpy(inputs))
    assert got.dtype == torch.from_numpy(expected).dtype
    np.testing.assert_array_equal(got.numpy(), expected)
    if name == "confidence":
        assert tuple(got.shape) == (n, 2, H, W)


def test_the_input_is_read_in_place_and_outputs_are_fresh_tensors(repository):
    """The bound input is the tensor's own memory: a non-contiguous view is made contiguous
    first; outputs are new tensors, never the input's memory."""
    config, backend = load(repository, "logits")
    runner = iobinding_runner(backend, config, torch.device("cpu"))
    assert runner is not None
    inputs = torch.from_numpy(batch(2)).transpose(2, 3).contiguous().transpose(2, 3)
    assert not inputs.is_contiguous()
    got = runner(inputs)
    np.testing.assert_array_equal(got.numpy(), backend.infer(inputs.contiguous().numpy()))
    assert got.data_ptr() != inputs.data_ptr()


def test_device_backend_uses_iobinding_and_reports_it(repository):
    config, backend = load(repository, "logits")
    device = DeviceBatchBackend(backend, "cpu", config)
    assert device.transfer == "iobinding"
    handles = device.tensors.put_many(list(torch.from_numpy(batch(3)).unbind(0)))
    outputs = device.tensors.get(device.infer(handles))
    np.testing.assert_array_equal(torch.stack(outputs).numpy(), backend.infer(batch(3)))
    assert DeviceBatchBackend(backend, "cpu").transfer == "host"  # no config: no binding


def test_concurrent_bound_batches_and_a_failed_one_leave_the_backend_idle(repository):
    """Threads binding at once each get their own answer; a failed batch returns its session
    (the lane count is back to 0, so a lone request gets the every-core session again)."""
    from concurrent.futures import ThreadPoolExecutor

    config, backend = load(repository, "logits")
    runner = iobinding_runner(backend, config, torch.device("cpu"))
    assert runner is not None
    inputs = [batch(2, seed=s) for s in range(8)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda x: runner(torch.from_numpy(x)).numpy(), inputs))
    for x, got in zip(inputs, answers, strict=True):
        np.testing.assert_array_equal(got, backend.infer(x))
    with pytest.raises(InferenceFailed):
        runner(torch.zeros((1, 3, H + 1, W), dtype=torch.float32))
    assert backend._running == 0


def test_a_provider_on_another_device_keeps_the_host_copies(repository):
    config, backend = load(repository, "labels")
    assert backend.provider == "CPUExecutionProvider"
    assert iobinding_runner(backend, config, torch.device("cuda", 0)) is None
    assert iobinding_runner(object(), config, torch.device("cpu")) is None


def test_a_wrong_input_fails_the_batch_with_the_shapes(repository):
    config, backend = load(repository, "logits")
    runner = iobinding_runner(backend, config, torch.device("cpu"))
    assert runner is not None
    wrong = torch.zeros((1, 3, H + 1, W), dtype=torch.float32)
    with pytest.raises(InferenceFailed, match=r"bound batch of \(1, 3, "):
        runner(wrong)
    np.testing.assert_array_equal(
        runner(torch.from_numpy(batch(1))).numpy(), backend.infer(batch(1))
    )


# On a GPU host with onnxruntime-gpu (tools/gpu_check.sh) ----------------------------------------


def _cuda_provider() -> bool:
    """Whether a session really runs on CUDA: get_available_providers lists what onnxruntime
    was built with, and a CUDA provider whose libraries do not load falls back to the CPU."""
    import onnxruntime as ort

    if (
        not torch.cuda.is_available()
        or "CUDAExecutionProvider" not in ort.get_available_providers()
    ):
        return False
    from tests.harness.synthetic_models import colour_classes

    model = colour_classes(4, 4).SerializeToString()
    try:
        session = ort.InferenceSession(model, providers=["CUDAExecutionProvider"])
    except Exception:  # onnxruntime's errors are untyped
        return False
    return session.get_providers()[0] == "CUDAExecutionProvider"


@pytest.mark.gpu
@pytest.mark.skipif(
    not _cuda_provider(), reason="needs CUDA and onnxruntime-gpu's CUDA provider (loaded)"
)
@pytest.mark.parametrize("name", MODELS)
def test_cuda_binding_matches_the_cpu_session(repository, name):
    """CUDA memory bound both ways: logits within float tolerance of the CPU session's; label
    maps within the device pipeline's tolerance (0.5 % of pixels)."""
    config = parse_config((repository / name / "config.pbtxt").read_text(), repository / name)
    model = repository / name / "1" / "model.onnx"
    settings = make_settings(repository, ort_providers=["CUDAExecutionProvider"])
    on_gpu = OnnxRuntimeBackend(config, model, settings)
    assert on_gpu.provider == "CUDAExecutionProvider"
    device = DeviceBatchBackend(on_gpu, "cuda:0", config)
    assert device.transfer == "iobinding"
    _, on_cpu = load(repository, name)
    inputs = batch(3, seed=7)
    got = device.infer(inputs)  # raw inputs: copied up, run bound, copied back
    expected = on_cpu.infer(inputs)
    if expected.dtype == np.float32:
        np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-3)
    else:
        assert np.mean(got != expected) <= 0.005
