"""The KServe v2 / Triton gRPC protocol (inference.GRPCInferenceService) on segserve's own port.

Converts the protocol's messages (the generated code tritonclient ships, tritonclient.grpc
service_pb2) to numpy tensors (`kserve_tensors`) and calls `core.tensors.TensorAPI`; nothing
else. Implemented:
ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata, ModelConfig, ModelInfer,
ModelStreamInfer, RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload, ModelStatistics.
Every other method answers UNIMPLEMENTED with a message.

Repository control as Triton's explicit mode has it (core.models hot reload): RepositoryModelLoad
(re)reads a model's folder and swaps in what changed with no failed request, or answers
INVALID_ARGUMENT with the reason when something failed to load (older versions keep serving);
its one parameter is "config" (a model config in JSON replacing config.pbtxt until the next load
without it); Triton's "file:" overrides are refused INVALID_ARGUMENT. RepositoryModelUnload
unloads (requests UNAVAILABLE until loaded again). RepositoryIndex reports each version READY,
LOADING or UNAVAILABLE with its reason, as Triton does. Statuses come from `grpc_helpers` as for segserve.v1; in a stream, a failed
request, or a frame that does not parse, gets its status name and message in `error_message`
("INTERNAL: ..." for an unexpected exception) and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as kserve

from segserve_server import __version__
from segserve_server.adapters.grpc_helpers import (
    StreamHandler,
    StreamLimits,
    as_segserve_error,
    deadline_of,
    handler_table,
    ordered_stream,
    stream_cut_at,
)
from segserve_server.adapters.kserve_tensors import encode_result, parse_version, to_infer_request
from segserve_server.core.models import Model, ModelManager, ModelState
from segserve_server.core.tensors import Duration, Route, TensorAPI, TensorSpec
from segserve_server.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ModelUnavailable,
    SegserveError,
)

__all__ = ["EXTENSIONS", "IMPLEMENTED", "SERVICE_NAME", "KServeServicer", "kserve_handler"]

log = logging.getLogger(__name__)

SERVICE = kserve.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = SERVICE.full_name
IMPLEMENTED = (
    "ServerLive",
    "ServerReady",
    "ServerMetadata",
    "ModelReady",
    "ModelMetadata",
    "ModelConfig",
    "ModelInfer",
    "ModelStreamInfer",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "ModelStatistics",
)
# Triton's InferStatistics durations, each a RouteStats field of the same name.
STAT_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
EXTENSIONS = ("model_configuration", "statistics", "parameters", "segserve_image")
_STATES = {
    ModelState.READY: "READY",
    ModelState.LOADING: "LOADING",
    ModelState.FAILED: "UNAVAILABLE",
    ModelState.UNLOADED: "UNAVAILABLE",
}


def _duration(duration: Duration) -> kserve.StatisticDuration:
    return kserve.StatisticDuration(count=duration.count, ns=round(duration.seconds * 1e9))


def kserve_handler(servicer: KServeServicer) -> grpc.GenericRpcHandler:
    """Handlers for every method of inference.GRPCInferenceService (grpc_helpers.handler_table);
    the methods segserve lacks answer UNIMPLEMENTED naming the ones it has."""
    return handler_table(
        SERVICE,
        kserve,
        servicer,
        implemented=IMPLEMENTED,
        unimplemented=lambda name: (
            f"segserve does not implement {name}: its models come from the repository, and "
            f"tensors travel in the request (implemented: {', '.join(IMPLEMENTED)})"
        ),
    )


class KServeServicer:
    """The implemented methods of inference.GRPCInferenceService, on parsed messages."""

    def __init__(
        self, api: TensorAPI, *, max_inflight_requests: int, deadline_margin_s: float = 0.1
    ) -> None:
        self._api = api
        self._limits = StreamLimits(max_inflight_requests, max_inflight_requests, "request")
        self._deadline_margin_s = deadline_margin_s
        self.draining: asyncio.Event | None = None  # set by the server at start

    @property
    def _models(self) -> ModelManager:
        return self._api.models

    def _is_draining(self) -> bool:
        return self.draining is not None and self.draining.is_set()

    async def ServerLive(
        self, request: kserve.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> kserve.ServerLiveResponse:
        return kserve.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: kserve.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> kserve.ServerReadyResponse:
        ready = not self._is_draining() and any(r.model.available for r in self._api.routes())
        return kserve.ServerReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: kserve.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> kserve.ServerMetadataResponse:
        return kserve.ServerMetadataResponse(
            name="segserve", version=__version__, extensions=list(EXTENSIONS)
        )

    async def ModelReady(
        self, request: kserve.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> kserve.ModelReadyResponse:
        if self._is_draining():
            return kserve.ModelReadyResponse(ready=False)
        try:
            route = self._api.route(request.name)
            ready = self._api.ready_version(route, parse_version(request.version))
        except SegserveError:
            return kserve.ModelReadyResponse(ready=False)
        # READY but its backend cannot run batches now (every Triton server ejected): not ready.
        return kserve.ModelReadyResponse(ready=ready.backend.available)

    def _ready_route(self, name: str, version: str) -> Route:
        route = self._api.route(name)
        if route.model.config is None:
            raise ModelUnavailable(f"model {name!r} is not ready: {route.model.reason}")
        self._api.ready_version(route, parse_version(version))
        return route

    async def ModelMetadata(
        self, request: kserve.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> kserve.ModelMetadataResponse:
        route = self._ready_route(request.name, request.version)
        versions = [
            str(v.version)
            for v in sorted(route.model.versions.values(), key=lambda v: v.version)
            if v.state is ModelState.READY
        ]

        def metadata(specs: list[TensorSpec]) -> list[kserve.ModelMetadataResponse.TensorMetadata]:
            return [
                kserve.ModelMetadataResponse.TensorMetadata(
                    name=s.name, datatype=s.datatype, shape=list(s.shape)
                )
                for s in specs
            ]

        return kserve.ModelMetadataResponse(
            name=route.name,
            versions=versions,
            platform=self._api.platform(route),
            inputs=metadata(self._api.inputs(route)),
            outputs=metadata(self._api.outputs(route)),
        )

    async def ModelConfig(
        self, request: kserve.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> kserve.ModelConfigResponse:
        route = self._ready_route(request.name, request.version)
        return kserve.ModelConfigResponse(config=self._api.model_config(route))

    async def RepositoryIndex(
        self, request: kserve.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> kserve.RepositoryIndexResponse:
        if request.repository_name:
            raise InvalidArgument(
                f"repository {request.repository_name!r}: segserve serves one repository (use '')"
            )
        index = kserve.RepositoryIndexResponse()
        for route in self._api.routes():
            model = route.model
            # Versions being loaded beside those serving (a new one before its swap) are LOADING.
            versions = {**model.loading, **model.versions}
            if not versions:
                if not request.ready:
                    index.models.add(name=route.name, state="UNAVAILABLE", reason=model.reason)
                continue
            for number, version in sorted(versions.items()):
                if request.ready and version.state is not ModelState.READY:
                    continue
                index.models.add(
                    name=route.name,
                    version=str(number),
                    state=_STATES[version.state],
                    reason=version.reason or version.unavailable_reason,
                )
        return index

    async def RepositoryModelLoad(
        self, request: kserve.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> kserve.RepositoryModelLoadResponse:
        _check_repository(request.repository_name)
        config_text = _config_override(request.model_name, dict(request.parameters))
        model = await self._models.load(request.model_name, config_text)
        _check_loaded(model)
        return kserve.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: kserve.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> kserve.RepositoryModelUnloadResponse:
        _check_repository(request.repository_name)
        unknown = sorted(set(request.parameters) - {"unload_dependents"})
        if unknown:
            raise InvalidArgument(
                f"RepositoryModelUnload parameters {unknown} are not supported "
                "(supported: unload_dependents, which is a no-op: segserve has no ensembles)"
            )
        await self._models.unload(request.model_name)
        return kserve.RepositoryModelUnloadResponse()

    async def ModelStatistics(
        self, request: kserve.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> kserve.ModelStatisticsResponse:
        routes = [self._api.route(request.name)] if request.name else self._api.routes()
        wanted = parse_version(request.version)
        response = kserve.ModelStatisticsResponse()
        for route in routes:
            versions = [
                v
                for v in route.model.versions.values()
                if v.state is ModelState.READY and wanted in (0, v.version)
            ]
            if request.name and wanted and not versions:
                raise ModelUnavailable(f"model {route.name!r} version {wanted} is not ready")
            for version in sorted(versions, key=lambda v: v.version):
                stats = self._api.version_stats(route, version.version)
                entry = response.model_stats.add(
                    name=route.name,
                    version=str(version.version),
                    last_inference=stats.last_inference_ms,
                    inference_count=stats.inference_count,
                )
                entry.inference_stats.CopyFrom(
                    kserve.InferStatistics(
                        **{name: _duration(getattr(stats, name)) for name in STAT_DURATIONS}
                    )
                )
                if not route.image:
                    # Every batch the model ran, whichever API its requests came through.
                    entry.execution_count = version.batch_stats.executions
                    for size, (count, seconds) in sorted(version.batch_stats.by_size.items()):
                        entry.batch_stats.add(
                            batch_size=size,
                            compute_infer=kserve.StatisticDuration(
                                count=count, ns=round(seconds * 1e9)
                            ),
                        )
        return response

    async def ModelInfer(
        self, request: kserve.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> kserve.ModelInferResponse:
        return await self._infer(request, deadline_of(context))

    async def _infer(
        self, request: kserve.ModelInferRequest, deadline_s: float | None
    ) -> kserve.ModelInferResponse:
        started = time.perf_counter()
        infer_request = to_infer_request(request, self._api)
        input_s = time.perf_counter() - started
        result = await self._api.infer(infer_request, deadline_s)
        started = time.perf_counter()
        specs = self._api.outputs(self._api.route(result.model))
        response = encode_result(result, specs, request.id)
        output_s = time.perf_counter() - started
        # Triton's compute_input / compute_output take the tensor conversion both ways.
        self._api.record_conversion(result.model, result.version, input_s, output_s)
        return response

    async def _stream_answer(
        self, request: kserve.ModelInferRequest | InvalidArgument, deadline_s: float | None
    ) -> kserve.ModelStreamInferResponse:
        if isinstance(request, InvalidArgument):
            return _stream_error(_as_request(request), request)
        try:
            response = await self._infer(request, deadline_s)
        except Exception as exc:
            return _stream_error(request, as_segserve_error(exc, "a ModelStreamInfer request"))
        return kserve.ModelStreamInferResponse(infer_response=response)

    def ModelStreamInfer(
        self,
        frames: AsyncIterator[kserve.ModelInferRequest | InvalidArgument],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[kserve.ModelStreamInferResponse]:
        """One answer per request, in request order.

        Flow control: a request takes one of max_inflight_requests slots when it is read, and
        gives it back only once its answer has been yielded and gRPC has resumed this generator,
        i.e. the send completed (HTTP/2 flow control: the transport takes only what the client's
        window allows). So at most max_inflight_requests requests are running or answered but
        not sent at once, and a client that stops reading answers soon stops the server reading
        (and running) its requests.

        A request that fails gets its error in `error_message` ("CODE: message") and the stream
        goes on. When the server drains, reading stops, every request read is answered, and the
        stream ends with UNAVAILABLE. A stream with a deadline stops reading shortly before it
        (stream_deadline_margin_s), answers every request read (unfinished ones
        DEADLINE_EXCEEDED) and ends DEADLINE_EXCEEDED.
        """
        cut_at_s = stream_cut_at(context, self._deadline_margin_s)

        async def answer(
            request: kserve.ModelInferRequest | InvalidArgument,
        ) -> kserve.ModelStreamInferResponse:
            return await self._stream_answer(request, cut_at_s)

        def cut(
            request: kserve.ModelInferRequest | InvalidArgument,
        ) -> kserve.ModelStreamInferResponse:
            late = DeadlineExceeded("the stream's deadline came before this request was answered")
            return _stream_error(_as_request(request), late)

        return ordered_stream(
            frames,
            StreamHandler(answer=answer, cut=cut),
            context,
            self._limits,
            self.draining,
            cut_at_s,
        )


def _check_repository(name: str) -> None:
    if name:
        raise InvalidArgument(f"repository {name!r}: segserve serves one repository (use '')")


def _config_override(
    model: str, parameters: dict[str, kserve.ModelRepositoryParameter]
) -> str | None:
    """The "config" parameter (Triton: the model config as JSON) as config.pbtxt text."""
    files = sorted(key for key in parameters if key.startswith("file:"))
    if files:
        raise InvalidArgument(
            f"RepositoryModelLoad file overrides {files} are not supported by segserve: write "
            "the files into the model's folder of the repository, then load it"
        )
    unknown = sorted(set(parameters) - {"config"})
    if unknown:
        raise InvalidArgument(
            f"RepositoryModelLoad parameters {unknown} are not supported (supported: config)"
        )
    if "config" not in parameters:
        return None
    parameter = parameters["config"]
    if parameter.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument("RepositoryModelLoad parameter 'config' must be a JSON string")
    try:
        config = json_format.Parse(parameter.string_param, mc.ModelConfig())
    except json_format.ParseError as exc:
        raise InvalidArgument(
            f"RepositoryModelLoad 'config' of model {model!r} is not a model config in JSON: {exc}"
        ) from exc
    text: str = text_format.MessageToString(config)
    return text


def _check_loaded(model: Model) -> None:
    """A load whose versions did not all come up answers INVALID_ARGUMENT with why (Triton's
    code for a failed load); older versions may still serve (RepositoryIndex says)."""
    failure = model.load_failure
    if failure:
        raise InvalidArgument(f"failed to load model {model.name!r}: {failure}")


def _as_request(
    request: kserve.ModelInferRequest | InvalidArgument,
) -> kserve.ModelInferRequest:
    """The request an answer echoes (an empty one for a message that did not parse)."""
    return kserve.ModelInferRequest() if isinstance(request, InvalidArgument) else request


def _stream_error(
    request: kserve.ModelInferRequest, error: SegserveError
) -> kserve.ModelStreamInferResponse:
    failed = kserve.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    return kserve.ModelStreamInferResponse(
        error_message=f"{error.code.name}: {error.message}", infer_response=failed
    )
