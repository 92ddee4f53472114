"""What `segserve export` declares about a model, and the config.pbtxt it writes from that.

`ModelSpec` is the model and everything its repository entry says about it (classes, colours,
input size, normalisation, description); `BatchingOptions` are config.pbtxt's batching fields;
`config_text` writes config.pbtxt through Triton's ModelConfig protobuf, so that Triton's
onnxruntime backend and segserve's own parser both read it. `ExportError`, the error of every
export step, lives here as well: the other export modules all build on this one.

Importing this module does not import torch (`ModelSpec.model` is an ``nn.Module`` by type only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "LABELS_FILE",
    "MODEL_FILE",
    "BatchingOptions",
    "ExportError",
    "ModelSpec",
    "config_text",
]

LABELS_FILE = "labels.txt"
MODEL_FILE = "model.onnx"


class ExportError(Exception):
    """The export cannot go on; the message says why and what to change."""


@dataclass
class ModelSpec:
    """A torch model and everything the repository entry says about it."""

    model: nn.Module
    class_names: list[str]
    colors: list[tuple[int, int, int]]
    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str
    source: str
    channel_order: str = "RGB"
    metadata: dict[str, str] = field(default_factory=dict)  # ONNX metadata_props
    default_check_images: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class BatchingOptions:
    """config.pbtxt's max_batch_size and dynamic_batching."""

    max_batch_size: int = 8
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 2000
    max_queue_size: int = 64
    # Two levels, as Triton's priority_levels: 1 for real-time streams, 2 (the default) for the
    # rest, so that stream frames are batched ahead of bulk work.
    priority_levels: int = 2


def _numbers(values: Sequence[float]) -> str:
    return ",".join(repr(float(v)) for v in values)


def config_text(name: str, spec: ModelSpec, batching: BatchingOptions) -> str:
    """config.pbtxt of the entry, written through Triton's ModelConfig protobuf."""
    if batching.max_batch_size < 1:
        raise ExportError(f"max_batch_size {batching.max_batch_size} must be at least 1")
    bad = [p for p in batching.preferred_batch_sizes if not 1 <= p <= batching.max_batch_size]
    if bad:
        raise ExportError(f"preferred batch sizes {bad} are outside 1..{batching.max_batch_size}")
    raw = mc.ModelConfig(
        name=name, platform="onnxruntime_onnx", max_batch_size=batching.max_batch_size
    )
    raw.input.add(
        name="image",
        data_type=mc.TYPE_FP32,
        format=mc.ModelInput.FORMAT_NCHW,
        dims=[3, spec.height, spec.width],
    )
    raw.output.add(
        name="labels",
        data_type=mc.TYPE_UINT8,
        dims=[spec.height, spec.width],
        label_filename=LABELS_FILE,
    )
    # Per-pixel confidence (uint8, 255 x the top class probability), added to the graph beside
    # the argmax by training.confidence: for review routing (SegmentRequest.include_confidence).
    raw.output.add(name="confidence", data_type=mc.TYPE_UINT8, dims=[spec.height, spec.width])
    dyn = raw.dynamic_batching
    dyn.SetInParent()
    dyn.preferred_batch_size.extend(sorted(set(batching.preferred_batch_sizes)))
    dyn.max_queue_delay_microseconds = batching.max_queue_delay_us
    dyn.default_queue_policy.max_queue_size = batching.max_queue_size
    if batching.priority_levels:
        dyn.priority_levels = batching.priority_levels
        dyn.default_priority_level = batching.priority_levels
    raw.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    parameters = {
        "segserve.mean": _numbers(spec.mean),
        "segserve.std": _numbers(spec.std),
        "segserve.channel_order": spec.channel_order,
        "segserve.colors": ";".join(f"{r},{g},{b}" for r, g, b in spec.colors),
        "segserve.description": spec.description,
    }
    for key, value in parameters.items():
        raw.parameters[key].string_value = value
    header = (
        f"# Written by `segserve export` from {spec.source}.\n"
        "# Loads in Triton (onnxruntime backend) and in segserve; segserve.* parameters are "
        "segserve's metadata.\n"
    )
    body: str = text_format.MessageToString(raw)
    return header + body
