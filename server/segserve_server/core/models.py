"""Loaded models: every repository model, its versions, their state, backend and batcher.

A model or version that fails to load is kept with its reason (ListModels and health report it)
while the others serve.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field
from pathlib import Path

from segserve_server.backends import Backend, create_backend
from segserve_server.errors import ModelConfigError, ModelNotFound, ModelUnavailable
from segserve_server.metrics import Metrics
from segserve_server.model_repository import ModelConfig, RepositoryEntry, scan_repository
from segserve_server.pipeline.batcher import Batcher
from segserve_server.pipeline.preprocess import Preprocessor
from segserve_server.settings import Settings

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


@dataclass(eq=False)
class ModelVersion:
    """One version of a model and, once READY, what serves it."""

    name: str
    version: int
    config: ModelConfig | None
    state: ModelState = ModelState.LOADING
    reason: str = ""
    backend: Backend | None = None
    batcher: Batcher | None = None
    preprocessor: Preprocessor | None = None
    batch_stats: BatchStats = field(default_factory=BatchStats)


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
    def serving(self) -> ModelVersion | None:
        ready = [v for v in self.versions.values() if v.state is ModelState.READY]
        return max(ready, key=lambda v: v.version) if ready else None

    @property
    def state(self) -> ModelState:
        if self.serving is not None:
            return ModelState.READY
        if self.entry.error is not None or not self.versions:
            return ModelState.FAILED
        return max(self.versions.values(), key=lambda v: v.version).state

    @property
    def reason(self) -> str:
        if self.serving is not None:
            return ""
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

    async def load_all(self) -> None:
        for entry in scan_repository(Path(self._settings.model_repository)):
            model = Model(entry.name, entry)
            self.models[entry.name] = model
            for version in entry.versions_to_load:
                model.versions[version] = ModelVersion(entry.name, version, entry.config)
        for model in self.models.values():
            for loaded in model.versions.values():
                await self._load(model, loaded)

    async def _load(self, model: Model, loaded: ModelVersion) -> None:
        config = model.config
        assert config is not None
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
        loaded.backend, loaded.batcher = backend, batcher
        loaded.preprocessor = Preprocessor(config)
        loaded.state = ModelState.READY
        self._metrics.model_ready.labels(model.name, str(loaded.version)).set(1)
        self._metrics.queue_depth.labels(model.name).set_function(
            lambda: sum(v.batcher.queue_depth for v in model.versions.values() if v.batcher)
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

    def get(self, name: str, version: int = 0) -> ModelVersion:
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
        if loaded.state is not ModelState.READY:
            raise ModelUnavailable(
                f"version {version} of model {name!r} is {loaded.state.value}: {loaded.reason}"
            )
        return loaded

    async def stop(self, timeout_s: float | None) -> None:
        """Drains every batcher (answers what was queued), then releases the backends."""
        ready = [v for m in self.models.values() for v in m.versions.values() if v.batcher]
        await asyncio.gather(*(v.batcher.stop(timeout_s) for v in ready if v.batcher))
        for loaded in ready:
            loaded.state = ModelState.UNLOADED
            self._metrics.model_ready.labels(loaded.name, str(loaded.version)).set(0)
