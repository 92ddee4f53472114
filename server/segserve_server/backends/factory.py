"""Picks and builds the backend that runs a model version: from its config.pbtxt and settings.

torch and tensorrt are imported only for a model that needs them (segserve.pipeline "device",
platform "tensorrt_plan"); missing, they fail that model with a ModelConfigError naming the
`gpu` extra, and the other models serve.
"""

from __future__ import annotations

from pathlib import Path

from segserve_server.backends.base import Backend, SyncBackend
from segserve_server.errors import ModelConfigError
from segserve_server.model_repository import ModelConfig
from segserve_server.settings import Settings

__all__ = [
    "BACKENDS",
    "GPU_EXTRA_HINT",
    "ONNX_PLATFORMS",
    "TENSORRT_PLATFORM",
    "backend_name",
    "create_backend",
]

ONNX_PLATFORMS = frozenset({"onnxruntime_onnx", "onnxruntime"})
TENSORRT_PLATFORM = "tensorrt_plan"
GPU_EXTRA_HINT = "pip install 'segserve[server,gpu]' (docs/gpu.md)"
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
    """Builds the backend the model's parameters and platform call for (not yet started); on
    the device pipeline, wrapped in backends.device's DeviceBatchBackend.

    The concrete backends are imported here only, when a model needs them: tritonclient's aio
    client is not loaded for a repository served in-process.
    """
    if config.pipeline == "device":
        if backend_name(config, settings) == "triton":
            raise ModelConfigError(
                'segserve.pipeline "device" needs an in-process backend, not "triton"'
            )
        try:
            from segserve_server.backends.device import DeviceBatchBackend, check_device
        except ImportError as exc:
            raise ModelConfigError(
                f'segserve.pipeline "device" needs torch ({exc}): {GPU_EXTRA_HINT}'
            ) from exc
        check_device(config.device)  # before loading the model: a missing GPU fails fast
        inner = _in_process(config, version_dir, settings)
        if not isinstance(inner, SyncBackend):
            raise ModelConfigError('segserve.pipeline "device" needs an in-process backend')
        return DeviceBatchBackend(inner, config.device, config)
    return _in_process(config, version_dir, settings)


def _in_process(config: ModelConfig, version_dir: Path, settings: Settings) -> Backend:
    if backend_name(config, settings) == "triton":
        from segserve_server.backends.triton.backend import TritonBackend

        return TritonBackend(config, int(version_dir.name), settings)
    if config.platform in ONNX_PLATFORMS:
        from segserve_server.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(config, version_dir / config.model_filename, settings)
    if config.platform == TENSORRT_PLATFORM:
        try:
            from segserve_server.backends.tensorrt import TensorRTBackend
        except ImportError as exc:
            raise ModelConfigError(
                f"platform {TENSORRT_PLATFORM!r} needs tensorrt and torch ({exc}): {GPU_EXTRA_HINT}"
            ) from exc
        return TensorRTBackend(config, version_dir / config.model_filename)
    raise ModelConfigError(
        f"platform {config.platform!r} is not served by segserve in-process (supported: "
        f"{sorted(ONNX_PLATFORMS | {TENSORRT_PLATFORM})}); set parameters segserve.backend = "
        '"triton" to run it on Triton servers'
    )
