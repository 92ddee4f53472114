"""The vocabulary of the Triton-protocol view (core.tensors): the two routes of each model,
the KServe datatypes, tensor specs, requests and results, statistics, and the request
parameters segserve reads (`priority`, `timeout`, the image route's options)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from segserve_server.core.models import Model
from segserve_server.core.requests import Admission, MaskEncoding
from segserve_server.errors import InvalidArgument, ModelUnavailable
from segserve_server.model_repository import ModelConfig

__all__ = [
    "COUNTS_OUTPUT",
    "DATATYPES",
    "IMAGE_INPUT",
    "IMAGE_PARAMETERS",
    "IMAGE_SUFFIX",
    "MASK_OUTPUT",
    "RESERVED_PARAMETERS",
    "SEQUENCE_PARAMETERS",
    "SHAPE_OUTPUT",
    "Duration",
    "InferRequest",
    "InferResult",
    "Route",
    "RouteStats",
    "TensorSpec",
    "admission_of",
    "datatype_of",
    "dims_of",
    "image_options",
]


IMAGE_SUFFIX = ".image"
IMAGE_INPUT = "IMAGE_BYTES"
MASK_OUTPUT = "MASK_BYTES"
SHAPE_OUTPUT = "MASK_SHAPE"
COUNTS_OUTPUT = "CLASS_PIXEL_COUNTS"
IMAGE_PARAMETERS = ("mask_encoding", "output_size", "embed_palette", "ignore_exif_orientation")
# Parameters tritonclient sets itself: segserve honours priority and timeout (a queue timeout in
# microseconds, as Triton's queue policy allows it) and ignores the rest.
RESERVED_PARAMETERS = ("priority", "timeout", "headers", "binary_data_output")
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")

# KServe datatype names and their numpy types (BYTES: object arrays of bytes).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}


def datatype_of(config_type: int) -> str:
    """KServe's name of a config.pbtxt TYPE_*: TYPE_FP32 -> FP32, TYPE_STRING -> BYTES."""
    name = mc.DataType.Name(config_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as the protocol advertises it; -1 is any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def check(self, datatype: str, shape: Iterable[int]) -> tuple[int, ...]:
        """The request's shape if its datatype and shape fit, else InvalidArgument naming them."""
        shape = tuple(shape)
        if datatype != self.datatype:
            raise InvalidArgument(
                f"input {self.name!r} has datatype {datatype}; the model takes {self.datatype}"
            )
        if len(shape) != len(self.shape) or any(
            want != -1 and got != want for got, want in zip(shape, self.shape, strict=True)
        ):
            raise InvalidArgument(
                f"input {self.name!r} has shape {list(shape)}; the model takes {list(self.shape)} "
                "(-1: any size)"
            )
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"input {self.name!r} has a negative dim in {list(shape)}")
        return shape


@dataclass(frozen=True)
class Route:
    """One model name of the protocol: a repository model as tensors, or its image route."""

    name: str
    model: Model
    image: bool

    @property
    def config(self) -> ModelConfig:
        """The model's config; UNAVAILABLE if its config.pbtxt failed (the route still lists it)."""
        config = self.model.config
        if config is None:
            raise ModelUnavailable(f"model {self.name!r} is not ready: {self.model.reason}")
        return config


@dataclass
class Duration:
    count: int = 0
    seconds: float = 0.0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.seconds += seconds


@dataclass
class RouteStats:
    """Triton's inference statistics of one route and version, for requests of this protocol.

    As in Triton, the durations count requests: each successful request adds 1 to success,
    queue, compute_input, compute_infer and compute_output at once (perf_analyzer requires the
    counts to agree), a failed one to fail only; inference_count counts batch items.
    compute_input and compute_output also take the protocol adapter's tensor conversion
    (`TensorAPI.record_conversion`), added to the durations once the response is built.
    """

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    last_inference_ms: int = 0


@dataclass(frozen=True)
class InferResult:
    model: str
    version: int
    outputs: dict[str, np.ndarray]  # in the order the outputs were asked for (or config order)


@dataclass(frozen=True)
class InferRequest:
    """One protocol request, its tensors decoded (names checked against the route's inputs)."""

    route: str
    version: int
    inputs: dict[str, np.ndarray]
    requested: tuple[str, ...] = ()  # no names: every output
    parameters: dict[str, str | int | bool | float] = field(default_factory=dict)


def dims_of(config: ModelConfig, dims: Iterable[int]) -> tuple[int, ...]:
    batch = (-1,) if config.raw.max_batch_size > 0 else ()
    return (*batch, *dims)


def admission_of(parameters: dict[str, str | int | bool | float]) -> Admission:
    """Triton's `priority` and `timeout` (microseconds) request parameters: the level the
    request waits on, and its queue timeout where the level's queue policy allows overrides."""
    values = {}
    for key in ("priority", "timeout"):
        value = parameters.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            unit = " microseconds" if key == "timeout" else ""
            raise InvalidArgument(f"parameter {key} = {value!r} is not an int >= 0{unit}")
        values[key] = value
    return Admission(priority=values["priority"], timeout_us=values["timeout"])


def image_options(
    parameters: dict[str, str | int | bool | float],
) -> tuple[MaskEncoding, bool, bool, bool]:
    """(mask encoding, output at the model's size, embed palette, ignore EXIF orientation) from
    the request parameters."""
    for key in parameters:
        if (
            key not in IMAGE_PARAMETERS
            and key not in RESERVED_PARAMETERS
            and not key.startswith("triton_")
        ):
            raise InvalidArgument(
                f"parameter {key!r} is not one of the image route's {list(IMAGE_PARAMETERS)}"
            )
    encoding_name = parameters.get("mask_encoding", MaskEncoding.SRLE.value)
    encodings = {e.value: e for e in MaskEncoding}
    if not isinstance(encoding_name, str) or encoding_name.lower() not in encodings:
        raise InvalidArgument(
            f"parameter mask_encoding = {encoding_name!r} is not one of {sorted(encodings)}"
        )
    size = parameters.get("output_size", "original")
    if not isinstance(size, str) or size.lower() not in ("original", "model"):
        raise InvalidArgument(f"parameter output_size = {size!r} is not 'original' or 'model'")
    palette = parameters.get("embed_palette", False)
    if not isinstance(palette, bool):
        raise InvalidArgument(f"parameter embed_palette = {palette!r} is not a bool")
    ignore_orientation = parameters.get("ignore_exif_orientation", False)
    if not isinstance(ignore_orientation, bool):
        raise InvalidArgument(
            f"parameter ignore_exif_orientation = {ignore_orientation!r} is not a bool"
        )
    return encodings[encoding_name.lower()], size.lower() == "model", palette, ignore_orientation
