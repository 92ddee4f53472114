"""Reads a Triton-style model repository: `<model>/config.pbtxt` and `<model>/<version>/<file>`.

config.pbtxt is parsed with the ModelConfig protobuf that tritonclient ships, so any file Triton
accepts parses here the same way. Segmentation metadata lives where Triton tolerates it:
class names in the output's `label_filename`, everything else in `parameters` under `segserve.*`:

    segserve.mean, segserve.std   "0.485,0.456,0.406": per channel, on pixels scaled to 0..1
    segserve.channel_order        "RGB" (default) or "BGR": the channel order the model expects
    segserve.colors               "128,128,128;128,0,0;...": one R,G,B per class, by class id
    segserve.description          free text
    segserve.flip_average         "true": serve the test-time flip-averaging variant of each
                                  version (<version>/model.flip.onnx, `segserve flip-average`)

Where the model runs (read by segserve_server.backends; see backends/triton.py for details):

    segserve.backend              "onnxruntime" (in-process) or "triton" (remote Triton servers)
    segserve.triton_urls          "host:port,host:port": the model's Triton servers
    segserve.triton_model         its name on those servers, if not its own
    segserve.triton_model_version a version number or "latest"; default: the same version

Which pipeline prepares images and reduces outputs (docs/gpu.md):

    segserve.pipeline             "host" (default: numpy and OpenCV on the CPU) or "device" (torch
                                  on segserve.device: decode, resize, normalise, argmax, resize back)
    segserve.device               "cuda", "cuda:N" or "cpu" (default "cuda:0"); device pipeline only

Tiled inference of images larger than the model (core/tiling.py, docs/imaging.md):

    segserve.tiling               "off" (default: every image is resized to the input) or "on"
    segserve.tile_overlap_px      least overlap of neighbouring tiles, in model pixels (default 32,
                                  or a quarter of the input's shorter side if less)
    segserve.tile_scale           image pixels per model pixel (default 1: full resolution)
    segserve.tile_blend           "auto" (scores or confidence where the model gives them) or
                                  "centre" (each pixel from the tile whose centre is nearest)
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from segserve_server import model_parameters as params
from segserve_server.errors import ModelConfigError
from segserve_server.model_parameters import (
    PIPELINES,
    TilingConfig,
    default_palette,
    flip_average_filename,
)
from segserve_server.priorities import (
    DEFAULT_STREAK_LIMIT,
    PriorityConfig,
    QueuePolicy,
    parse_priorities,
)

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_MODEL_FILENAMES",
    "DEFAULT_STREAK_LIMIT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PIPELINES",
    "BatchingConfig",
    "ModelClass",
    "ModelConfig",
    "PriorityConfig",
    "QueuePolicy",
    "RepositoryEntry",
    "TilingConfig",
    "default_palette",
    "flip_average_filename",
    "model_dirs",
    "parse_config",
    "scan_entry",
    "scan_repository",
]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
DEFAULT_MODEL_FILENAMES = {
    "onnxruntime_onnx": "model.onnx",
    "onnxruntime": "model.onnx",
    "tensorrt_plan": "model.plan",
}

_NUMPY_DTYPES: dict[int, np.dtype] = {
    mc.TYPE_BOOL: np.dtype(np.bool_),
    mc.TYPE_UINT8: np.dtype(np.uint8),
    mc.TYPE_UINT16: np.dtype(np.uint16),
    mc.TYPE_UINT32: np.dtype(np.uint32),
    mc.TYPE_UINT64: np.dtype(np.uint64),
    mc.TYPE_INT8: np.dtype(np.int8),
    mc.TYPE_INT16: np.dtype(np.int16),
    mc.TYPE_INT32: np.dtype(np.int32),
    mc.TYPE_INT64: np.dtype(np.int64),
    mc.TYPE_FP16: np.dtype(np.float16),
    mc.TYPE_FP32: np.dtype(np.float32),
    mc.TYPE_FP64: np.dtype(np.float64),
}
_INPUT_DTYPES = {np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32)}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching as config.pbtxt sets it; max_batch_size 1 and no delay when absent."""

    max_batch_size: int = 1
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    max_queue_size: int = 0  # the default queue policy's; 0: unbounded, as in Triton
    enabled: bool = False
    priority: PriorityConfig = field(default_factory=PriorityConfig)

    def __post_init__(self) -> None:
        """max_queue_size is the default queue policy's: given alone, it becomes that."""
        policy = self.priority.default_policy
        if self.max_queue_size and not policy.max_queue_size:
            policy = dataclasses.replace(policy, max_queue_size=self.max_queue_size)
            priority = dataclasses.replace(self.priority, default_policy=policy)
            object.__setattr__(self, "priority", priority)


@dataclass(frozen=True)
class ModelClass:
    id: int
    name: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class ModelConfig:
    """What segserve needs to know of one model, checked for consistency."""

    name: str
    platform: str
    input_name: str
    input_dtype: np.dtype
    input_layout: str  # "NCHW" or "NHWC"
    input_height: int
    input_width: int
    output_name: str
    output_dtype: np.dtype
    outputs_labels: bool
    classes: tuple[ModelClass, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str
    batching: BatchingConfig
    instance_count: int
    use_gpu: bool
    accelerators: tuple[str, ...]
    model_filename: str
    description: str
    raw: mc.ModelConfig = field(repr=False, compare=False)
    confidence_output: str | None = None
    """A label model's second output, per-pixel confidence (uint8, 255 = certain); None: none.
    Backends answer it stacked behind the labels: (2, H, W) per image, labels first."""
    flip_average: bool = False
    """segserve.flip_average: the ONNX Runtime backend loads flip_average_filename(model_filename)
    of each version, whose scores are the mean of the image's and its mirror's."""
    pipeline: str = "host"
    """segserve.pipeline: "host" (numpy on the CPU) or "device" (torch on `device`)."""
    device: str = "cuda:0"
    """segserve.device: where the device pipeline runs ("cuda:N" or "cpu")."""
    tiling: TilingConfig = field(default_factory=TilingConfig)
    """segserve.tiling, tile_overlap_px, tile_scale, tile_blend (core/tiling.py)."""

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        return [c.color for c in self.classes]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One image's input shape, without the batch dim: (3, H, W) or (H, W, 3)."""
        if self.input_layout == "NCHW":
            return (3, self.input_height, self.input_width)
        return (self.input_height, self.input_width, 3)

    @property
    def output_names(self) -> tuple[str, ...]:
        """The outputs a backend asks the model for: labels or scores, then confidence."""
        if self.confidence_output is None:
            return (self.output_name,)
        return (self.output_name, self.confidence_output)


@dataclass
class RepositoryEntry:
    """One model folder: its parsed config (or why it failed) and its version folders."""

    name: str
    path: Path
    versions: dict[int, Path]
    config: ModelConfig | None = None
    error: str | None = None

    @property
    def versions_to_load(self) -> list[int]:
        """The versions the config's version_policy selects (Triton's default: the latest one)."""
        if self.config is None or not self.versions:
            return []
        policy = self.config.raw.version_policy
        available = sorted(self.versions)
        kind = policy.WhichOneof("policy_choice")
        if kind == "all":
            return available
        if kind == "specific":
            return [v for v in available if v in set(policy.specific.versions)]
        count = policy.latest.num_versions if kind == "latest" else 1
        return available[-max(count, 1) :]


def _strip_batch_dim(dims: list[int], max_batch_size: int, what: str) -> list[int]:
    if max_batch_size > 0:
        return dims
    if not dims or dims[0] not in (1, -1):
        raise ModelConfigError(
            f"{what} dims {dims} need a leading batch dim when max_batch_size is 0"
        )
    return dims[1:]


def parse_config(text: str, model_dir: Path) -> ModelConfig:
    """Parses config.pbtxt text of the model in `model_dir` into a checked ModelConfig."""
    raw = mc.ModelConfig()
    try:
        text_format.Parse(text, raw)
    except text_format.ParseError as exc:
        raise ModelConfigError(f"config.pbtxt does not parse: {exc}") from exc
    name = raw.name or model_dir.name
    if raw.name and raw.name != model_dir.name:
        raise ModelConfigError(
            f"config name {raw.name!r} differs from its folder {model_dir.name!r}"
        )
    platform = raw.platform or raw.backend
    if len(raw.input) != 1:
        raise ModelConfigError(
            f"a segmentation model has one input (an image), not {len(raw.input)}"
        )
    if not 1 <= len(raw.output) <= 2:
        raise ModelConfigError(
            f"segserve serves models with one output (labels or scores) and optionally a "
            f"confidence output, not {len(raw.output)} outputs"
        )
    model_input, model_output = raw.input[0], raw.output[0]

    input_dtype = _NUMPY_DTYPES.get(model_input.data_type)
    if input_dtype is None or input_dtype not in _INPUT_DTYPES:
        raise ModelConfigError(
            f"input {model_input.name!r} has type {mc.DataType.Name(model_input.data_type)}; "
            "image inputs are TYPE_FP32, TYPE_FP16 or TYPE_UINT8"
        )
    in_dims = _strip_batch_dim(list(model_input.dims), raw.max_batch_size, "input")
    layout = "NHWC" if model_input.format == mc.ModelInput.FORMAT_NHWC else "NCHW"
    if len(in_dims) != 3:
        raise ModelConfigError(f"input dims {in_dims} are not an image (C,H,W) or (H,W,C)")
    channels, height, width = in_dims if layout == "NCHW" else (in_dims[2], in_dims[0], in_dims[1])
    if channels != 3 or height <= 0 or width <= 0:
        raise ModelConfigError(
            f"input dims {in_dims} ({layout}) must be 3 channels and a fixed positive height, width"
        )

    output_dtype = _NUMPY_DTYPES.get(model_output.data_type)
    if output_dtype is None:
        raise ModelConfigError(
            f"output type {mc.DataType.Name(model_output.data_type)} is not a numeric tensor"
        )
    out_dims = _strip_batch_dim(list(model_output.dims), raw.max_batch_size, "output")
    if len(out_dims) == 2:
        outputs_labels = True
        if not np.issubdtype(output_dtype, np.integer):
            raise ModelConfigError(f"a label output (dims {out_dims}) must be an integer type")
    elif len(out_dims) == 3:
        outputs_labels = False
    else:
        raise ModelConfigError(
            f"output dims {out_dims} are neither labels (H,W) nor scores (C,H,W)"
        )
    if out_dims[-2:] != [height, width]:
        raise ModelConfigError(
            f"output dims {out_dims} do not end with the input's {height},{width}"
        )

    confidence_output = _confidence_output(raw, outputs_labels, out_dims)
    names = _class_names(model_output.label_filename, model_dir)
    if not outputs_labels:
        if names and len(names) != out_dims[0]:
            raise ModelConfigError(f"{len(names)} class names for {out_dims[0]} output channels")
        names = names or [f"class_{i}" for i in range(out_dims[0])]
    if not names:
        raise ModelConfigError("a label-output model needs a label_filename naming its classes")
    if len(names) > 256:
        raise ModelConfigError(f"{len(names)} classes; label maps hold at most 256")
    colors = params.colors(raw, len(names))

    channel_order = (params.parameter(raw, "segserve.channel_order") or "RGB").upper()
    if channel_order not in ("RGB", "BGR"):
        raise ModelConfigError(f"segserve.channel_order {channel_order!r} is not RGB or BGR")
    std = params.floats(raw, "segserve.std", IMAGENET_STD)
    if any(s == 0 for s in std):
        raise ModelConfigError(f"segserve.std {std} has a zero")

    pipeline, device = params.pipeline_and_device(raw)
    gpu_kinds = {mc.ModelInstanceGroup.KIND_GPU}
    groups = list(raw.instance_group)
    accelerators = tuple(
        a.name for a in raw.optimization.execution_accelerators.gpu_execution_accelerator
    )
    return ModelConfig(
        name=name,
        platform=platform,
        input_name=model_input.name,
        input_dtype=input_dtype,
        input_layout=layout,
        input_height=height,
        input_width=width,
        output_name=model_output.name,
        output_dtype=output_dtype,
        outputs_labels=outputs_labels,
        confidence_output=confidence_output,
        classes=tuple(
            ModelClass(i, n, c) for i, (n, c) in enumerate(zip(names, colors, strict=True))
        ),
        mean=params.floats(raw, "segserve.mean", IMAGENET_MEAN),
        std=std,
        channel_order=channel_order,
        batching=_batching(raw),
        instance_count=max(1, sum(g.count or 1 for g in groups) if groups else 1),
        use_gpu=any(g.kind in gpu_kinds for g in groups),
        accelerators=accelerators,
        model_filename=raw.default_model_filename or DEFAULT_MODEL_FILENAMES.get(platform, ""),
        description=params.parameter(raw, "segserve.description") or "",
        raw=raw,
        flip_average=params.flip_average(raw),
        pipeline=pipeline,
        device=device,
        tiling=params.tiling(raw, pipeline, height, width),
    )


def _class_names(label_filename: str, model_dir: Path) -> list[str]:
    if not label_filename:
        return []
    path = model_dir / label_filename
    if not path.is_file():
        raise ModelConfigError(f"label_filename {label_filename!r} is missing from {model_dir}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _confidence_output(
    raw: mc.ModelConfig, outputs_labels: bool, label_dims: list[int]
) -> str | None:
    """The name of a label model's second output: per-pixel confidence, uint8 0-255 (the
    softmax maximum × 255, as tools/add_confidence.py adds it), the labels' dims."""
    if len(raw.output) == 1:
        return None
    second = raw.output[1]
    dims = _strip_batch_dim(list(second.dims), raw.max_batch_size, "confidence output")
    if not outputs_labels:
        raise ModelConfigError(
            "a second output is a confidence map beside labels; a scores model has its own"
        )
    if raw.output[0].data_type != mc.TYPE_UINT8:
        raise ModelConfigError(
            "a model with a confidence output gives its labels as TYPE_UINT8 (both are stacked)"
        )
    if second.data_type != mc.TYPE_UINT8 or dims != label_dims:
        raise ModelConfigError(
            f"second output {second.name!r} must be the confidence map: TYPE_UINT8 with the "
            f"labels' dims {label_dims} (has {mc.DataType.Name(second.data_type)} {dims})"
        )
    name: str = second.name
    return name


def _batching(raw: mc.ModelConfig) -> BatchingConfig:
    max_batch = max(raw.max_batch_size, 1)
    if not raw.HasField("dynamic_batching"):
        return BatchingConfig(max_batch_size=max_batch)
    dyn = raw.dynamic_batching
    preferred = tuple(sorted(set(dyn.preferred_batch_size)))
    if any(p < 1 or p > max_batch for p in preferred):
        raise ModelConfigError(f"preferred_batch_size {list(preferred)} outside 1..{max_batch}")
    return BatchingConfig(
        max_batch_size=max_batch,
        preferred_batch_sizes=preferred,
        max_queue_delay_us=dyn.max_queue_delay_microseconds,
        max_queue_size=dyn.default_queue_policy.max_queue_size,
        enabled=True,
        priority=parse_priorities(raw),
    )


def model_dirs(root: Path) -> list[Path]:
    """The model folders of `root`, by name (hidden folders are not models)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_entry(model_dir: Path, config_text: str | None = None) -> RepositoryEntry:
    """One model folder; config_text (None: its config.pbtxt) replaces the file's text. A
    folder that fails to parse carries its error."""
    versions = {int(p.name): p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()}
    entry = RepositoryEntry(name=model_dir.name, path=model_dir, versions=versions)
    config_path = model_dir / CONFIG_FILE
    try:
        if config_text is None:
            if not config_path.is_file():
                raise ModelConfigError(f"{config_path} is missing")
            config_text = config_path.read_text()
        entry.config = parse_config(config_text, model_dir)
        if not versions:
            raise ModelConfigError(f"{model_dir} has no numeric version folder")
    except ModelConfigError as exc:
        entry.error = str(exc)
        log.error("model %s is invalid: %s", model_dir.name, exc)
    return entry


def scan_repository(root: Path) -> list[RepositoryEntry]:
    """Lists every model folder of `root`; a folder that fails to parse carries its error."""
    return [scan_entry(model_dir) for model_dir in model_dirs(root)]
