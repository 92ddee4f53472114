"""Device tensors through the batcher: the backend side of the device pipeline (docs/gpu.md).

The batcher queues and stacks numpy arrays. A model on the device pipeline keeps its images on
the device (torch tensors on "cuda:N", or "cpu" in the tests), so what it queues is a *handle*:
a (1,) int64 array naming a tensor held by `DeviceTensors`. `DeviceBatchBackend` wraps the
model's backend: it looks the handles of a batch up, stacks the tensors on the device, runs the
model there (TensorRT takes device tensors as they are, ONNX Runtime binds them by IOBinding;
any other backend gets them as numpy, which on "cpu" is the same memory) and answers handles of
the per-image outputs, still on the device, for the pipeline's postprocess (argmax and the
resize back there too).

A handle's tensor lives exactly as long as the handle array (and any view of it) does: a
`weakref.finalize` on the array drops the entry, so a request cancelled or expired anywhere
between decode and encode leaks nothing. Raw model inputs (KServe ModelInfer: float arrays, not
handles) run too, copied to the device and back. A batch mixing both fails to stack, and the
batcher retries its requests one by one.

torch is imported by this module: the factory imports it only for a model whose config selects
`segserve.pipeline: "device"`.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from segserve_server.backends.base import SyncBackend
from segserve_server.errors import InferenceFailed, ModelConfigError
from segserve_server.gpu_metrics import request_gpu_metrics
from segserve_server.model_repository import ModelConfig

__all__ = [
    "DeviceBatchBackend",
    "DeviceInfer",
    "DeviceTensors",
    "check_device",
    "is_handle_batch",
    "torch_dtype",
]

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "float32": torch.float32,
    "bool": torch.bool,
}


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a numpy one (the types config.pbtxt allows for images and outputs)."""
    try:
        return _TORCH_DTYPES[np.dtype(dtype).name]
    except KeyError as exc:
        raise ModelConfigError(f"type {np.dtype(dtype).name} has no device equivalent") from exc


def check_device(device: str) -> torch.device:
    """The torch device named by segserve.device, or ModelConfigError if this host lacks it."""
    chosen = torch.device(device)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelConfigError(
                f"segserve.device {device!r}: CUDA is not available to torch {torch.__version__} "
                f"(built for CUDA {torch.version.cuda or 'none'}); install the gpu extra on a GPU "
                'host, or set segserve.pipeline "host"'
            )
        index = chosen.index or 0
        if index >= torch.cuda.device_count():
            raise ModelConfigError(
                f"segserve.device {device!r}: this host has {torch.cuda.device_count()} GPUs"
            )
        chosen = torch.device("cuda", index)
        request_gpu_metrics()
    return chosen


def is_handle_batch(batch: np.ndarray) -> bool:
    """Whether a batch is handles (N, 1) int64 rather than model inputs (never 2-D)."""
    return batch.ndim == 2 and batch.shape[1] == 1 and batch.dtype == np.int64


class DeviceTensors:
    """Tensors on the device, by handle; thread-safe (workers put, the batcher's threads get)."""

    def __init__(self) -> None:
        self._tensors: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._keys = itertools.count(1)

    def __len__(self) -> int:
        """Tensors held now (0 once every handle is gone: the leak check of the tests)."""
        return len(self._tensors)

    def put(self, tensor: torch.Tensor) -> np.ndarray:
        """Holds `tensor`; returns its (1,) int64 handle, which keeps it alive."""
        handles = self.put_many([tensor])
        handle: np.ndarray = handles[0]  # a view: it keeps `handles`, which the finalizer watches
        return handle

    def put_many(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        """Holds each tensor; returns (N, 1) handles: row i (a view) names tensors[i], and all of
        them stay held until the array and every view of it are gone."""
        with self._lock:
            keys = [next(self._keys) for _ in tensors]
            self._tensors.update(zip(keys, tensors, strict=True))
        # One array that owns its memory: numpy points every view's base at the owner, so the
        # finalizer must watch the owner (a reshaped view would die at once).
        handles = np.empty((len(keys), 1), dtype=np.int64)
        handles[:, 0] = keys
        weakref.finalize(handles, self._release, keys)
        return handles

    def get(self, handles: np.ndarray) -> list[torch.Tensor]:
        """The tensors of handles (N, 1) or (1,); InferenceFailed for a handle not held."""
        keys = [int(k) for k in np.asarray(handles).reshape(-1)]
        with self._lock:
            missing = [k for k in keys if k not in self._tensors]
            if missing:
                raise InferenceFailed(f"device tensor {missing[0]} is no longer held")
            return [self._tensors[k] for k in keys]

    def _release(self, keys: list[int]) -> None:
        with self._lock:
            for key in keys:
                self._tensors.pop(key, None)


@runtime_checkable
class DeviceInfer(Protocol):
    """A backend that runs device tensors without a host copy (TensorRT)."""

    def infer_device(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, ...) on the backend's device -> the outputs stacked as `infer` stacks them."""
        ...


class DeviceBatchBackend(SyncBackend):
    """Runs batches of handles (device pipeline) or of raw inputs on `inner`, on `device`.

    `transfer` says how a batch reaches the model: "device" (TensorRT takes the tensors),
    "iobinding" (ONNX Runtime reads and writes device memory: backends/onnxruntime_iobinding.py;
    needs `config`) or "host" (numpy copies: on "cpu" the same memory; on CUDA two copies)."""

    def __init__(self, inner: SyncBackend, device: str, config: ModelConfig | None = None) -> None:
        self.inner = inner
        self.device = check_device(device)
        self.tensors = DeviceTensors()
        self._run: Callable[[torch.Tensor], torch.Tensor]
        # Imported here: onnxruntime_iobinding takes this module's torch_dtype.
        from segserve_server.backends.onnxruntime_iobinding import iobinding_runner

        bound = iobinding_runner(inner, config, self.device) if config is not None else None
        if isinstance(inner, DeviceInfer):
            self._run, self.transfer = inner.infer_device, "device"
        elif bound is not None:
            self._run, self.transfer = bound, "iobinding"
        else:
            self._run, self.transfer = self._through_host, "host"

    def _through_host(self, batch: torch.Tensor) -> torch.Tensor:
        """A backend that takes numpy: on "cpu" no copy either way; on CUDA two copies."""
        output = self.inner.infer(batch.cpu().numpy())
        return torch.from_numpy(np.ascontiguousarray(output)).to(self.device)

    @property
    def description(self) -> str:
        return self.inner.description

    @property
    def pipeline(self) -> str:
        """What GetModel reports: "device:cuda:0", "device:cpu"."""
        return f"device:{self.device}"

    @property
    def max_concurrent_batches(self) -> int | None:
        return self.inner.max_concurrent_batches

    @property
    def batch_size_limit(self) -> int | None:
        return self.inner.batch_size_limit

    async def start(self) -> None:
        await self.inner.start()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if not is_handle_batch(batch):
            inputs = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            return self._run(inputs).cpu().numpy()
        images = self.tensors.get(batch)
        stacked = images[0].unsqueeze(0) if len(images) == 1 else torch.stack(images)
        outputs = self._run(stacked)
        if outputs.shape[:1] != (len(images),):
            raise InferenceFailed(
                f"{self.description} returned {tuple(outputs.shape[:1])} outputs for "
                f"{len(images)} inputs"
            )
        return self.tensors.put_many(list(outputs.unbind(0)))
