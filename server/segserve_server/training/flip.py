"""Test-time flip averaging: a graph variant that averages the scores of an image and its mirror.

    segserve flip-average MODEL [--version V] [--model-repository model_repository]

writes `<model>/<V>/model.flip.onnx` (every version when --version is not given) beside the
model's own file. A model whose config.pbtxt says

    parameters { key: "segserve.flip_average" value: { string_value: "true" } }

is served from that variant (segserve's ONNX Runtime backend loads it in place of model.onnx;
see model_repository.flip_average_filename). Triton, which ignores segserve's parameters, keeps
serving model.onnx.

The variant wraps the exported graph; nothing inside it changes:

    pair   = Concat(image, Slice(image, width axis, step -1), axis=0)     batch N -> 2N
    ...    the original network, on the pair
    s, m   = Split(scores, axis=0)                                        the image's, the mirror's
    scores = (s + Slice(m, last axis, step -1)) * 0.5                     mirror flipped back
    ...    the original tail on the averaged scores (ArgMax, confidence)

where `scores` is the tensor the graph's ArgMax reads (for a label model: through Cast/Identity
from the labels output) or the scores output itself. The logits are averaged, not probabilities:
the argmax of the mean logit, and the confidence output is the softmax of the mean logits. The
network runs on twice the batch, so it costs about twice the compute of the model; the outputs,
their names, types and shapes are those of the original.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from segserve_server.model_repository import flip_average_filename
from segserve_server.training.repository import repository_entry

__all__ = ["FlipError", "build_parser", "flip_average", "main", "write_flip_variants"]

_PREFIX = "flip_average"
_PASS_THROUGH = {"Cast", "Identity"}
_INT64_MIN = np.iinfo(np.int64).min
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


class FlipError(ValueError):
    """The model does not have the shape this transform wraps; the message says why."""


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise FlipError("the model imports no default-domain (ai.onnx) opset")


def _scores_tensor(graph: onnx.GraphProto, output: str) -> str:
    """The tensor the ArgMax behind `output` reads, or `output` itself when no ArgMax is there."""
    producer = {out: node for node in graph.node for out in node.output}
    tensor = output
    while (node := producer.get(tensor)) is not None:
        if node.op_type == "ArgMax":
            return str(node.input[0])
        if node.op_type not in _PASS_THROUGH:
            break
        tensor = node.input[0]
    info = next(o for o in graph.output if o.name == output)
    if info.type.tensor_type.elem_type not in _FLOAT_TYPES:
        raise FlipError(
            f"output {output!r} is neither float scores nor labels from an ArgMax (through "
            f"{sorted(_PASS_THROUGH)}); flip averaging needs the scores"
        )
    return output


def _elem_type(model: onnx.ModelProto, tensor: str) -> int:
    graph = model.graph
    for info in graph.output:
        if info.name == tensor:
            return int(info.type.tensor_type.elem_type)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # unknown type: the scores are float in every exported model
        return TensorProto.FLOAT
    for info in inferred.graph.value_info:
        if info.name == tensor and info.type.tensor_type.elem_type:
            return int(info.type.tensor_type.elem_type)
    return TensorProto.FLOAT


def flip_average(
    model: onnx.ModelProto, *, input_name: str, output_name: str, layout: str = "NCHW"
) -> onnx.ModelProto:
    """A copy of `model` whose scores are the mean of the image's and its mirror's (above).

    `input_name` is the image input, `output_name` the labels (from an ArgMax) or scores output,
    `layout` the input's ("NCHW" or "NHWC"; the scores are (N, C, H, W) either way).
    """
    if layout not in ("NCHW", "NHWC"):
        raise FlipError(f"layout {layout!r} is not NCHW or NHWC")
    if _opset(model) < 13:
        raise FlipError(f"opset {_opset(model)} is older than 13; re-export the model")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    if input_name not in {i.name for i in graph.input}:
        raise FlipError(f"the graph has no input {input_name!r}")
    if output_name not in {o.name for o in graph.output}:
        raise FlipError(f"the graph has no output {output_name!r}")
    if any(n.name.startswith(_PREFIX + "/") for n in graph.node):
        raise FlipError("the model is already flip-averaged")
    scores = _scores_tensor(graph, output_name)
    dtype = helper.tensor_dtype_to_np_dtype(_elem_type(model, scores))

    def name(stem: str) -> str:
        return f"{_PREFIX}/{stem}"

    constants = {
        "minus_one": np.array([-1], dtype=np.int64),
        "int64_min": np.array([_INT64_MIN], dtype=np.int64),
        "width_axis": np.array([3 if layout == "NCHW" else 2], dtype=np.int64),
        "last_axis": np.array([-1], dtype=np.int64),
        "half": np.array(0.5, dtype=dtype),
    }
    graph.initializer.extend(numpy_helper.from_array(v, name(k)) for k, v in constants.items())
    c = {k: name(k) for k in constants}
    pair, paired_scores = name("pair"), name("pair_scores")
    head = [
        helper.make_node(
            "Slice",
            [input_name, c["minus_one"], c["int64_min"], c["width_axis"], c["minus_one"]],
            [name("mirror")],
            name=name("mirror"),
        ),
        helper.make_node("Concat", [input_name, name("mirror")], [pair], name=name("pair"), axis=0),
    ]
    split = helper.make_node(
        "Split", [paired_scores], [name("image_scores"), name("mirror_scores")], name=name("split"),
        axis=0,
    )  # fmt: skip
    if _opset(model) >= 18:
        split.attribute.append(helper.make_attribute("num_outputs", 2))
    tail = [
        split,
        helper.make_node(
            "Slice",
            [name("mirror_scores"), c["minus_one"], c["int64_min"], c["last_axis"], c["minus_one"]],
            [name("mirror_back")],
            name=name("mirror_back"),
        ),
        helper.make_node(
            "Add", [name("image_scores"), name("mirror_back")], [name("sum")], name=name("sum")
        ),
        # The mean takes the scores' name: the tail (ArgMax, confidence, or the output)
        # reads it unchanged; the network's own producer writes pair_scores instead.
        helper.make_node("Mul", [name("sum"), c["half"]], [scores], name=name("mean")),
    ]
    nodes = list(graph.node)
    if not any(scores in node.output for node in nodes):
        raise FlipError(f"no node computes the scores {scores!r}")
    for node in nodes:
        for index, tensor in enumerate(node.input):
            if tensor == input_name:
                node.input[index] = pair
        for index, tensor in enumerate(node.output):
            if tensor == scores:
                node.output[index] = paired_scores
    producer_index = next(i for i, n in enumerate(nodes) if paired_scores in n.output)
    ordered = [*head, *nodes[: producer_index + 1], *tail, *nodes[producer_index + 1 :]]
    del graph.node[:]
    graph.node.extend(ordered)
    del graph.value_info[:]  # batch-sized annotations no longer hold inside the network
    helper.set_model_props(
        model,
        {
            **{p.key: p.value for p in model.metadata_props},
            "segserve.flip_average": "scores averaged with those of the mirrored image",
        },
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def write_flip_variants(
    repository: str | Path, model: str, versions: Sequence[int] = ()
) -> list[Path]:
    """Writes `<version>/model.flip.onnx` for `versions` (default: every version) of `model`."""
    entry, config = repository_entry(Path(repository), model, FlipError)
    missing = [v for v in versions if v not in entry.versions]
    if missing:
        raise FlipError(f"model {model!r} has no version {missing[0]} ({sorted(entry.versions)})")
    written = []
    for version in versions or sorted(entry.versions):
        source = entry.versions[version] / config.model_filename
        if not source.is_file():
            raise FlipError(f"model file {source} is missing")
        flipped = flip_average(
            onnx.load(str(source)),
            input_name=config.input_name,
            output_name=config.output_name,
            layout=config.input_layout,
        )
        target = source.with_name(flip_average_filename(config.model_filename))
        partial = target.with_name(f".{target.name}.partial")
        onnx.save(flipped, str(partial))
        partial.replace(target)
        written.append(target)
    return written


def build_parser(prog: str = "segserve flip-average") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Write the test-time flip-averaging variant (model.flip.onnx) of a "
        'repository model; config.pbtxt\'s segserve.flip_average "true" serves it.',
    )
    p.add_argument("model", metavar="MODEL", help="model name in the repository")
    p.add_argument(
        "--version", type=int, action="append", default=[], help="version (repeatable; default all)"
    )
    p.add_argument(
        "--model-repository",
        type=Path,
        default=Path("model_repository"),
        help="repository (default model_repository)",
    )
    return p


def main(argv: Sequence[str] | None = None, prog: str = "segserve flip-average") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        written = write_flip_variants(args.model_repository, args.model, args.version)
    except FlipError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(
        f'serve it: add parameters {{ key: "segserve.flip_average" value: {{ string_value: '
        f'"true" }} }} to {args.model} config.pbtxt'
    )
    return 0
