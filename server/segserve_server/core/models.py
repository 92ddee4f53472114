"""Loaded models: every repository model, its versions, their state, backend and batcher.

A model or version that fails to load is kept with its reason (ListModels and health report it)
while the others serve. A version that serves is a `ReadyVersion`: its config, backend, batcher
and preprocessor are all there by construction, so the request path never checks for them.

A READY version whose backend cannot run batches now (every Triton server of the model ejected)
stays READY but is not `available`: `unavailable_reason` says why (ListModels and GetModel
report it as the reason), and health and KServe ModelReady say not serving until the backend
recovers; `ModelManager.watch` callbacks hear of each change.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from segserve_server.backends.base import Backend
from segserve_server.backends.factory import create_backend
from segserve_server.errors import ModelConfigError, ModelNotFound, ModelUnavailable
from segserve_server.metrics import Metrics
from segserve_server.model_repository import ModelConfig, RepositoryEntry, scan_repository
from segserve_server.pipeline.batcher import Batcher
from segserve_server.pipeline.preprocess import Preprocessor
from segserve_server.settings import Settings

__all__ = ["BatchStats", "Model", "ModelManager", "ModelState", "ModelVersion", "ReadyVersion"]

log = logging.getLogger(__name__)


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


@dataclass(eq=False)
class ModelVersion:
    """One version of a model: its state and, once READY, what serves it (`ready`)."""

    name: str
    version: int
    state: ModelState = ModelState.LOADING
    reason: str = ""
    ready: ReadyVersion | None = None
    batch_stats: BatchStats = field(default_factory=BatchStats)

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
        if self.serving is not None:
            return ModelState.READY
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
        """Why the model is not READY, or why a READY one is not available; "" otherwise."""
        serving = self.serving
        if serving is not None:
            return serving.backend.unavailable_reason
        if self.entry.error is not None:
            return self.entry.error
        if not self.versions:
            return "no version selected by version_policy"
        return max(self.versions.values(), key=lambda v: v.version).reason


class ModelManager:
    """Loads the repository at start and hands out ready versions by name and version."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.models: dict[str, Model] = {}
        self._watchers: list[Callable[[], None]] = []

    def watch(self, callback: Callable[[], None]) -> None:
        """Calls callback (on the loop) whenever a READY version's backend turns available or
        unavailable (e.g. its last Triton server ejected, or one readmitted)."""
        self._watchers.append(callback)

    def _availability_changed(self) -> None:
        for callback in list(self._watchers):
            callback()

    async def load_all(self) -> None:
        for entry in scan_repository(Path(self._settings.model_repository)):
            model = Model(entry.name, entry)
            self.models[entry.name] = model
            for version in entry.versions_to_load:
                model.versions[version] = ModelVersion(entry.name, version)
        for model in self.models.values():
            config = model.config
            if config is None:
                continue  # the entry's error is the model's reason
            for loaded in model.versions.values():
                await self._load(model, config, loaded)

    async def _load(self, model: Model, config: ModelConfig, loaded: ModelVersion) -> None:
        try:
            backend = await asyncio.to_thread(
                create_backend, config, model.entry.versions[loaded.version], self._settings
            )
            await backend.start()
        except ModelConfigError as exc:
            loaded.state, loaded.reason = ModelState.FAILED, str(exc)
            log.error("model %s version %d failed to load: %s", model.name, loaded.version, exc)
            self._metrics.model_ready.labels(model.name, str(loaded.version)).set(0)
            return
        batch_size = self._metrics.batch_size.labels(model.name)
        batch_latency = self._metrics.batch_latency.labels(model.name)
        stats = loaded.batch_stats

        def on_batch(size: int, seconds: float) -> None:
            batch_size.observe(size)
            batch_latency.observe(seconds)
            stats.record(size, seconds)

        batcher = Batcher(
            backend,
            config.batching,
            name=f"{model.name}:{loaded.version}",
            instances=backend.max_concurrent_batches or config.instance_count,
            on_batch=on_batch,
        )
        await batcher.start()
        loaded.ready = ReadyVersion(
            model.name, loaded.version, config, backend, batcher, Preprocessor(config), stats
        )
        loaded.state = ModelState.READY
        backend.on_availability_change(self._availability_changed)
        self._metrics.model_ready.labels(model.name, str(loaded.version)).set(1)
        self._metrics.queue_depth.labels(model.name).set_function(
            lambda: sum(v.ready.batcher.queue_depth for v in model.versions.values() if v.ready)
        )
        log.info(
            "model %s version %d ready on %s (input %dx%d, %d classes)",
            model.name,
            loaded.version,
            backend.description,
            config.input_width,
            config.input_height,
            len(config.classes),
        )

    def get(self, name: str, version: int = 0) -> ReadyVersion:
        """The READY version asked for (0: the serving one), or NOT_FOUND / UNAVAILABLE."""
        model = self.models.get(name)
        if model is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"model {name!r} is not in the repository (models: {known})")
        if version == 0:
            serving = model.serving
            if serving is None:
                raise ModelUnavailable(f"model {name!r} is not ready: {model.reason}")
            return serving
        loaded = model.versions.get(version)
        if loaded is None:
            if version in model.entry.versions:
                raise ModelNotFound(
                    f"version {version} of model {name!r} is not loaded by its version_policy "
                    f"(loaded: {sorted(model.versions)})"
                )
            raise ModelNotFound(
                f"model {name!r} has no version {version} (versions: {sorted(model.entry.versions)})"
            )
        if loaded.ready is None:
            raise ModelUnavailable(
                f"version {version} of model {name!r} is {loaded.state.value}: {loaded.reason}"
            )
        return loaded.ready

    def _ready(self) -> list[ModelVersion]:
        return [v for m in self.models.values() for v in m.versions.values() if v.ready]

    def abandon(self, message: str, *, waited_s: float) -> int:
        """A drain's budget ran out: every batcher stops accepting and fails what it still holds
        (running or queued) with UNAVAILABLE `message`; each one that held something logs it.
        Returns how many requests were failed."""
        return sum(
            v.ready.batcher.abandon(ModelUnavailable(message), waited_s=waited_s)
            for v in self._ready()
            if v.ready
        )

    async def stop(self, timeout_s: float | None) -> int:
        """Drains every batcher (answers what was queued), then releases the backends. Returns
        how many requests the batchers failed because timeout_s ran out."""
        loaded = self._ready()
        failed = await asyncio.gather(*(v.ready.batcher.stop(timeout_s) for v in loaded if v.ready))
        for version in loaded:
            version.state, version.ready = ModelState.UNLOADED, None
            self._metrics.model_ready.labels(version.name, str(version.version)).set(0)
        return sum(failed)
