"""The KServe v2 / Triton gRPC protocol (inference.GRPCInferenceService) on segserve's own port.

Converts the protocol's messages (the generated code tritonclient ships, tritonclient.grpc
service_pb2) to numpy tensors and calls `tensor_api.TensorAPI`; nothing else. Implemented:
ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata, ModelConfig, ModelInfer,
ModelStreamInfer, RepositoryIndex, ModelStatistics. Every other method answers UNIMPLEMENTED
with a message. SegserveError becomes a gRPC status in `kserve_handler` only, and any other
exception is logged and becomes INTERNAL; in a stream, a failed request gets its status name and
message in `error_message` ("INTERNAL: ..." for an unexpected exception) and the stream goes on.

Tensors arrive in `raw_input_contents` (one entry per input, BYTES elements each prefixed by
their little-endian uint32 length) or in the typed `contents` fields; answers always use
`raw_output_contents`, as Triton does. Shared memory regions and classification are refused.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import service_pb2 as kserve

from segserve_server import __version__
from segserve_server.core.models import ModelState
from segserve_server.core.streams import StreamDrained, ordered_answers
from segserve_server.core.tensors import (
    DATATYPES,
    InferRequest,
    InferResult,
    Route,
    TensorAPI,
    TensorSpec,
)
from segserve_server.errors import InvalidArgument, ModelUnavailable, SegserveError

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
    "ModelStatistics",
)
EXTENSIONS = ("model_configuration", "statistics", "parameters", "segserve_image")
_CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_STATES = {
    ModelState.READY: "READY",
    ModelState.LOADING: "LOADING",
    ModelState.FAILED: "UNAVAILABLE",
    ModelState.UNLOADED: "UNAVAILABLE",
}


# Tensors: protobuf <-> numpy.


def parameter_value(parameter: kserve.InferParameter) -> str | int | bool | float:
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind is not None else ""


def _bytes_elements(data: bytes, name: str, count: int) -> np.ndarray:
    """Length-prefixed BYTES elements, exactly `count` of them, as an object array."""
    elements: list[bytes] = []
    view = memoryview(data)
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidArgument(f"input {name!r}: BYTES contents end inside a length prefix")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidArgument(
                f"input {name!r}: BYTES element {len(elements)} says {length} bytes but "
                f"{len(view) - offset} remain"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if len(elements) != count:
        raise InvalidArgument(
            f"input {name!r} holds {len(elements)} BYTES elements; its shape needs {count}"
        )
    array = np.empty(count, dtype=np.object_)
    array[:] = elements
    return array


def decode_inputs(
    request: kserve.ModelInferRequest, specs: list[TensorSpec]
) -> dict[str, np.ndarray]:
    """The request's input tensors, each checked against the route's spec of that name."""
    by_name = {spec.name: spec for spec in specs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    tensors: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        spec = by_name.get(tensor.name)
        if spec is None:
            raise InvalidArgument(
                f"input {tensor.name!r} is not an input of model {request.model_name!r} "
                f"(inputs: {sorted(by_name)})"
            )
        if tensor.name in tensors:
            raise InvalidArgument(f"input {tensor.name!r} is given twice")
        if "shared_memory_region" in tensor.parameters:
            raise InvalidArgument(
                f"input {tensor.name!r} names a shared memory region; segserve takes tensors "
                "in the request only"
            )
        shape = spec.check(tensor.datatype, tensor.shape)
        dtype = DATATYPES[spec.datatype]
        count = math.prod(shape)
        if raw:
            data = raw[index]
            if spec.datatype == "BYTES":
                array = _bytes_elements(data, tensor.name, count)
            else:
                needed = count * dtype.itemsize
                if len(data) != needed:
                    raise InvalidArgument(
                        f"input {tensor.name!r} has {len(data)} bytes of raw contents; "
                        f"{spec.datatype}{list(shape)} needs {needed}"
                    )
                array = np.frombuffer(data, dtype=dtype)
        else:
            field_name = _CONTENTS_FIELDS.get(spec.datatype)
            if field_name is None:
                raise InvalidArgument(
                    f"input {tensor.name!r} of datatype {spec.datatype} must come in raw_input_contents"
                )
            values = getattr(tensor.contents, field_name)
            if len(values) != count:
                raise InvalidArgument(
                    f"input {tensor.name!r} has {len(values)} values in contents.{field_name}; "
                    f"shape {list(shape)} needs {count}"
                )
            if spec.datatype == "BYTES":
                array = np.empty(count, dtype=np.object_)
                array[:] = list(values)
            else:
                try:
                    array = np.array(values, dtype=dtype)
                except OverflowError as exc:
                    raise InvalidArgument(f"input {tensor.name!r}: {exc}") from exc
        tensors[tensor.name] = array.reshape(shape)
    return tensors


def _raw_bytes(array: np.ndarray) -> bytes:
    if array.dtype == np.object_:
        return b"".join(struct.pack("<I", len(e)) + bytes(e) for e in array.reshape(-1))
    return np.ascontiguousarray(array).tobytes()


def encode_result(
    result: InferResult, specs: list[TensorSpec], request_id: str
) -> kserve.ModelInferResponse:
    datatypes = {spec.name: spec.datatype for spec in specs}
    response = kserve.ModelInferResponse(
        model_name=result.model, model_version=str(result.version), id=request_id
    )
    for name, array in result.outputs.items():
        response.outputs.add(name=name, datatype=datatypes[name], shape=list(array.shape))
        response.raw_output_contents.append(_raw_bytes(array))
    return response


def to_infer_request(request: kserve.ModelInferRequest, api: TensorAPI) -> InferRequest:
    if not request.model_name:
        raise InvalidArgument("request names no model")
    route = api.route(request.model_name)
    requested = []
    for output in request.outputs:
        for refused in ("shared_memory_region", "classification"):
            if refused in output.parameters:
                raise InvalidArgument(
                    f"output {output.name!r}: segserve does not support {refused}"
                )
        requested.append(output.name)
    return InferRequest(
        route=route.name,
        version=_version(request.model_version),
        inputs=decode_inputs(request, api.inputs(route)),
        requested=tuple(requested),
        parameters={k: parameter_value(v) for k, v in request.parameters.items()},
    )


def _version(text: str) -> int:
    if not text:
        return 0
    if not text.isdigit():
        raise InvalidArgument(f"model version {text!r} is not a number")
    return int(text)


def _deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _duration(duration: Any) -> kserve.StatisticDuration:
    return kserve.StatisticDuration(count=duration.count, ns=round(duration.seconds * 1e9))


# The gRPC glue: one place where SegserveError (or an unexpected exception) becomes a status.


def _parse(message_cls: type[Message], data: bytes) -> Any:
    try:
        return message_cls.FromString(data)
    except DecodeError as exc:
        raise InvalidArgument(
            f"request is not a valid {message_cls.DESCRIPTOR.full_name} message: {exc}"
        ) from exc


def kserve_handler(servicer: KServeServicer) -> grpc.GenericRpcHandler:
    """Handlers for every method of inference.GRPCInferenceService; requests are parsed here so
    that a malformed message is INVALID_ARGUMENT, every SegserveError becomes its code, and any
    other exception is logged and becomes INTERNAL."""
    handlers = {}
    for method in SERVICE.methods:
        request_cls = getattr(kserve, method.input_type.name)
        serialize = getattr(kserve, method.output_type.name).SerializeToString
        if method.name not in IMPLEMENTED:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unimplemented(method.name), response_serializer=serialize
            )
        elif method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _streaming(request_cls, getattr(servicer, method.name)),
                response_serializer=serialize,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(request_cls, getattr(servicer, method.name)), response_serializer=serialize
            )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def _unimplemented(name: str) -> Callable[..., Awaitable[Any]]:
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"segserve does not implement {name}: its models come from the repository at start, "
            f"and tensors travel in the request (implemented: {', '.join(IMPLEMENTED)})",
        )

    return handle


def _unary(
    request_cls: type[Message], behaviour: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(_parse(request_cls, data), context)
        except grpc.aio.AbortError:
            raise
        except SegserveError as exc:
            await context.abort(exc.code, exc.message)
        except Exception as exc:
            log.exception("KServe %s failed unexpectedly", behaviour.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    return handle


def _streaming(
    request_cls: type[Message], behaviour: Callable[..., AsyncIterator[Any]]
) -> Callable[..., AsyncIterator[Any]]:
    async def handle(
        frames: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for answer in behaviour(frames, context):
            yield answer

    return handle


class KServeServicer:
    """The implemented methods of inference.GRPCInferenceService, on parsed messages."""

    def __init__(self, api: TensorAPI, *, max_inflight_requests: int) -> None:
        self._api = api
        self._max_inflight = max_inflight_requests
        self.draining: asyncio.Event | None = None  # set by the server at start

    def _is_draining(self) -> bool:
        return self.draining is not None and self.draining.is_set()

    async def ServerLive(
        self, request: kserve.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> kserve.ServerLiveResponse:
        return kserve.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: kserve.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> kserve.ServerReadyResponse:
        ready = not self._is_draining() and any(
            r.model.state is ModelState.READY for r in self._api.routes()
        )
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
            self._api.ready_version(route, _version(request.version))
        except SegserveError:
            return kserve.ModelReadyResponse(ready=False)
        return kserve.ModelReadyResponse(ready=True)

    def _ready_route(self, name: str, version: str) -> Route:
        route = self._api.route(name)
        if route.model.config is None:
            raise ModelUnavailable(f"model {name!r} is not ready: {route.model.reason}")
        self._api.ready_version(route, _version(version))
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
            if not model.versions:
                if not request.ready:
                    index.models.add(name=route.name, state="UNAVAILABLE", reason=model.reason)
                continue
            for number, version in sorted(model.versions.items()):
                if request.ready and version.state is not ModelState.READY:
                    continue
                index.models.add(
                    name=route.name,
                    version=str(number),
                    state=_STATES[version.state],
                    reason=version.reason,
                )
        return index

    async def ModelStatistics(
        self, request: kserve.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> kserve.ModelStatisticsResponse:
        routes = [self._api.route(request.name)] if request.name else self._api.routes()
        wanted = _version(request.version)
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
                        success=_duration(stats.success),
                        fail=_duration(stats.fail),
                        queue=_duration(stats.queue),
                        compute_input=_duration(stats.compute_input),
                        compute_infer=_duration(stats.compute_infer),
                        compute_output=_duration(stats.compute_output),
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
        return await self._infer(request, _deadline_of(context))

    async def _infer(
        self, request: kserve.ModelInferRequest, deadline_s: float | None
    ) -> kserve.ModelInferResponse:
        infer_request = to_infer_request(request, self._api)
        result = await self._api.infer(infer_request, deadline_s)
        specs = self._api.outputs(self._api.route(result.model))
        return encode_result(result, specs, request.id)

    async def _stream_answer(
        self, data: bytes, deadline_s: float | None
    ) -> kserve.ModelStreamInferResponse:
        request = kserve.ModelInferRequest()
        try:
            request = _parse(kserve.ModelInferRequest, data)
            response = await self._infer(request, deadline_s)
        except SegserveError as exc:
            return _stream_error(request, f"{exc.code.name}: {exc.message}")
        except Exception as exc:
            log.exception("KServe stream request %r failed unexpectedly", request.id)
            return _stream_error(
                request, f"{grpc.StatusCode.INTERNAL.name}: {type(exc).__name__}: {exc}"
            )
        return kserve.ModelStreamInferResponse(infer_response=response)

    async def ModelStreamInfer(
        self, frames: AsyncIterator[bytes], context: grpc.aio.ServicerContext
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
        stream ends with UNAVAILABLE.
        """
        deadline_s = _deadline_of(context)
        try:
            async for answer in ordered_answers(
                frames,
                lambda data: self._stream_answer(data, deadline_s),
                max_inflight=self._max_inflight,
                draining=self.draining,
            ):
                yield answer
        except StreamDrained:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "server is draining: every request read was answered; send the rest to another replica",
            )


def _stream_error(
    request: kserve.ModelInferRequest, message: str
) -> kserve.ModelStreamInferResponse:
    failed = kserve.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    return kserve.ModelStreamInferResponse(error_message=message, infer_response=failed)
