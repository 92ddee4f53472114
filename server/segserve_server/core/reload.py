"""Hot reload helpers: what a model folder holds now (`Snapshot`), and the repository poll loop.

A snapshot digests a model folder without reading its model files: config.pbtxt's text (or
the override a load was given) plus every other file's path, size and mtime, once for the
model level (config, labels) and once per numeric version folder. ModelManager compares a
folder's snapshot with the one it last loaded from to decide what to reload; the poller asks it
every `repository_poll_interval_s` to do so for the whole repository.

Writers should make a new version appear at once (write it beside the repository, then rename
the folder into place): a version folder caught half written fails to load, is reported, and
is loaded again at the next poll that sees its files change.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from segserve_server.model_repository import CONFIG_FILE

__all__ = ["RepositoryPoller", "Snapshot", "take_snapshot"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """Digests of one model folder: the model level, and each numeric version folder."""

    config: str
    versions: dict[int, str] = field(default_factory=dict)

    def of_version(self, version: int) -> str:
        """What a version loaded from this folder depends on: the config and its own files."""
        return f"{self.config}:{self.versions.get(version, '')}"


def _files_digest(files: list[tuple[str, int, int]], extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode())
    for relative, size, mtime_ns in sorted(files):
        digest.update(f"\0{relative}\0{size}\0{mtime_ns}".encode())
    return digest.hexdigest()[:32]


def take_snapshot(model_dir: Path, config_text: str | None = None) -> Snapshot:
    """The folder's snapshot; config_text (None: config.pbtxt's own text) stands for the config.

    A folder that vanishes meanwhile gives what was seen of it (the next poll sees the rest)."""
    model_files: list[tuple[str, int, int]] = []
    version_files: dict[int, list[tuple[str, int, int]]] = {}
    for directory, subdirs, names in os.walk(model_dir, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        relative_dir = Path(directory).relative_to(model_dir)
        top = relative_dir.parts[0] if relative_dir.parts else ""
        if not relative_dir.parts:
            for name in subdirs:
                if name.isdigit():
                    version_files.setdefault(int(name), [])
        for name in names:
            if name.startswith(".") or (not top and name == CONFIG_FILE):
                continue
            try:
                stat = (Path(directory) / name).stat()
            except OSError:
                continue
            item = (str(relative_dir / name), stat.st_size, stat.st_mtime_ns)
            if top.isdigit():
                version_files.setdefault(int(top), []).append(item)
            else:
                model_files.append(item)
    if config_text is None:
        try:
            config_text = (model_dir / CONFIG_FILE).read_text()
        except OSError as exc:
            config_text = f"<unreadable: {exc}>"
    return Snapshot(
        _files_digest(model_files, config_text),
        {v: _files_digest(files) for v, files in version_files.items()},
    )


class RepositoryPoller:
    """Calls `poll` every interval_s, from start() until stop(); a failed poll is logged and
    the next one runs on time. stop() lets a poll in progress finish (a half-done load would
    leave a started backend behind)."""

    def __init__(self, poll: Callable[[], Awaitable[None]], interval_s: float) -> None:
        self._poll = poll
        self._interval_s = interval_s
        self.polls = 0
        """Polls completed so far."""

    def start(self) -> None:
        self._stopping = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="repository-poll")

    async def stop(self) -> None:
        self._stopping.set()
        await self._task

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            try:
                await self._poll()
            except Exception:
                log.exception("repository poll failed; polling again in %gs", self._interval_s)
            self.polls += 1
