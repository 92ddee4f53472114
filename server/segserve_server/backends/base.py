"""The backend interfaces: what runs a model version's batches, one interface per kind.

- `SyncBackend` (ONNX Runtime in-process): `infer(batch)` blocks; the batcher calls it in one of
  the model's worker threads, never on the event loop.
- `AsyncBackend` (remote Triton servers): `infer(batch, deadline_s)` is awaited on the loop, so a
  batch waiting on the network holds no thread, and it gets the time its requests still have.

Both share `BackendInfo`: a description, how many batches are worth running at once, the largest
batch worth running, whether it can run batches now (`unavailable_reason`, with a change
callback), and the loop-bound `start` / `aclose` hooks. The factory that picks a
concrete backend lives in `backends.factory`; this module imports none of them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import numpy as np

__all__ = ["AsyncBackend", "Backend", "BackendInfo", "SyncBackend", "stack_outputs"]


def stack_outputs(outputs: list[np.ndarray]) -> np.ndarray:
    """A batch's outputs as backends answer them: the one output as it is; labels and
    confidence (both uint8 (N, H, W)) stacked as (N, 2, H, W), labels first."""
    if len(outputs) == 1:
        return np.asarray(outputs[0])
    return np.stack([np.asarray(o) for o in outputs], axis=1)


class BackendInfo(abc.ABC):
    """What the batcher and GetModel need to know of any backend."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Names the backend and device, e.g. "onnxruntime:CPUExecutionProvider"."""

    @property
    def max_concurrent_batches(self) -> int | None:
        """Batches worth running at once; None: the config's instance count."""
        return None

    @property
    def batch_size_limit(self) -> int | None:
        """The largest batch worth running on this device, if smaller than the config's
        max_batch_size (ONNX Runtime's single-threaded CPU lanes: 1); None: the config's."""
        return None

    @property
    def unavailable_reason(self) -> str:
        """Why the started backend cannot run batches now ("" while it can), e.g. every Triton
        server of the model ejected. In-process backends always can."""
        return ""

    @property
    def available(self) -> bool:
        return not self.unavailable_reason

    def on_availability_change(self, callback: Callable[[], None]) -> None:  # noqa: B027
        """Registers callback, called on the loop whenever `available` flips (optional hook:
        backends that are always available never call it)."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Loop-bound set-up, after construction; raises ModelConfigError if it cannot serve."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Releases the model's resources (closes the connections of remote backends)."""


class SyncBackend(BackendInfo):
    """Runs batches in the caller's thread: a worker thread of the batcher, never the loop."""

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Runs one batch (N, ...) of the model's input; returns (N, H, W) or (N, C, H, W)."""


class AsyncBackend(BackendInfo):
    """Runs batches on the event loop (the work happens elsewhere, e.g. on a Triton server)."""

    @abc.abstractmethod
    async def infer(self, batch: np.ndarray, deadline_s: float | None) -> np.ndarray:
        """Runs one batch (N, ...); returns (N, H, W) or (N, C, H, W).

        deadline_s (time.monotonic()) is the latest deadline of the batch's requests, None if one
        of them has none: past it nobody waits for the answer, so the backend stops waiting too
        and raises DeadlineExceeded, which is never the backend's fault (no ejection, no retry).
        """


Backend = SyncBackend | AsyncBackend
"""Either kind; the batcher dispatches on the type."""
