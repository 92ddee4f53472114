"""The KServe v2 REST protocol (Triton's HTTP API) on the HTTP port, under /v2.

Health (`/v2/health/live`, `/v2/health/ready`), server metadata (`/v2`), per model (and
`/versions/{v}`): metadata, `ready`, `config`, `stats`, `infer`; `/v2/models/stats`;
`POST /v2/repository/index`, `.../models/{name}/load` and `/unload` (admin). Every answer but
infer comes from the same `kserve_v2.KServeServicer` methods the gRPC port runs, printed as
Triton prints them (protobuf JSON, field names as in the proto, 64-bit integers as numbers);
infer converts its JSON and binary tensors to the gRPC request and runs `TensorAPI.infer`, so
both ports share routes, checks, batches and statistics.

Infer bodies are JSON, or JSON followed by binary tensors (Triton's binary-data extension: the
`Inference-Header-Content-Length` header gives the JSON's length; an input with parameter
`binary_data_size` takes that many bytes, in input order; BYTES elements each prefixed by their
little-endian uint32 length). An output is answered binary when it asks `binary_data: true`,
or else when the request parameter `binary_data_output` is true; otherwise as JSON `data`
(BYTES as UTF-8 strings). Request bodies may be gzip or deflate (`Content-Encoding`). Errors
are Triton's `{"error": message}` with the status of `http_app.HTTP_STATUSES`; not ready is
400, as Triton answers it.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from typing import Any, cast

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from tritonclient.grpc import service_pb2 as kserve

from segserve_server.adapters.http_app import (
    HttpState,
    check_model,
    deadline_of,
    endpoint,
    may_use,
    read_body,
    unless_disconnected,
)
from segserve_server.adapters.kserve_tensors import to_infer_request
from segserve_server.adapters.kserve_v2 import KServeServicer
from segserve_server.core.tensors import DATATYPES, InferResult
from segserve_server.errors import BodyTooLarge, InvalidArgument

__all__ = ["HEADER_LENGTH", "message_json", "parse_infer", "routes"]

HEADER_LENGTH = "Inference-Header-Content-Length"
_NO_CONTEXT = cast(grpc.aio.ServicerContext, None)  # the servicer methods called here read none
_INT64 = (
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
)
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def routes(state: HttpState) -> list[BaseRoute]:
    servicer = KServeServicer(state.tensors, max_inflight_requests=1)
    servicer.draining = state.draining
    api = _Routes(servicer, state)
    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    table: list[BaseRoute] = [
        Route("/v2/health/live", endpoint(api.live), methods=["GET"]),
        Route("/v2/health/ready", endpoint(api.ready), methods=["GET"]),
        Route("/v2", endpoint(api.server_metadata), methods=["GET"]),
        Route("/v2/models/stats", endpoint(api.statistics), methods=["GET"]),
        Route("/v2/repository/index", endpoint(api.index), methods=["POST"]),
        Route("/v2/repository/models/{name}/load", endpoint(api.load), methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", endpoint(api.unload), methods=["POST"]),
    ]
    for prefix in (model, versioned):
        table += [
            Route(prefix, endpoint(api.metadata), methods=["GET"]),
            Route(prefix + "/ready", endpoint(api.model_ready), methods=["GET"]),
            Route(prefix + "/config", endpoint(api.config), methods=["GET"]),
            Route(prefix + "/stats", endpoint(api.statistics), methods=["GET"]),
            Route(prefix + "/infer", endpoint(api.infer), methods=["POST"]),
        ]
    return table


def _fix_int64(data: dict[str, Any], descriptor: Descriptor) -> None:
    """protobuf JSON prints 64-bit integers as strings; Triton prints numbers."""
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                inner = field.message_type.fields_by_name["value"]
                for key, item in value.items():
                    if inner.message_type is not None:
                        _fix_int64(item, inner.message_type)
                    elif inner.type in _INT64:
                        value[key] = int(item)
            elif field.is_repeated:
                for item in value:
                    _fix_int64(item, field.message_type)
            else:
                _fix_int64(value, field.message_type)
        elif field.type in _INT64:
            is_list = field.is_repeated
            data[field.name] = [int(v) for v in value] if is_list else int(value)


def message_json(message: Message) -> dict[str, Any]:
    """A protocol message as Triton's HTTP API prints it."""
    data: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _fix_int64(data, message.DESCRIPTOR)
    return data


def _ready_answer(key: str, ready: bool) -> Response:
    return JSONResponse({key: ready}, status_code=200 if ready else 400)


async def _json_body(request: Request, limit_bytes: int) -> dict[str, Any]:
    body = _decompressed(request, await read_body(request, limit_bytes), limit_bytes)
    if not body.strip():
        return {}
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument(f"request body is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise InvalidArgument("request body is not a JSON object")
    return document


def _decompressed(request: Request, body: bytes, limit_bytes: int) -> bytes:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in _WBITS:
        raise InvalidArgument(f"Content-Encoding {encoding[:40]!r} is not gzip or deflate")
    inflater = zlib.decompressobj(_WBITS[encoding])
    try:
        data = inflater.decompress(body, limit_bytes + 1)
    except zlib.error as exc:
        raise InvalidArgument(f"request body is not valid {encoding}: {exc}") from exc
    if len(data) > limit_bytes:
        raise BodyTooLarge(
            f"request body inflates past max_receive_message_bytes ({limit_bytes} bytes)"
        )
    if not inflater.eof:
        raise InvalidArgument(f"request body is not valid {encoding}: it ends early")
    return data


def _parameter(message: Any, key: str, value: object, where: str) -> None:
    """Sets InferParameter / ModelRepositoryParameter `key` of a map from a JSON value."""
    target = message[key]
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float) and hasattr(target, "double_param"):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise InvalidArgument(f"{where} parameter {key!r} = {str(value)[:80]} is not a scalar")


def _json_contents(name: str, datatype: str, data: object) -> bytes:
    """JSON `data` (nested or flat, row-major) as the raw contents of the gRPC request."""
    bytes_type = datatype == "BYTES"
    try:  # nested lists in C, not element by element
        array = np.array(data, dtype=np.object_ if bytes_type else None).reshape(-1)
    except ValueError as exc:  # ragged
        raise InvalidArgument(f"input {name!r}: data is not a regular nested list: {exc}") from exc
    if bytes_type:
        chunks = []
        for value in array:
            if not isinstance(value, str):
                raise InvalidArgument(
                    f"input {name!r}: BYTES data holds a non-string {value!r:.40}"
                )
            encoded = value.encode("utf-8", "surrogatepass")
            chunks.append(struct.pack("<I", len(encoded)) + encoded)
        return b"".join(chunks)
    dtype = DATATYPES[datatype]
    kinds = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
    if array.size and array.dtype.kind not in kinds:
        raise InvalidArgument(f"input {name!r}: data does not hold only {datatype} values")
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidArgument(f"input {name!r}: a value is out of the range of {datatype}")
    return np.ascontiguousarray(array.astype(dtype)).tobytes()


def parse_infer(
    document: dict[str, Any], binary: memoryview, name: str, version: str
) -> tuple[kserve.ModelInferRequest, dict[str, bool]]:
    """A JSON infer request (with its binary tail) as the gRPC request, and whether each
    requested output asks to be binary."""
    request = kserve.ModelInferRequest(model_name=name, model_version=version)
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument(f"id {str(request_id)[:80]} is not a string")
    request.id = request_id
    parameters = document.get("parameters") or {}
    inputs = document.get("inputs")
    outputs = document.get("outputs") or []
    if not isinstance(parameters, dict) or not isinstance(outputs, list):
        raise InvalidArgument("parameters must be an object and outputs a list")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("request has no inputs (a list of tensors)")
    for key, value in parameters.items():
        _parameter(request.parameters, key, value, "request")
    offset = 0
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise InvalidArgument(f"inputs[{index}] is not an object")
        tname, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not isinstance(tname, str) or not isinstance(datatype, str):
            raise InvalidArgument(f"inputs[{index}] needs a name and a datatype")
        if datatype not in DATATYPES:
            raise InvalidArgument(f"input {tname!r}: datatype {datatype[:40]!r} is not known")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and abs(d) < 2**62 for d in shape
        ):
            raise InvalidArgument(f"input {tname!r}: shape {str(shape)[:80]} is not a list of ints")
        entry = request.inputs.add(name=tname, datatype=datatype, shape=shape)
        tensor_parameters = tensor.get("parameters") or {}
        if not isinstance(tensor_parameters, dict):
            raise InvalidArgument(f"input {tname!r}: parameters is not an object")
        size = tensor_parameters.get("binary_data_size")
        for key, value in tensor_parameters.items():
            if key != "binary_data_size":
                _parameter(entry.parameters, key, value, f"input {tname!r}")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidArgument(f"input {tname!r}: binary_data_size {size!r:.40} is not >= 0")
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"input {tname!r}: binary_data_size {size} but {len(binary) - offset} "
                    "bytes of binary data remain"
                )
            request.raw_input_contents.append(bytes(binary[offset : offset + size]))
            offset += size
        elif "data" in tensor:
            request.raw_input_contents.append(_json_contents(tname, datatype, tensor["data"]))
        else:
            raise InvalidArgument(f"input {tname!r} has neither data nor binary_data_size")
    if offset != len(binary):
        raise InvalidArgument(f"{len(binary) - offset} bytes of binary data follow the inputs")
    default_binary = parameters.get("binary_data_output", False) is True
    binary_outputs: dict[str, bool] = {}
    for index, output in enumerate(outputs):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise InvalidArgument(f"outputs[{index}] is not an object with a name")
        output_parameters = output.get("parameters") or {}
        if not isinstance(output_parameters, dict):
            raise InvalidArgument(f"output {output['name']!r}: parameters is not an object")
        entry_out = request.outputs.add(name=output["name"])
        for key, value in output_parameters.items():
            if key != "binary_data":
                _parameter(entry_out.parameters, key, value, f"output {output['name']!r}")
        binary_outputs[output["name"]] = output_parameters.get("binary_data", default_binary)
    binary_outputs[""] = default_binary  # for the outputs not asked for by name
    return request, binary_outputs


def _raw(array: np.ndarray) -> bytes:
    if array.dtype == np.object_:
        return b"".join(struct.pack("<I", len(e)) + bytes(e) for e in array.reshape(-1))
    return np.ascontiguousarray(array).tobytes()


def _json_data(name: str, array: np.ndarray) -> list[Any]:
    if array.dtype != np.object_:
        values: list[Any] = array.reshape(-1).tolist()
        return values
    try:
        return [bytes(e).decode("utf-8") for e in array.reshape(-1)]
    except UnicodeDecodeError:
        raise InvalidArgument(
            f"output {name!r} holds bytes that are not UTF-8: ask for it with binary_data"
        ) from None


def _infer_response(
    result: InferResult, datatypes: dict[str, str], request_id: str, binary: dict[str, bool]
) -> Response:
    header: dict[str, Any] = {"model_name": result.model, "model_version": str(result.version)}
    if request_id:
        header["id"] = request_id
    tails: list[bytes] = []
    outputs = []
    for name, array in result.outputs.items():
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatypes[name],
            "shape": list(array.shape),
        }
        if binary.get(name, binary[""]):
            raw = _raw(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        else:
            entry["data"] = _json_data(name, array)
        outputs.append(entry)
    header["outputs"] = outputs
    text = json.dumps(header, allow_nan=True).encode()
    if not tails:
        return Response(text, media_type="application/json")
    return Response(
        b"".join([text, *tails]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(text))},
    )


class _Routes:
    def __init__(self, servicer: KServeServicer, state: HttpState) -> None:
        self._servicer = servicer
        self._state = state
        self._limit = state.settings.max_receive_message_bytes

    async def live(self, request: Request) -> Response:
        answer = await self._servicer.ServerLive(kserve.ServerLiveRequest(), _NO_CONTEXT)
        return _ready_answer("live", answer.live)

    async def ready(self, request: Request) -> Response:
        answer = await self._servicer.ServerReady(kserve.ServerReadyRequest(), _NO_CONTEXT)
        return _ready_answer("ready", answer.ready)

    async def server_metadata(self, request: Request) -> Response:
        answer = await self._servicer.ServerMetadata(kserve.ServerMetadataRequest(), _NO_CONTEXT)
        return JSONResponse(message_json(answer))

    def _model(self, request: Request) -> tuple[str, str]:
        name: str = request.path_params["name"]
        check_model(request, name, kserve_names=True)
        return name, request.path_params.get("version", "")

    async def model_ready(self, request: Request) -> Response:
        name, version = self._model(request)
        answer = await self._servicer.ModelReady(
            kserve.ModelReadyRequest(name=name, version=version), _NO_CONTEXT
        )
        return _ready_answer("ready", answer.ready)

    async def metadata(self, request: Request) -> Response:
        name, version = self._model(request)
        answer = await self._servicer.ModelMetadata(
            kserve.ModelMetadataRequest(name=name, version=version), _NO_CONTEXT
        )
        return JSONResponse(message_json(answer))

    async def config(self, request: Request) -> Response:
        name, version = self._model(request)
        answer = await self._servicer.ModelConfig(
            kserve.ModelConfigRequest(name=name, version=version), _NO_CONTEXT
        )
        return JSONResponse(message_json(answer.config))

    async def statistics(self, request: Request) -> Response:
        name, version = self._model(request) if "name" in request.path_params else ("", "")
        answer = await self._servicer.ModelStatistics(
            kserve.ModelStatisticsRequest(name=name, version=version), _NO_CONTEXT
        )
        stats = message_json(answer)
        stats["model_stats"] = [
            s for s in stats["model_stats"] if may_use(request, s["name"], kserve_names=True)
        ]
        return JSONResponse(stats)

    async def index(self, request: Request) -> Response:
        body = await _json_body(request, self._limit)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument(f"ready = {str(ready)[:40]} is not true or false")
        answer = await self._servicer.RepositoryIndex(
            kserve.RepositoryIndexRequest(ready=ready), _NO_CONTEXT
        )
        models = message_json(answer).get("models", [])
        return JSONResponse([m for m in models if may_use(request, m["name"], kserve_names=True)])

    def _repository_parameters(self, body: dict[str, Any], message: Any, what: str) -> None:
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidArgument(f"{what} parameters is not an object")
        for key, value in parameters.items():
            _parameter(message.parameters, key, value, what)

    async def load(self, request: Request) -> Response:
        name, _ = self._model(request)
        load = kserve.RepositoryModelLoadRequest(model_name=name)
        self._repository_parameters(await _json_body(request, self._limit), load, "load")
        await self._servicer.RepositoryModelLoad(load, _NO_CONTEXT)
        return JSONResponse({})

    async def unload(self, request: Request) -> Response:
        name, _ = self._model(request)
        unload = kserve.RepositoryModelUnloadRequest(model_name=name)
        self._repository_parameters(await _json_body(request, self._limit), unload, "unload")
        await self._servicer.RepositoryModelUnload(unload, _NO_CONTEXT)
        return JSONResponse({})

    async def infer(self, request: Request) -> Response:
        name, version = self._model(request)
        deadline_s = deadline_of(request)
        body = _decompressed(request, await read_body(request, self._limit), self._limit)
        started = time.perf_counter()
        header_text = request.headers.get(HEADER_LENGTH)
        split = len(body)
        if header_text is not None:
            if not (header_text.isascii() and header_text.isdigit()) or int(header_text) > split:
                raise InvalidArgument(
                    f"{HEADER_LENGTH} {header_text[:40]!r} is not a length within the "
                    f"{split}-byte body"
                )
            split = int(header_text)
        view = memoryview(body)
        try:
            document = json.loads(view[:split].tobytes())
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidArgument(f"inference header is not JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise InvalidArgument("inference header is not a JSON object")
        grpc_request, binary = parse_infer(document, view[split:], name, version)
        api = self._state.tensors
        infer_request = to_infer_request(grpc_request, api)
        input_s = time.perf_counter() - started
        result = await unless_disconnected(request, api.infer(infer_request, deadline_s))
        started = time.perf_counter()
        specs = api.outputs(api.route(result.model))
        response = _infer_response(
            result, {s.name: s.datatype for s in specs}, grpc_request.id, binary
        )
        api.record_conversion(result.model, result.version, input_s, time.perf_counter() - started)
        return response
