"""Loaded models: every repository model, its versions, their state, backend and batcher.

A model or version that fails to load is kept with its reason (ListModels and health report it)
while the others serve. A version that serves is a `ReadyVersion`: its config, backend, batcher
and preprocessor are all there by construction, so the request path never checks for them.

A READY version whose backend cannot run batches now (every Triton server of the model ejected)
stays READY but is not `available`: `unavailable_reason` says why (ListModels and GetModel
report it as the reason), and health and KServe ModelReady say not serving until the backend
recovers; `ModelManager.watch` callbacks hear of each change (and of every load, unload and
swap).

Hot reload (`load`, `unload`, and the repository poll when `repository_poll_interval_s` is
set): a new version, or a version whose config or files changed, is loaded and started
completely before it replaces the old one; the swap is one assignment on the loop. Requests
take a `lease` on the ReadyVersion they use (the core holds it from lookup to answer), so a
replaced version keeps serving whoever already holds it: it is retired (its batcher drained,
its backend released) only once its last lease is returned. A reload that fails (bad config,
bad model file) changes nothing that serves: the old versions keep serving, and the failure is
the model's `load_error`, the failed version listed FAILED with its reason, and in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

from segserve_server.backends.factory import create_backend
from segserve_server.core.model_state import (
    UNLOADED_REASON,
    BatchStats,
    Lease,
    Model,
    ModelState,
    ModelVersion,
    ReadyVersion,
)
from segserve_server.core.reload import RepositoryPoller, take_snapshot
from segserve_server.errors import ModelConfigError, ModelNotFound, ModelUnavailable, bounded
from segserve_server.metrics import Metrics
from segserve_server.model_repository import ModelConfig, RepositoryEntry, model_dirs, scan_entry
from segserve_server.pipeline.batcher import Batcher
from segserve_server.pipeline.preprocess import Preprocessor
from segserve_server.settings import Settings

__all__ = [
    "UNLOADED_REASON",
    "BatchStats",
    "Lease",
    "Model",
    "ModelManager",
    "ModelState",
    "ModelVersion",
    "ReadyVersion",
]

log = logging.getLogger(__name__)


class ModelManager:
    """Loads the repository at start, reloads and unloads models while serving, and hands out
    ready versions by name and version (`get`, or `lease` for a request that submits)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._root = Path(settings.model_repository)
        self.models: dict[str, Model] = {}
        self._watchers: list[Callable[[], None]] = []
        self._retiring: dict[ReadyVersion, asyncio.Task[None]] = {}
        self._loads: set[asyncio.Task[Model]] = set()  # explicit loads running (shielded)
        self._poller: RepositoryPoller | None = None

    def watch(self, callback: Callable[[], None]) -> None:
        """Calls callback (on the loop) whenever a READY version's backend turns available or
        unavailable (e.g. its last Triton server ejected, or one readmitted), and after every
        load, unload, swap and removal."""
        self._watchers.append(callback)

    def _availability_changed(self) -> None:
        for callback in list(self._watchers):
            callback()

    @property
    def polls(self) -> int:
        """Repository polls completed so far (0 when polling is off)."""
        return self._poller.polls if self._poller is not None else 0

    async def load_all(self) -> None:
        """Loads every model folder of the repository (at start)."""
        self._lock = asyncio.Lock()
        for model_dir in await asyncio.to_thread(model_dirs, self._root):
            await self._reload(model_dir.name)

    def start_polling(self) -> None:
        """Polls the repository every repository_poll_interval_s (if set) until stop_polling."""
        interval_s = self._settings.repository_poll_interval_s
        if interval_s is not None:
            self._poller = RepositoryPoller(self.poll, interval_s)
            self._poller.start()

    async def stop_polling(self) -> None:
        if self._poller is not None:
            await self._poller.stop()

    async def poll(self) -> None:
        """One scan: loads added models, reloads those whose folder changed since their last
        load attempt, removes those gone from disk. Models unloaded by request are left alone."""
        async with self._lock:
            on_disk = {d.name for d in await asyncio.to_thread(model_dirs, self._root)}
            for name in sorted(set(self.models) - on_disk):
                self._remove(name)
            for name in sorted(on_disk):
                model = self.models.get(name)
                if model is not None:
                    if model.unloaded:
                        continue
                    now = await asyncio.to_thread(
                        take_snapshot, self._root / name, model.config_override
                    )
                    if now == model.snapshot:
                        continue
                    log.info("model %s changed in the repository: reloading", name)
                else:
                    log.info("model %s appeared in the repository: loading", name)
                await self._reload(name)

    async def load(self, name: str, config_text: str | None = None) -> Model:
        """(Re)reads model `name`'s folder and loads what changed: new versions, and every
        version whose config or files changed; versions its version_policy no longer selects
        are retired. config_text replaces config.pbtxt's text (until a load without it).
        The model's `load_error` says what failed (then the old versions keep serving).
        NOT_FOUND if the folder is not in the repository."""
        if not name or "/" in name or name.startswith("."):
            raise ModelNotFound(f"model name {name!r} is not a folder of the repository")
        # A caller that goes away (a cancelled RPC) must not stop a load halfway: versions
        # started but neither swapped in nor retired would leak. The load runs to its end.
        return await asyncio.shield(self._track(self._load_locked(name, config_text)))

    def _track(self, work: Coroutine[Any, Any, Model]) -> asyncio.Task[Model]:
        task = asyncio.get_running_loop().create_task(work)
        self._loads.add(task)  # referenced until done, so it is not collected midway
        task.add_done_callback(self._loads.discard)
        return task

    async def _load_locked(self, name: str, config_text: str | None) -> Model:
        async with self._lock:
            if not await asyncio.to_thread((self._root / name).is_dir):
                if name in self.models:
                    self._remove(name)
                raise ModelNotFound(f"model {name!r} is not in the repository {self._root}")
            model = self.models.get(name)
            if model is not None:
                model.config_override = config_text
                model.unloaded = False
            return await self._reload(name, config_text)

    async def unload(self, name: str) -> Model:
        """Unloads every version of model `name` (drained first: requests already holding one
        are answered); it stays UNLOADED, its requests UNAVAILABLE, until loaded again."""
        async with self._lock:
            model = self._known(name)
            self._retire_all(model)
            model.versions = {
                v: ModelVersion(
                    name, v, ModelState.UNLOADED, UNLOADED_REASON, batch_stats=old.batch_stats
                )
                for v, old in model.versions.items()
            }
            model.unloaded, model.load_error = True, ""
            log.info("model %s unloaded by request", name)
            self._availability_changed()
            return model

    def _known(self, name: str) -> Model:
        model = self.models.get(name)
        if model is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"model {name!r} is not in the repository (models: {known})")
        return model

    def _remove(self, name: str) -> None:
        model = self.models.pop(name)
        self._retire_all(model)
        log.info("model %s removed from the repository: unloaded", name)
        self._availability_changed()

    def _retire_all(self, model: Model) -> None:
        for version in model.versions.values():
            if version.ready is not None:
                self._retire(version.ready)
            self._metrics.model_ready.labels(model.name, str(version.version)).set(0)

    async def _reload(self, name: str, config_text: str | None = None) -> Model:
        """Loads model `name` from its folder; the caller holds the lock."""
        model_dir = self._root / name
        model = self.models.get(name)
        override = model.config_override if model is not None else config_text
        # The snapshot first: a change after it is seen by the next poll.
        snapshot = await asyncio.to_thread(take_snapshot, model_dir, override)
        entry = await asyncio.to_thread(scan_entry, model_dir, override)
        if model is None:
            model = Model(name, entry, config_override=override)
            self.models[name] = model
        model.snapshot = snapshot
        serving = model.serving
        config = entry.config
        if config is None or entry.error is not None:
            error = entry.error or "no config"
            if serving is None or entry.config is not None:  # nothing serves, or no versions
                self._retire_all(model)
                model.entry, model.versions, model.load_error = entry, {}, ""
            else:
                self._keep_serving(model, f"config.pbtxt failed to load: {error}", {})
            self._availability_changed()
            return model
        new_versions: dict[int, ModelVersion] = {}
        started: list[ReadyVersion] = []
        failures: dict[int, str] = {}
        for number in entry.versions_to_load:
            old = model.versions.get(number)
            source = snapshot.of_version(number)
            if old is not None and old.ready is not None and old.source == source:
                new_versions[number] = old
                continue
            loaded = ModelVersion(name, number, source=source)
            if old is not None:
                loaded.batch_stats = old.batch_stats
            model.loading[number] = loaded
            try:
                await self._load(model, config, entry.versions[number], loaded)
            finally:
                model.loading.pop(number, None)
            new_versions[number] = loaded
            if loaded.ready is not None:
                started.append(loaded.ready)
            else:
                failures[number] = loaded.reason
        if failures and serving is not None:
            for ready in started:
                self._retire(ready)
            reasons = "; ".join(f"version {v} failed to load: {r}" for v, r in failures.items())
            self._keep_serving(model, reasons, failures)
        else:
            self._swap(model, entry, new_versions)
        self._availability_changed()
        return model

    def _swap(
        self, model: Model, entry: RepositoryEntry, versions: dict[int, ModelVersion]
    ) -> None:
        """Replaces the model's versions at once; those replaced are retired once idle."""
        kept = {v.ready for v in versions.values() if v.ready is not None}
        replaced = [
            v for v in model.versions.values() if v.ready is not None and v.ready not in kept
        ]
        model.entry, model.versions, model.load_error = entry, versions, ""
        for version in versions.values():
            if version.ready is not None:
                version.reason = ""
        for version in replaced:
            assert version.ready is not None
            self._retire(version.ready)
            if version.version not in versions:
                self._metrics.model_ready.labels(model.name, str(version.version)).set(0)
                log.info("model %s version %d retired", model.name, version.version)
        serving = model.serving
        if replaced and serving is not None:
            log.info("model %s now serves version %d", model.name, serving.version)

    def _keep_serving(self, model: Model, error: str, failures: dict[int, str]) -> None:
        """A reload failed while versions serve: they keep serving and report why."""
        serving = model.serving
        assert serving is not None
        model.load_error = bounded(
            f"{error} (still serving version {serving.version} as loaded before)"
        )
        versions = dict(model.versions)
        for number, reason in failures.items():
            old = versions.get(number)
            if old is not None and old.ready is not None:
                old.reason = bounded(f"reload failed, serving the files loaded before: {reason}")
            else:
                versions[number] = ModelVersion(model.name, number, ModelState.FAILED, reason)
        if not failures:  # the config failed: every serving version says so
            for version in versions.values():
                if version.ready is not None:
                    version.reason = model.load_error
        model.versions = versions
        log.error("model %s: %s", model.name, model.load_error)

    def _retire(self, ready: ReadyVersion) -> None:
        """Drains and releases `ready` once no request holds it (never before)."""
        task = asyncio.get_running_loop().create_task(
            self._drain_retired(ready), name=f"retire-{ready.name}:{ready.version}"
        )
        self._retiring[ready] = task
        task.add_done_callback(lambda _: self._retiring.pop(ready, None))

    async def _drain_retired(self, ready: ReadyVersion) -> None:
        # A request may take a lease between the idle event and this task resuming: wait
        # until none is held at the moment the version closes (no await in between).
        while ready.lease.holders:
            await ready.lease.idle()
        ready.lease.closed = True
        try:
            await ready.batcher.stop(None)
        except Exception:
            log.exception("model %s version %d: retiring failed", ready.name, ready.version)

    async def _load(
        self, model: Model, config: ModelConfig, path: Path, loaded: ModelVersion
    ) -> None:
        try:
            backend = await asyncio.to_thread(create_backend, config, path, self._settings)
            await backend.start()
        except ModelConfigError as exc:
            loaded.state, loaded.reason = ModelState.FAILED, bounded(str(exc))
            log.error("model %s version %d failed to load: %s", model.name, loaded.version, exc)
            if model.serving is None or loaded.version not in model.versions:
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
        model = self._known(name)
        if version == 0:
            serving = model.serving
            if serving is None:
                raise ModelUnavailable(f"model {name!r} is not ready: {model.reason}")
            return serving
        loaded = model.versions.get(version)
        if (loaded is None or loaded.ready is None) and not model.unloaded:
            # Just replaced but still draining: a request that chose it by number still runs.
            for retiring in self._retiring:
                same = (retiring.name, retiring.version) == (name, version)
                if same and not retiring.lease.closed:
                    return retiring
        if loaded is None:
            if model.unloaded:
                raise ModelUnavailable(f"model {name!r} is not ready: {model.reason}")
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

    @contextlib.contextmanager
    def lease(self, name: str, version: int = 0) -> Iterator[ReadyVersion]:
        """`get`, held until the block ends: the version is not retired (its batcher stopped)
        while a request inside the block may still submit to it."""
        ready = self.get(name, version)
        ready.lease.acquire()
        try:
            yield ready
        finally:
            ready.lease.release()

    def _ready(self) -> list[ReadyVersion]:
        serving = [v.ready for m in self.models.values() for v in m.versions.values() if v.ready]
        return serving + list(self._retiring)

    def abandon(self, message: str, *, waited_s: float) -> int:
        """A drain's budget ran out: every batcher stops accepting and fails what it still holds
        (running or queued) with UNAVAILABLE `message`; each one that held something logs it.
        Returns how many requests were failed."""
        return sum(
            ready.batcher.abandon(ModelUnavailable(message), waited_s=waited_s)
            for ready in self._ready()
        )

    async def stop(self, timeout_s: float | None) -> int:
        """Drains every batcher (answers what was queued), then releases the backends. Returns
        how many requests the batchers failed because timeout_s ran out."""
        loaded = [v for m in self.models.values() for v in m.versions.values() if v.ready]
        # Retired versions still waiting for their last lease are stopped here, with the same
        # budget; those already draining finish on their own (or are abandoned at the budget).
        waiting = [r for r in self._retiring if not r.lease.closed]
        draining = [t for r, t in self._retiring.items() if r.lease.closed]
        for ready in waiting:
            self._retiring[ready].cancel()
        batchers = [v.ready.batcher for v in loaded if v.ready] + [r.batcher for r in waiting]
        failed = await asyncio.gather(*(b.stop(timeout_s) for b in batchers))
        if draining:
            await asyncio.wait(draining, timeout=timeout_s)
        left = sum(
            r.batcher.abandon(ModelUnavailable("server stopped"), waited_s=timeout_s or 0.0)
            for r, t in list(self._retiring.items())
            if not t.done()
        )
        for version in loaded:
            version.state, version.ready = ModelState.UNLOADED, None
            self._metrics.model_ready.labels(version.name, str(version.version)).set(0)
        return sum(failed) + left
