"""TensorRT backend: a serialized engine (`model.plan`, platform "tensorrt_plan") on one GPU.

Inputs and outputs are torch CUDA tensors: `infer_device` binds their memory to the engine
(`set_tensor_address`) and enqueues it (`execute_async_v3`) with no host copy, which is how the
device pipeline (backends/device.py, pipeline/device.py) calls it; `infer` (host pipeline,
KServe raw tensors) copies a numpy batch up and the outputs down. Each of the config's
`instance_group` count gets its own execution context and its own CUDA stream; a batch takes a
free instance, waits on the producing stream, and synchronises only its own stream. The engine's
optimisation profile bounds the batch (`batch_size_limit`); `segserve build-engine` writes
engines whose profile matches max_batch_size.

tensorrt is imported when a model of this platform loads (the gpu extra: tensorrt-cu13 10.x);
torch is imported by this module. Written against the TensorRT 10 Python API; untested on
hardware in this repository's CI (no GPU there): tests/test_tensorrt.py runs on a GPU host.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from segserve_server.backends.base import SyncBackend
from segserve_server.backends.device import check_device, torch_dtype
from segserve_server.errors import InferenceFailed, ModelConfigError
from segserve_server.model_repository import ModelConfig

__all__ = ["TensorRTBackend", "load_tensorrt", "profile_shapes"]

log = logging.getLogger(__name__)


def load_tensorrt() -> ModuleType:
    """The tensorrt module, or ModelConfigError naming the gpu extra."""
    try:
        import tensorrt
    except ImportError as exc:
        raise ModelConfigError(
            f"TensorRT is not installed ({exc}): pip install 'segserve[server,gpu]' (docs/gpu.md)"
        ) from exc
    module: ModuleType = tensorrt
    return module


def profile_shapes(
    config: ModelConfig, opt_batch: int | None = None
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) input shapes of the optimisation profile for the config: batch 1, the
    largest preferred batch size (else max_batch_size), max_batch_size."""
    image = config.input_shape
    largest = config.batching.max_batch_size
    preferred = config.batching.preferred_batch_sizes
    opt = opt_batch or (max(preferred) if preferred else largest)
    opt = min(max(opt, 1), largest)
    return (1, *image), (opt, *image), (largest, *image)


@dataclass
class _Instance:
    context: Any  # tensorrt.IExecutionContext
    stream: torch.cuda.Stream


class TensorRTBackend(SyncBackend):
    def __init__(self, config: ModelConfig, plan_path: Path) -> None:
        trt = load_tensorrt()
        if not plan_path.is_file():
            raise ModelConfigError(f"engine file {plan_path} is missing")
        self.device = check_device(config.device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if engine is None:
            raise ModelConfigError(
                f"TensorRT {trt.__version__} cannot load {plan_path}: an engine runs only on the "
                "TensorRT version and GPU model it was built with (rebuild: segserve build-engine)"
            )
        self._engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [config.input_name]:
            raise ModelConfigError(
                f"engine inputs {inputs} are not the config's [{config.input_name!r}]"
            )
        for name in config.output_names:
            if name not in names:
                raise ModelConfigError(f"config output {name!r} is not in the engine ({names})")
        self._input_name = config.input_name
        self._output_names = list(config.output_names)
        self._dtypes = {
            n: torch_dtype(np.dtype(trt.nptype(engine.get_tensor_dtype(n)))) for n in names
        }
        self._profile_max = int(engine.get_tensor_profile_shape(config.input_name, 0)[2][0])
        self._max_batch = config.batching.max_batch_size
        self._instances: queue.SimpleQueue[_Instance] = queue.SimpleQueue()
        self._count = config.instance_count
        with torch.cuda.device(self.device):
            for _ in range(self._count):
                context = engine.create_execution_context()
                if context is None:
                    raise ModelConfigError(f"TensorRT could not create a context for {plan_path}")
                stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
                self._instances.put(_Instance(context, stream))
        self._description = f"tensorrt:{trt.__version__}:{torch.cuda.get_device_name(self.device)}"
        self._warm_up(config)

    def _warm_up(self, config: ModelConfig) -> None:
        shape = profile_shapes(config)[0]
        zeros = torch.zeros(shape, dtype=self._dtypes[self._input_name], device=self.device)
        try:
            self.infer_device(zeros)
        except InferenceFailed as exc:
            raise ModelConfigError(f"warm-up inference failed: {exc}") from exc

    @property
    def description(self) -> str:
        return self._description

    @property
    def max_concurrent_batches(self) -> int | None:
        """One batch per instance (context + stream): the config's instance_group count."""
        return self._count

    @property
    def batch_size_limit(self) -> int | None:
        """The engine's profile bounds the batch, where it is below max_batch_size."""
        return self._profile_max if self._profile_max < self._max_batch else None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        inputs = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        return self.infer_device(inputs).cpu().numpy()

    def infer_device(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, ...) on the GPU -> the outputs on the GPU: one, or labels and confidence stacked
        (N, 2, H, W) as backends.base.stack_outputs stacks them."""
        instance = self._instances.get()
        try:
            inputs = batch.to(self.device, self._dtypes[self._input_name]).contiguous()
            stream = instance.stream
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                context = instance.context
                if not context.set_input_shape(self._input_name, tuple(inputs.shape)):
                    raise InferenceFailed(
                        f"engine rejects input shape {tuple(inputs.shape)} (profile max batch "
                        f"{self._profile_max})"
                    )
                context.set_tensor_address(self._input_name, inputs.data_ptr())
                outputs = []
                for name in self._output_names:
                    shape = tuple(context.get_tensor_shape(name))
                    output = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
                    context.set_tensor_address(name, output.data_ptr())
                    outputs.append(output)
                if not context.execute_async_v3(stream.cuda_stream):
                    raise InferenceFailed("TensorRT execute_async_v3 failed")
                inputs.record_stream(stream)
            stream.synchronize()
        finally:
            self._instances.put(instance)
        return outputs[0] if len(outputs) == 1 else torch.stack(outputs, dim=1)

    def close(self) -> None:
        while not self._instances.empty():
            self._instances.get_nowait()

    async def aclose(self) -> None:
        self.close()
