"""The state of loaded models: every repository model, its versions, their state, and what
serves a READY version (`ReadyVersion`: config, backend, batcher, preprocessor, never None).

A model or version that fails to load is kept with its reason (ListModels and health report it)
while the others serve. A READY version whose backend cannot run batches now (every Triton
server ejected) stays READY but is not `available`: `unavailable_reason` says why. A READY
model whose last reload failed keeps serving and says why in `load_error` (and `reason`).
`ModelManager` (core.models) loads, reloads and retires them; `Lease` counts the requests that
use a ReadyVersion, so that one is retired only once idle.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from segserve_server.backends.base import Backend
from segserve_server.core.reload import Snapshot
from segserve_server.model_repository import ModelConfig, RepositoryEntry
from segserve_server.pipeline.batcher import Batcher
from segserve_server.pipeline.preprocess import Preprocessor

__all__ = [
    "UNLOADED_REASON",
    "BatchStats",
    "Lease",
    "Model",
    "ModelState",
    "ModelVersion",
    "ReadyVersion",
]

UNLOADED_REASON = (
    "unloaded by request (segserve.v1 ModelRepository.UnloadModel or KServe "
    "RepositoryModelUnload); load it again to serve"
)


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADED = "UNLOADED"


@dataclass
class BatchStats:
    """Batches a model version ran, by size (Triton's execution_count and batch_stats)."""

    executions: int = 0
    inferences: int = 0
    by_size: dict[int, tuple[int, float]] = field(default_factory=dict)  # size: (count, seconds)

    def record(self, size: int, seconds: float) -> None:
        self.executions += 1
        self.inferences += size
        count, total_s = self.by_size.get(size, (0, 0.0))
        self.by_size[size] = (count + 1, total_s + seconds)


class Lease:
    """How many requests use one ReadyVersion now; a retired version drains once idle."""

    def __init__(self) -> None:
        self.holders = 0
        self.closed = False
        """True once the version is being retired and no lease holds it: none is handed out."""
        self._idle = asyncio.Event()
        self._idle.set()

    def acquire(self) -> None:
        self.holders += 1
        self._idle.clear()

    def release(self) -> None:
        self.holders -= 1
        if self.holders == 0:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


@dataclass(frozen=True, eq=False)
class ReadyVersion:
    """A loaded model version that serves: everything the request path needs, never None."""

    name: str
    version: int
    config: ModelConfig
    backend: Backend
    batcher: Batcher
    preprocessor: Preprocessor
    batch_stats: BatchStats
    lease: Lease = field(default_factory=Lease)


@dataclass(eq=False)
class ModelVersion:
    """One version of a model: its state and, once READY, what serves it (`ready`)."""

    name: str
    version: int
    state: ModelState = ModelState.LOADING
    reason: str = ""
    ready: ReadyVersion | None = None
    batch_stats: BatchStats = field(default_factory=BatchStats)
    source: str = ""
    """The snapshot digest (config and version files) the ready version was loaded from."""

    @property
    def unavailable_reason(self) -> str:
        """Why a READY version's backend cannot run batches now; "" otherwise."""
        return self.ready.backend.unavailable_reason if self.ready is not None else ""

    @property
    def available(self) -> bool:
        """READY and its backend can run batches now."""
        return self.ready is not None and not self.unavailable_reason


@dataclass(eq=False)
class Model:
    """One model folder of the repository."""

    name: str
    entry: RepositoryEntry
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    loading: dict[int, ModelVersion] = field(default_factory=dict)
    """Versions being loaded now, before they replace anything (LOADING in RepositoryIndex)."""
    unloaded: bool = False
    """Unloaded by request: UNLOADED until loaded again (the poll leaves it alone)."""
    load_error: str = ""
    """Why the last load or reload failed while older versions keep serving; "" if it did not."""
    config_override: str | None = None
    """config.pbtxt text given with the last load (KServe's "config" parameter), used instead
    of the file until a load without one."""
    snapshot: Snapshot | None = None
    """The folder as the last load attempt saw it: the poll reloads when it differs."""

    @property
    def config(self) -> ModelConfig | None:
        return self.entry.config

    @property
    def serving(self) -> ReadyVersion | None:
        """The highest READY version, which requests without a version get."""
        ready = [v.ready for v in self.versions.values() if v.ready is not None]
        return max(ready, key=lambda v: v.version) if ready else None

    @property
    def state(self) -> ModelState:
        if self.unloaded:
            return ModelState.UNLOADED
        if self.serving is not None:
            return ModelState.READY
        if self.loading and not self.versions:
            return ModelState.LOADING
        if self.entry.error is not None or not self.versions:
            return ModelState.FAILED
        return max(self.versions.values(), key=lambda v: v.version).state

    @property
    def available(self) -> bool:
        """READY, and the serving version's backend can run batches now."""
        serving = self.serving
        return serving is not None and serving.backend.available

    @property
    def reason(self) -> str:
        """Why the model is not READY, or why a READY one is not available or why its last
        reload failed (the old versions serving); "" otherwise."""
        if self.unloaded:
            return UNLOADED_REASON
        serving = self.serving
        if serving is not None:
            reasons = (serving.backend.unavailable_reason, self.load_error)
            return "; ".join(r for r in reasons if r)
        if self.entry.error is not None:
            return self.entry.error
        if self.loading and not self.versions:
            return "loading"
        if not self.versions:
            return "no version selected by version_policy"
        return max(self.versions.values(), key=lambda v: v.version).reason

    @property
    def load_failure(self) -> str:
        """After a load: why it failed ("" if every selected version is READY): a failed
        version or config while older versions keep serving, or why nothing serves."""
        if self.state is ModelState.READY:
            failed = [v for v in self.versions.values() if v.state is ModelState.FAILED]
            return self.load_error or "; ".join(f"version {v.version}: {v.reason}" for v in failed)
        return self.reason or f"model {self.name!r} is {self.state.value}"
