"""ONNX Runtime on device tensors (IOBinding): the device pipeline's batches run where they lie.

Without this, a device-pipeline model on ONNX Runtime's CUDA or TensorRT provider would copy
each batch to the host for `session.run` and its outputs back to the device (backends/device.py,
`_through_host`). With IOBinding the session reads the stacked input from the torch tensor's
memory and writes every output into a torch tensor allocated on the same device, so nothing
crosses PCIe until the pipeline's uint8 label map does.

It serves when the session's provider runs on the pipeline's device: CPUExecutionProvider for
"cpu" (where the tests prove it) and the CUDA or TensorRT provider for "cuda:N" (same code,
device type "cuda"). Otherwise `iobinding_runner` answers None and the host copies stay.

Output shapes come from config.pbtxt: labels (N, H, W) per output, scores (N, C, H, W). One
bound zero batch is run before the runner is used: a model that writes anything else keeps the
host copies (logged); later, a batch it cannot bind fails with InferenceFailed.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from segserve_server.backends.device import torch_dtype
from segserve_server.backends.onnxruntime import OnnxRuntimeBackend
from segserve_server.errors import InferenceFailed
from segserve_server.model_repository import ModelConfig

__all__ = ["IOBindingRunner", "iobinding_runner"]

log = logging.getLogger(__name__)

# ONNX tensor types as onnxruntime names them -> numpy (the element types bind_* takes).
_ONNX_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}
# The providers whose memory is the device's, by torch device type.
_PROVIDERS = {
    "cpu": {"CPUExecutionProvider"},
    "cuda": {"CUDAExecutionProvider", "TensorrtExecutionProvider"},
}


def iobinding_runner(
    backend: object, config: ModelConfig, device: torch.device
) -> IOBindingRunner | None:
    """An IOBinding runner for `backend` on `device`, or None where the host copies must stay
    (not ONNX Runtime, its provider on another device, an output type torch lacks)."""
    if not isinstance(backend, OnnxRuntimeBackend):
        return None
    if backend.provider not in _PROVIDERS.get(device.type, set()):
        log.info(
            "model %s: %s does not run on %s; batches go through host memory",
            config.name,
            backend.provider,
            device,
        )
        return None
    types = backend.output_types()
    dtypes = [_ONNX_TYPES.get(types.get(name, "")) for name in backend.output_names]
    if any(dtype is None for dtype in dtypes):
        log.info("model %s: output types %s cannot be bound; host copies", config.name, types)
        return None
    runner = IOBindingRunner(backend, config, device, [d for d in dtypes if d is not None])
    zeros = torch.zeros(
        (1, *config.input_shape), dtype=torch_dtype(config.input_dtype), device=device
    )
    try:  # a model whose outputs are not what config.pbtxt declares fails here, not per batch
        runner(zeros)
    except InferenceFailed as exc:
        log.warning("model %s: IOBinding warm-up failed (%s); host copies", config.name, exc)
        return None
    return runner


class IOBindingRunner:
    """Runs (N, ...) device tensors on an ONNX Runtime session by IOBinding (thread-safe: one
    binding per call)."""

    def __init__(
        self,
        backend: OnnxRuntimeBackend,
        config: ModelConfig,
        device: torch.device,
        output_dtypes: list[type[np.generic]],
    ) -> None:
        self._backend = backend
        self._device = device
        self._device_type = device.type
        self._device_id = device.index or 0
        height, width = config.input_height, config.input_width
        per_image = (
            (height, width) if config.outputs_labels else (len(config.classes), height, width)
        )
        self._outputs = [
            (name, out_type, torch_dtype(np.dtype(out_type)))
            for name, out_type in zip(backend.output_names, output_dtypes, strict=True)
        ]
        self._per_image = per_image
        self._input_type = np.dtype(config.input_dtype).type
        self._input_torch = torch_dtype(config.input_dtype)
        self._description = backend.description

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, ...) model inputs on the device -> the outputs as backends stack them (one output
        as it is; labels and confidence as (N, 2, H, W)), on the device."""
        if batch.dtype != self._input_torch:
            raise InferenceFailed(
                f"{self._description}: input type {batch.dtype} is not the model's "
                f"{np.dtype(self._input_type).name}"
            )
        batch = batch.contiguous()
        shape = (batch.shape[0], *self._per_image)
        outputs = [
            torch.empty(shape, dtype=torch_type, device=self._device)
            for _, _, torch_type in self._outputs
        ]
        if self._device_type == "cuda":  # the session reads on its own stream
            torch.cuda.current_stream(self._device).synchronize()
        with self._backend.session_for_batch() as session:
            binding = session.io_binding()
            binding.bind_input(
                self._backend.input_name,
                self._device_type,
                self._device_id,
                self._input_type,
                tuple(batch.shape),
                batch.data_ptr(),
            )
            for (name, out_type, _), tensor in zip(self._outputs, outputs, strict=True):
                binding.bind_output(
                    name, self._device_type, self._device_id, out_type, shape, tensor.data_ptr()
                )
            try:
                session.run_with_iobinding(binding)
            except Exception as exc:  # onnxruntime's errors are untyped
                raise InferenceFailed(
                    f"{self._description} failed on a bound batch of {tuple(batch.shape)} "
                    f"(outputs bound as {shape}): {exc}"
                ) from exc
            binding.synchronize_outputs()
        return outputs[0] if len(outputs) == 1 else torch.stack(outputs, 1)
