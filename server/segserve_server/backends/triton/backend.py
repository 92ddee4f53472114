"""Triton backend: a model's batches run on one or more remote Triton servers.

segserve keeps everything around the model (decode, preprocessing, dynamic batching and its
queue policy, postprocessing, encoding) and sends each batch as a tensor over tritonclient's
asyncio gRPC client to the pool's least-loaded live server (`segserve_server.backends.triton.pool`).

Which models and which servers, from config.pbtxt `parameters` (string values):

    segserve.backend              "triton" (or the default_backend setting) sends the model to
                                  Triton; "onnxruntime" keeps it in-process
    segserve.triton_urls          "host:port,host:port": this model's servers (implies
                                  segserve.backend triton); default: the triton_urls setting
                                  (`--triton-url`, repeatable)
    segserve.triton_model         the model's name on the Triton servers (default: its own)
    segserve.triton_model_version the version asked of Triton: a number, or "latest" for the
                                  server's choice (default: the segserve version's own number)

The servers must serve the model with the config's input and output (name, datatype, shape);
`start` checks their metadata and fails the model with the mismatch otherwise.

Once started, the backend is unavailable (`unavailable_reason`) while every server of the pool
is ejected; the callbacks of `on_availability_change` are called when that starts and ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from segserve_server.backends.base import AsyncBackend, stack_outputs
from segserve_server.backends.triton.pool import EndpointPool
from segserve_server.errors import InferenceFailed, ModelConfigError, SegserveError
from segserve_server.model_repository import ModelConfig
from segserve_server.settings import Settings, check_url

__all__ = ["TritonBackend", "triton_target"]

log = logging.getLogger(__name__)


def _parameter(config: ModelConfig, key: str) -> str:
    params = config.raw.parameters
    return params[key].string_value.strip() if key in params else ""


def triton_target(
    config: ModelConfig, version: int, settings: Settings
) -> tuple[list[str], str, str]:
    """(server URLs, remote model name, remote version) of a Triton-backed model version."""
    listed = _parameter(config, "segserve.triton_urls")
    try:
        urls = (
            [check_url(u) for u in listed.split(",") if u.strip()]
            if listed
            else list(settings.triton_urls)
        )
    except ValueError as exc:
        raise ModelConfigError(f"parameter segserve.triton_urls: {exc}") from exc
    if not urls:
        raise ModelConfigError(
            "the model runs on Triton (segserve.backend) but names no server: set parameters "
            "segserve.triton_urls or segserve's --triton-url"
        )
    remote_version = _parameter(config, "segserve.triton_model_version") or str(version)
    if remote_version == "latest":
        remote_version = ""
    elif not remote_version.isdigit():
        raise ModelConfigError(
            f"parameter segserve.triton_model_version = {remote_version!r} is not a version "
            "number or 'latest'"
        )
    return urls, _parameter(config, "segserve.triton_model") or config.name, remote_version


class _TensorMetadata(Protocol):
    """One input or output of a Triton server's model metadata (its TensorMetadata message)."""

    @property
    def name(self) -> str: ...

    @property
    def datatype(self) -> str: ...

    @property
    def shape(self) -> Iterable[int]: ...


class TritonBackend(AsyncBackend):
    """Runs one model version's batches on a pool of Triton servers (see the module doc)."""

    def __init__(self, config: ModelConfig, version: int, settings: Settings) -> None:
        urls, remote_model, remote_version = triton_target(config, version, settings)
        self._config = config
        self._startup_timeout_s = settings.triton_startup_timeout_s
        self._per_server = settings.triton_inflight_batches_per_server
        self._input_datatype = np_to_triton_dtype(config.input_dtype)
        self.pool = EndpointPool(
            urls,
            remote_model,
            remote_version,
            timeout_s=settings.triton_timeout_s,
            health_interval_s=settings.triton_health_interval_s,
            probe_timeout_s=min(5.0, settings.triton_timeout_s),
            name=f"{config.name}:{version}",
        )
        self._available = True
        self._listeners: list[Callable[[], None]] = []
        self.pool.on_change = self._pool_changed

    def _pool_changed(self, live_count: int) -> None:
        available = live_count > 0
        if available == self._available:
            return
        self._available = available
        for callback in list(self._listeners):
            callback()

    @property
    def unavailable_reason(self) -> str:
        return "" if self.pool.live else self.pool.unavailable_reason()

    def on_availability_change(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    @property
    def description(self) -> str:
        version = f":{self.pool.version}" if self.pool.version else ""
        return f"triton:{self.pool.model}{version}@{self.pool.describe()}"

    @property
    def max_concurrent_batches(self) -> int:
        return self._per_server * len(self.pool.endpoints or [None])

    async def start(self) -> None:
        try:
            await self.pool.start(self._startup_timeout_s)
            await self.pool.call(self._check_metadata, None)
        except SegserveError as exc:
            await self.pool.close()
            raise ModelConfigError(exc.message) from exc
        except ModelConfigError:
            await self.pool.close()
            raise

    async def _check_metadata(
        self, client: triton_aio.InferenceServerClient, timeout_s: float
    ) -> None:
        """The remote model must take and give what config.pbtxt says, or the model FAILS."""
        config = self._config
        metadata = await client.get_model_metadata(
            self.pool.model, self.pool.version, client_timeout=timeout_s
        )
        batch = [-1] if config.raw.max_batch_size > 0 else []
        wanted_input = (self._input_datatype, batch + list(config.raw.input[0].dims))
        output_datatype = np_to_triton_dtype(config.output_dtype)
        wanted_output = (output_datatype, batch + list(config.raw.output[0].dims))
        self._check_tensor("input", config.input_name, wanted_input, metadata.inputs)
        self._check_tensor("output", config.output_name, wanted_output, metadata.outputs)
        if config.confidence_output is not None:
            wanted_confidence = ("UINT8", batch + list(config.raw.output[1].dims))
            self._check_tensor(
                "output", config.confidence_output, wanted_confidence, metadata.outputs
            )

    def _check_tensor(
        self,
        kind: str,
        name: str,
        wanted: tuple[str, list[int]],
        tensors: Iterable[_TensorMetadata],
    ) -> None:
        remote = {t.name: t for t in tensors}
        if name not in remote:
            raise ModelConfigError(
                f"Triton model {self.pool.model} has no {kind} {name!r} (has {sorted(remote)})"
            )
        datatype, shape = wanted
        found = list(remote[name].shape)
        if (
            remote[name].datatype != datatype
            or len(found) != len(shape)
            or any(f != w and -1 not in (f, w) for f, w in zip(found, shape, strict=True))
        ):
            raise ModelConfigError(
                f"Triton model {self.pool.model} {kind} {name!r} is "
                f"{remote[name].datatype}{found}; config.pbtxt says {datatype}{shape}"
            )

    async def infer(self, batch: np.ndarray, deadline_s: float | None) -> np.ndarray:
        """Sends the batch with the time its requests still have (capped by triton_timeout_s)."""
        batch = np.ascontiguousarray(batch, dtype=self._config.input_dtype)
        return await self.pool.call(
            lambda client, timeout_s: self._infer_on(client, batch, timeout_s), deadline_s
        )

    async def _infer_on(
        self, client: triton_aio.InferenceServerClient, batch: np.ndarray, timeout_s: float
    ) -> np.ndarray:
        model_input = triton_grpc.InferInput(
            self._config.input_name, list(batch.shape), self._input_datatype
        )
        model_input.set_data_from_numpy(batch)
        result = await client.infer(
            self.pool.model,
            [model_input],
            model_version=self.pool.version,
            outputs=[triton_grpc.InferRequestedOutput(n) for n in self._config.output_names],
            client_timeout=timeout_s,
        )
        outputs = []
        for name in self._config.output_names:
            try:
                output: np.ndarray | None = result.as_numpy(name)
            except InferenceServerException as exc:
                raise InferenceFailed(f"Triton answered an unreadable output: {exc}") from exc
            if output is None:
                raise InferenceFailed(f"Triton's answer lacks output {name!r}")
            outputs.append(output)
        return stack_outputs(outputs)

    async def aclose(self) -> None:
        await self.pool.close()
