"""The backend interface: load a model version, run one batch, describe itself, close.

Two kinds: synchronous backends (ONNX Runtime in-process) implement `infer`, which the batcher
calls in a worker thread; asynchronous backends (remote Triton servers) set `is_async` and
implement `infer_async`, which the batcher awaits on the event loop, so that a batch waiting on
the network holds no thread. `start` and `aclose` run on the loop for both.
"""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np

from segserve_server.errors import ModelConfigError
from segserve_server.model_repository import ModelConfig
from segserve_server.settings import Settings


class Backend(abc.ABC):
    """Runs batches of one model version. `infer` is called from a worker thread, never the loop."""

    is_async: bool = False
    """True: the batcher awaits `infer_async` on the loop instead of calling `infer` in a thread."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Names the backend and device, e.g. "onnxruntime:CPUExecutionProvider"."""

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Runs one batch (N, ...) of the model's input; returns (N, H, W) or (N, C, H, W)."""

    async def infer_async(self, batch: np.ndarray) -> np.ndarray:
        """`infer` for asynchronous backends (is_async), awaited on the event loop."""
        raise NotImplementedError(f"{type(self).__name__} is a synchronous backend")

    @property
    def max_concurrent_batches(self) -> int | None:
        """Batches worth running at once; None: the config's instance count."""
        return None

    @property
    def batch_size_limit(self) -> int | None:
        """The largest batch worth running on this device, if smaller than the config's
        max_batch_size (ONNX Runtime's single-threaded CPU lanes: 1); None: the config's."""
        return None

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Loop-bound set-up, after construction; raises ModelConfigError if it cannot serve."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases the model's resources."""

    async def aclose(self) -> None:
        """Releases the model's resources from the loop (closes connections of remote backends)."""
        self.close()


ONNX_PLATFORMS = {"onnxruntime_onnx", "onnxruntime"}
BACKENDS = ("onnxruntime", "triton")


def backend_name(config: ModelConfig, settings: Settings) -> str:
    """Which backend runs the model: parameters segserve.backend, else segserve.triton_urls
    implies Triton, else the default_backend setting."""
    params = config.raw.parameters
    name = params["segserve.backend"].string_value if "segserve.backend" in params else ""
    if not name:
        name = "triton" if "segserve.triton_urls" in params else settings.default_backend
    if name not in BACKENDS:
        raise ModelConfigError(f"parameter segserve.backend = {name!r} is not one of {BACKENDS}")
    return name


def create_backend(config: ModelConfig, version_dir: Path, settings: Settings) -> Backend:
    """Builds the backend the model's parameters and platform call for (not yet started)."""
    if backend_name(config, settings) == "triton":
        from segserve_server.backends.triton.backend import TritonBackend

        return TritonBackend(config, int(version_dir.name), settings)
    if config.platform in ONNX_PLATFORMS:
        from segserve_server.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(config, version_dir / config.model_filename, settings)
    raise ModelConfigError(
        f"platform {config.platform!r} is not served by segserve in-process (supported: "
        f'{sorted(ONNX_PLATFORMS)}); set parameters segserve.backend = "triton" to run it on '
        "Triton servers"
    )
