"""KServe v2 tensors: the protocol's protobuf (tritonclient.grpc service_pb2) to and from numpy.

Tensors arrive in `raw_input_contents` (one entry per input, BYTES elements each prefixed by
their little-endian uint32 length) or in the typed `contents` fields; answers always use
`raw_output_contents`, as Triton does. Shared memory regions and classification are refused.
"""

from __future__ import annotations

import math
import struct

import numpy as np
from tritonclient.grpc import service_pb2 as kserve

from segserve_server.core.tensors import (
    DATATYPES,
    InferRequest,
    InferResult,
    TensorAPI,
    TensorSpec,
)
from segserve_server.errors import InvalidArgument

__all__ = [
    "decode_inputs",
    "encode_result",
    "parameter_value",
    "parse_version",
    "to_infer_request",
]

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
        try:
            tensors[tensor.name] = array.reshape(shape)
        except ValueError as exc:  # empty, yet a dim past what numpy can index (0 x 2**62)
            raise InvalidArgument(
                f"input {tensor.name!r} has shape {list(shape)}, larger than an array can be"
            ) from exc
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
        version=parse_version(request.model_version),
        inputs=decode_inputs(request, api.inputs(route)),
        requested=tuple(requested),
        parameters={k: parameter_value(v) for k, v in request.parameters.items()},
    )


def parse_version(text: str) -> int:
    """A KServe model_version string as a number: '' and '-1' (Triton's "the latest") are 0,
    the serving version."""
    if not text or text.strip() == "-1":
        return 0
    if not (text.isascii() and text.isdigit()):  # str.isdigit takes '²' and '١' too
        raise InvalidArgument(
            f"model version {text!r} is not a version number ('' or -1: the serving one)"
        )
    return int(text)
