"""GPU metrics on /metrics, per device, read through NVML (nvidia-ml-py, the gpu extra).

    segserve_gpu_utilization_ratio         share of the last sample period a kernel ran (0..1)
    segserve_gpu_memory_used_bytes         device memory in use (every process)
    segserve_gpu_memory_total_bytes        device memory installed
    segserve_gpu_memory_utilization_ratio  share of the period device memory was read or written

each labelled gpu (NVML index), name and uuid. The collector is registered with every server's
registry and starts NVML at the first scrape where pynvml is installed (the gpu extra) or a
model runs on a GPU (`request_gpu_metrics`, called by backends.device.check_device); a server
installed with the server extra alone never imports pynvml, and the request path never does.
Where NVML cannot start (no driver, no pynvml) it says why once in the log (a warning where a
model runs on a GPU) and yields no GPU series; a scrape never fails because of it.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "GpuCollector",
    "GpuReading",
    "gpu_families",
    "gpu_metrics_requested",
    "read_gpus",
    "request_gpu_metrics",
]

log = logging.getLogger(__name__)

_requested = threading.Event()


def request_gpu_metrics() -> None:
    """A model runs on a GPU: collectors start reading NVML from the next scrape on."""
    _requested.set()


def gpu_metrics_requested() -> bool:
    return _requested.is_set()


@dataclass(frozen=True)
class GpuReading:
    """One device's state, as NVML reports it."""

    index: int
    name: str
    uuid: str
    utilization_ratio: float
    memory_utilization_ratio: float
    memory_used_bytes: int
    memory_total_bytes: int


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_gpus(nvml: Any) -> list[GpuReading]:
    """Every device's reading through an initialised pynvml module."""
    readings = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        rates = nvml.nvmlDeviceGetUtilizationRates(handle)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        readings.append(
            GpuReading(
                index=index,
                name=_text(nvml.nvmlDeviceGetName(handle)),
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                utilization_ratio=rates.gpu / 100.0,
                memory_utilization_ratio=rates.memory / 100.0,
                memory_used_bytes=int(memory.used),
                memory_total_bytes=int(memory.total),
            )
        )
    return readings


def gpu_families(readings: list[GpuReading]) -> list[GaugeMetricFamily]:
    """The metric families of some readings (one sample per device in each)."""
    labels = ["gpu", "name", "uuid"]
    families = {
        "utilization_ratio": GaugeMetricFamily(
            "segserve_gpu_utilization_ratio",
            "Share of the last NVML sample period in which a kernel ran on the GPU.",
            labels=labels,
        ),
        "memory_utilization_ratio": GaugeMetricFamily(
            "segserve_gpu_memory_utilization_ratio",
            "Share of the last NVML sample period in which GPU memory was read or written.",
            labels=labels,
        ),
        "memory_used_bytes": GaugeMetricFamily(
            "segserve_gpu_memory_used_bytes", "GPU memory in use.", labels=labels
        ),
        "memory_total_bytes": GaugeMetricFamily(
            "segserve_gpu_memory_total_bytes", "GPU memory installed.", labels=labels
        ),
    }
    for reading in readings:
        values = [str(reading.index), reading.name, reading.uuid]
        for field, family in families.items():
            family.add_metric(values, float(getattr(reading, field)))
    return list(families.values())


class GpuCollector(Collector):
    """Reads NVML at each scrape, once requested; NVML starts on the first such scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self.unavailable_reason = ""

    def _started(self) -> Any:
        with self._lock:
            if self._nvml is None and not self.unavailable_reason:
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._nvml = pynvml
                except Exception as exc:  # ImportError, NVMLError (no driver): no GPU series
                    self.unavailable_reason = f"{type(exc).__name__}: {exc}"
                    level = logging.WARNING if gpu_metrics_requested() else logging.INFO
                    log.log(level, "GPU metrics unavailable: %s", self.unavailable_reason)
            return self._nvml

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not gpu_metrics_requested() and importlib.util.find_spec("pynvml") is None:
            return
        nvml = self._started()
        if nvml is None:
            return
        try:
            readings = read_gpus(nvml)
        except Exception as exc:  # a device lost mid-scrape must not fail the scrape
            log.warning("GPU metrics: NVML read failed: %s", exc)
            return
        yield from gpu_families(readings)
