"""GPU metrics (gpu_metrics.py): per-device series through NVML where a GPU is present; here
(no GPU) a real server's scrape carries none and never fails, with NVML's reason kept."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from segserve_server import gpu_metrics
from segserve_server.gpu_metrics import GpuReading, gpu_families
from segserve_server.server import Server
from tests.conftest import make_settings

GPU_FAMILIES = {
    "segserve_gpu_utilization_ratio",
    "segserve_gpu_memory_utilization_ratio",
    "segserve_gpu_memory_used_bytes",
    "segserve_gpu_memory_total_bytes",
}


def nvml_devices() -> int:
    """GPUs NVML sees (0 without pynvml or a driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def scrape(port: int | None) -> dict[str, list[tuple[dict[str, str], float]]]:
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        family.name: [(s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


@pytest.fixture
def gpu_requested():
    """As when a model runs on a GPU (backends.device.check_device); reset afterwards."""
    gpu_metrics.request_gpu_metrics()
    yield
    gpu_metrics._requested.clear()


def test_readings_become_one_sample_per_device_and_family():
    readings = [
        GpuReading(0, "H200", "GPU-a", 0.5, 0.25, 3 << 30, 141 << 30),
        GpuReading(1, "H200", "GPU-b", 1.0, 0.0, 0, 141 << 30),
    ]
    families = {f.name: f for f in gpu_families(readings)}
    assert set(families) == GPU_FAMILIES
    used = families["segserve_gpu_memory_used_bytes"].samples
    assert [(s.labels, s.value) for s in used] == [
        ({"gpu": "0", "name": "H200", "uuid": "GPU-a"}, float(3 << 30)),
        ({"gpu": "1", "name": "H200", "uuid": "GPU-b"}, 0.0),
    ]
    utilisation = families["segserve_gpu_utilization_ratio"].samples
    assert [s.value for s in utilisation] == [0.5, 1.0]


async def test_without_a_gpu_the_scrape_has_no_gpu_series_and_says_why(repository, gpu_requested):
    pytest.importorskip("pynvml", reason="nvidia-ml-py (test and gpu extras) is not installed")
    if nvml_devices():
        pytest.skip("NVML sees a GPU here: test_gpu_series_per_device covers it")
    server = Server(make_settings(repository))
    await server.start()
    try:
        families = scrape(server.metrics_port)
        assert "segserve_requests" in families  # the scrape itself works
        assert not GPU_FAMILIES & set(families)
        assert "NVML" in server.core.metrics.gpu.unavailable_reason
        assert not GPU_FAMILIES & set(scrape(server.metrics_port))  # and keeps working
    finally:
        await server.stop(timeout_s=5)


@pytest.mark.gpu
@pytest.mark.skipif(nvml_devices() == 0, reason="needs a GPU that NVML (nvidia-ml-py) sees")
async def test_gpu_series_per_device(repository, gpu_requested):
    import pynvml

    server = Server(make_settings(repository))
    await server.start()
    try:
        families = scrape(server.metrics_port)
    finally:
        await server.stop(timeout_s=5)
    assert set(families) >= GPU_FAMILIES
    pynvml.nvmlInit()
    try:
        count = pynvml.nvmlDeviceGetCount()
        totals = [
            pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total
            for i in range(count)
        ]
    finally:
        pynvml.nvmlShutdown()
    samples = families["segserve_gpu_memory_total_bytes"]
    assert [v for _, v in sorted(samples, key=lambda s: int(s[0]["gpu"]))] == totals
    for _, ratio in families["segserve_gpu_utilization_ratio"]:
        assert 0.0 <= ratio <= 1.0
