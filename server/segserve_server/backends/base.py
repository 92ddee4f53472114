"""The backend interface: load a model version, run one batch, describe itself, close."""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np

from segserve_server.errors import ModelConfigError
from segserve_server.model_repository import ModelConfig
from segserve_server.settings import Settings


class Backend(abc.ABC):
    """Runs batches of one model version. `infer` is called from a worker thread, never the loop."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Names the backend and device, e.g. "onnxruntime:CPUExecutionProvider"."""

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Runs one batch (N, ...) of the model's input; returns (N, H, W) or (N, C, H, W)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases the model's resources."""


ONNX_PLATFORMS = {"onnxruntime_onnx", "onnxruntime"}


def create_backend(config: ModelConfig, version_dir: Path, settings: Settings) -> Backend:
    """Builds and loads the backend the model's platform calls for."""
    if config.platform in ONNX_PLATFORMS:
        from segserve_server.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(config, version_dir / config.model_filename, settings)
    raise ModelConfigError(
        f"platform {config.platform!r} is not served by segserve; supported: {sorted(ONNX_PLATFORMS)}"
    )
