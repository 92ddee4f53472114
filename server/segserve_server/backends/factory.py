"""Picks and builds the backend that runs a model version: from its config.pbtxt and settings."""

from __future__ import annotations

from pathlib import Path

from segserve_server.backends.base import Backend
from segserve_server.errors import ModelConfigError
from segserve_server.model_repository import ModelConfig
from segserve_server.settings import Settings

__all__ = ["BACKENDS", "ONNX_PLATFORMS", "backend_name", "create_backend"]

ONNX_PLATFORMS = frozenset({"onnxruntime_onnx", "onnxruntime"})
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
    """Builds the backend the model's parameters and platform call for (not yet started).

    The concrete backends are imported here only, when a model needs them: tritonclient's aio
    client is not loaded for a repository served in-process.
    """
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
