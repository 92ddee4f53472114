"""Small ONNX segmentation models built with onnx.helper, whose answers are known in advance.

They are not trained: `colour_classes` labels each pixel by its dominant colour (dark, red,
green, blue, bright) with a 1x1 convolution, so tests can check real masks against expected
ones; `busy_colour_classes` adds 3x3 convolutions that cost time without changing the answer,
for tests that need a batch to be running. Written as complete repository entries by
`write_entry`, the same config.pbtxt layout the real models use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

COLOUR_CLASSES = ("dark", "red", "green", "blue", "bright")
COLOUR_PALETTE = ((0, 0, 0), (220, 40, 40), (40, 200, 40), (40, 80, 220), (250, 250, 250))
# Logit per class = W @ (r, g, b) + B, on pixels scaled to 0..1 (mean 0, std 1).
_WEIGHTS = np.array(
    [[-1, -1, -1], [2, -1, -1], [-1, 2, -1], [-1, -1, 2], [1, 1, 1]], dtype=np.float32
)
_BIASES = np.array([0.5, 0, 0, 0, -2.4], dtype=np.float32)
OPSET = 17


def expected_colour_labels(rgb: np.ndarray) -> np.ndarray:
    """What colour_classes answers for an (H, W, 3) uint8 RGB image at its input size."""
    pixels = rgb.astype(np.float32) / 255.0
    return np.argmax(pixels @ _WEIGHTS.T + _BIASES, axis=-1).astype(np.uint8)


def colour_classes(
    height: int, width: int, *, output: str = "labels", busy_layers: int = 0
) -> onnx.ModelProto:
    """The colour model for NCHW float32 input of (height, width), with a dynamic batch axis.

    output="labels": uint8 (N, H, W) class ids (argmax in the graph);
    output="logits": float32 (N, 5, H, W) scores.
    busy_layers: 3x3 identity convolutions at 16 channels inserted before the classifier.
    """
    nodes = []
    initializers = []
    current = "image"
    if busy_layers:
        channels = 16
        lift = np.zeros((channels, 3, 1, 1), dtype=np.float32)
        lift[:3, :, 0, 0] = np.eye(3)
        initializers.append(numpy_helper.from_array(lift, "lift_w"))
        nodes.append(helper.make_node("Conv", ["image", "lift_w"], ["busy_0"]))
        identity = np.zeros((channels, channels, 3, 3), dtype=np.float32)
        identity[np.arange(channels), np.arange(channels), 1, 1] = 1.0
        initializers.append(numpy_helper.from_array(identity, "busy_w"))
        for layer in range(busy_layers):
            nodes.append(
                helper.make_node(
                    "Conv", [f"busy_{layer}", "busy_w"], [f"busy_{layer + 1}"], pads=[1, 1, 1, 1]
                )
            )
        drop = np.zeros((3, channels, 1, 1), dtype=np.float32)
        drop[:, :3, 0, 0] = np.eye(3)
        initializers.append(numpy_helper.from_array(drop, "drop_w"))
        nodes.append(helper.make_node("Conv", [f"busy_{busy_layers}", "drop_w"], ["rgb"]))
        current = "rgb"
    classes = len(COLOUR_CLASSES)
    initializers += [
        numpy_helper.from_array(_WEIGHTS.reshape(classes, 3, 1, 1), "classify_w"),
        numpy_helper.from_array(_BIASES, "classify_b"),
    ]
    nodes.append(helper.make_node("Conv", [current, "classify_w", "classify_b"], ["logits"]))
    if output == "labels":
        nodes.append(helper.make_node("ArgMax", ["logits"], ["argmax"], axis=1, keepdims=0))
        nodes.append(helper.make_node("Cast", ["argmax"], ["labels"], to=TensorProto.UINT8))
        out = helper.make_tensor_value_info("labels", TensorProto.UINT8, ["N", height, width])
    elif output == "logits":
        out = helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["N", classes, height, width]
        )
    else:
        raise ValueError(f"output must be 'labels' or 'logits', not {output!r}")
    graph = helper.make_graph(
        nodes,
        "colour_classes",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, height, width])],
        [out],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def config_pbtxt(
    name: str,
    height: int,
    width: int,
    *,
    output: str = "labels",
    max_batch_size: int = 8,
    preferred_batch_sizes: tuple[int, ...] = (),
    max_queue_delay_us: int = 0,
    max_queue_size: int = 0,
    dynamic_batching: bool = True,
    priority_levels: int = 2,
    allow_timeout_override: bool = False,
    extra: str = "",
) -> str:
    """A Triton config.pbtxt for the colour model (valid for Triton's onnxruntime backend)."""
    classes = len(COLOUR_CLASSES)
    if output == "labels":
        out = f'name: "labels" data_type: TYPE_UINT8 dims: [ {height}, {width} ] label_filename: "labels.txt"'
    else:
        out = (
            f'name: "logits" data_type: TYPE_FP32 dims: [ {classes}, {height}, {width} ] '
            'label_filename: "labels.txt"'
        )
    batching = ""
    if dynamic_batching:
        preferred = (
            f"preferred_batch_size: [ {', '.join(map(str, preferred_batch_sizes))} ]"
            if preferred_batch_sizes
            else ""
        )
        override = " allow_timeout_override: true" if allow_timeout_override else ""
        levels = (
            f"priority_levels: {priority_levels} default_priority_level: {priority_levels} "
            if priority_levels
            else ""
        )
        batching = (
            f"dynamic_batching {{ {preferred} max_queue_delay_microseconds: {max_queue_delay_us} "
            f"{levels}default_queue_policy {{ max_queue_size: {max_queue_size}{override} }} }}"
        )
    colours = ";".join(",".join(map(str, c)) for c in COLOUR_PALETTE)
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [ {{ name: "image" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 3, {height}, {width} ] }} ]
output [ {{ {out} }} ]
{batching}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
parameters {{ key: "segserve.mean" value: {{ string_value: "0,0,0" }} }}
parameters {{ key: "segserve.std" value: {{ string_value: "1,1,1" }} }}
parameters {{ key: "segserve.colors" value: {{ string_value: "{colours}" }} }}
parameters {{ key: "segserve.description" value: {{ string_value: "Synthetic, untrained: labels pixels by dominant colour (a test model)." }} }}
{extra}
"""


def write_entry(
    root: Path,
    name: str,
    height: int,
    width: int,
    *,
    versions: tuple[int, ...] = (1,),
    busy_layers: int = 0,
    output: str = "labels",
    max_batch_size: int = 8,
    preferred_batch_sizes: tuple[int, ...] = (),
    max_queue_delay_us: int = 0,
    max_queue_size: int = 0,
    dynamic_batching: bool = True,
    priority_levels: int = 2,
    allow_timeout_override: bool = False,
    extra: str = "",
) -> Path:
    """Writes `root/name/` with config.pbtxt, labels.txt and `<version>/model.onnx` for each version.

    The config keywords are config_pbtxt's.
    """
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    config = config_pbtxt(
        name,
        height,
        width,
        output=output,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred_batch_sizes,
        max_queue_delay_us=max_queue_delay_us,
        max_queue_size=max_queue_size,
        dynamic_batching=dynamic_batching,
        priority_levels=priority_levels,
        allow_timeout_override=allow_timeout_override,
        extra=extra,
    )
    (model_dir / "config.pbtxt").write_text(config)
    (model_dir / "labels.txt").write_text("\n".join(COLOUR_CLASSES) + "\n")
    model = colour_classes(height, width, output=output, busy_layers=busy_layers)
    for version in versions:
        (model_dir / str(version)).mkdir(exist_ok=True)
        onnx.save(model, model_dir / str(version) / "model.onnx")
    return model_dir


def confidence_output(
    height: int, width: int, *, data_type: str = "TYPE_UINT8", name: str = "confidence"
) -> str:
    """The config.pbtxt text of a confidence output (uint8 with the labels' dims is valid)."""
    return f'{{ name: "{name}" data_type: {data_type} dims: [ {height}, {width} ] }}'


def with_second_output(text: str, output: str) -> str:
    """config.pbtxt text with `output` (a `{ ... }` block) added after its first output."""
    start = text.index("output [ {") + len("output [ ")
    end = text.index("} ]", start) + 1
    return text[:end] + ", " + output + text[end:]


def write_confidence_entry(
    root: Path, name: str, height: int, width: int, *, max_batch_size: int = 8
) -> Path:
    """A label model (write_entry's) with a confidence output added to its graph beside the
    argmax, as the bundled models have it, and declared in its config.pbtxt."""
    from segserve_server.training.confidence import add_confidence

    entry = write_entry(root, name, height, width, max_batch_size=max_batch_size)
    for version_dir in (p for p in entry.iterdir() if p.is_dir()):
        path = version_dir / "model.onnx"
        onnx.save(add_confidence(onnx.load(path)), path)
    config_path = entry / "config.pbtxt"
    config_path.write_text(
        with_second_output(config_path.read_text(), confidence_output(height, width))
    )
    return entry


def write_version(
    model_dir: Path, version: int, height: int, width: int, *, busy_layers: int = 0
) -> Path:
    """Adds version folder `version` (colour_classes' labels model) the way a hot reload wants
    it: written beside the folder, then renamed into place at once."""
    staging = model_dir / f".staging-{version}"
    staging.mkdir()
    onnx.save(colour_classes(height, width, busy_layers=busy_layers), staging / "model.onnx")
    return staging.rename(model_dir / str(version))


def write_broken_version(model_dir: Path, version: int) -> Path:
    """Adds version folder `version` whose model.onnx is not an ONNX model (renamed into place)."""
    staging = model_dir / f".staging-{version}"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"this is not an ONNX model")
    return staging.rename(model_dir / str(version))
