"""ONNX Runtime backend: the embedded default, CPU here, CUDA / TensorRT providers where installed."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from segserve_server.backends.base import Backend
from segserve_server.errors import ModelConfigError
from segserve_server.model_repository import ModelConfig
from segserve_server.settings import Settings

log = logging.getLogger(__name__)


def choose_providers(config: ModelConfig, settings: Settings) -> list[str]:
    """Execution providers from the settings, else from config.pbtxt (KIND_GPU, accelerators).

    Providers that this onnxruntime build lacks are dropped with a warning; CPU is always last.
    """
    if settings.ort_providers:
        wanted = list(settings.ort_providers)
    elif config.use_gpu:
        wanted = ["CUDAExecutionProvider"]
        if "tensorrt" in config.accelerators:
            wanted.insert(0, "TensorrtExecutionProvider")
    else:
        wanted = []
    available = set(ort.get_available_providers())
    missing = [p for p in wanted if p not in available]
    if missing:
        log.warning("model %s: providers %s not installed; using the rest", config.name, missing)
    chosen = [p for p in wanted if p in available and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


class OnnxRuntimeBackend(Backend):
    def __init__(self, config: ModelConfig, model_path: Path, settings: Settings) -> None:
        if not model_path.is_file():
            raise ModelConfigError(f"model file {model_path} is missing")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = settings.ort_intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=choose_providers(config, settings)
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors on bad models
            raise ModelConfigError(f"onnxruntime cannot load {model_path}: {exc}") from exc
        self._check_signature(config)
        self._input_name = config.input_name
        self._output_name = config.output_name
        self._provider = self._session.get_providers()[0]
        self._warm_up(config)

    def _warm_up(self, config: ModelConfig) -> None:
        """Runs one zero batch so that the first request does not pay for lazy initialisation."""
        shape = (
            (1, 3, config.input_height, config.input_width)
            if config.input_layout == "NCHW"
            else (1, config.input_height, config.input_width, 3)
        )
        try:
            self.infer(np.zeros(shape, dtype=config.input_dtype))
        except Exception as exc:  # a model that cannot run a zero batch cannot serve
            raise ModelConfigError(f"warm-up inference failed: {exc}") from exc

    def _check_signature(self, config: ModelConfig) -> None:
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        if config.input_name not in inputs:
            raise ModelConfigError(
                f"config input {config.input_name!r} is not in the ONNX model (has {list(inputs)})"
            )
        if config.output_name not in outputs:
            raise ModelConfigError(
                f"config output {config.output_name!r} is not in the ONNX model (has {list(outputs)})"
            )
        shape = inputs[config.input_name].shape
        expected = (
            [3, config.input_height, config.input_width]
            if config.input_layout == "NCHW"
            else [config.input_height, config.input_width, 3]
        )
        fixed = [d if isinstance(d, int) else -1 for d in shape[1:]]
        if len(fixed) != 3 or any(d not in (-1, e) for d, e in zip(fixed, expected, strict=True)):
            raise ModelConfigError(f"ONNX input shape {shape} does not fit config dims {expected}")
        batch_dim = shape[0]
        if config.batching.max_batch_size > 1 and isinstance(batch_dim, int) and batch_dim != -1:
            raise ModelConfigError(
                f"ONNX input has a fixed batch dim {batch_dim} but max_batch_size is "
                f"{config.batching.max_batch_size}; export it with a dynamic batch axis"
            )

    @property
    def description(self) -> str:
        return f"onnxruntime:{self._provider}"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        (output,) = self._session.run([self._output_name], {self._input_name: batch})
        return np.asarray(output)
