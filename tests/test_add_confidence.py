"""tools/add_confidence.py: a confidence output next to the in-graph argmax, labels untouched."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import ROOT
from tests.harness.synthetic_models import OPSET, colour_classes

TOOL = ROOT / "tools" / "add_confidence.py"
H, W = 12, 16


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("add_confidence", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _conv_model(classes: int = 7, *, opset: int = OPSET, scale: float = 4.0) -> onnx.ModelProto:
    """image -> 3x3 Conv -> logits (N, classes, H, W) -> ArgMax(axis 1) -> Cast uint8 -> labels.

    Random weights times `scale` give logits from about -10 to 10, so some pixels are sure and
    some are close calls between classes.
    """
    rng = np.random.default_rng(7)
    weight = (rng.standard_normal((classes, 3, 3, 3)) * scale / 3).astype(np.float32)
    bias = rng.standard_normal(classes).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w", "b"], ["logits"], pads=[1, 1, 1, 1]),
            helper.make_node("ArgMax", ["logits"], ["argmax"], axis=1, keepdims=0),
            helper.make_node("Cast", ["argmax"], ["labels"], to=TensorProto.UINT8),
        ],
        "conv_argmax",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, H, W])],
        [helper.make_tensor_value_info("labels", TensorProto.UINT8, ["N", H, W])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, image: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(a) for a in session.run(outputs, {"image": image})]


def _with_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its logits as one more output (a test graph)."""
    exposed = onnx.ModelProto.FromString(model.SerializeToString())
    logits = tool.find_argmax(exposed).input[0]
    exposed.graph.output.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT, None))
    return exposed


def _expected_confidence(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    wide = logits.astype(np.float64)
    probabilities = np.exp(wide - wide.max(axis=axis, keepdims=True))
    probabilities /= probabilities.sum(axis=axis, keepdims=True)
    return np.round(255 * probabilities.max(axis=axis)).astype(np.int64)


def _images(batch: int = 3) -> np.ndarray:
    return np.random.default_rng(11).standard_normal((batch, 3, H, W)).astype(np.float32)


@pytest.mark.parametrize("recipe", ["split", "sumexp"])
@pytest.mark.parametrize("opset", [11, OPSET, 18])
def test_labels_unchanged_and_confidence_is_rounded_max_softmax(recipe: str, opset: int):
    old = _conv_model(opset=opset)
    new = tool.add_confidence(old, recipe=recipe)
    assert [o.name for o in new.graph.output] == ["labels", "confidence"]
    assert new.opset_import == old.opset_import
    # The original nodes are all still there, unchanged.
    assert all(node in new.graph.node for node in old.graph.node)
    images = _images()
    (labels_old, logits) = _run(_with_logits(old), images, ["labels", "logits"])
    labels_new, confidence = _run(new, images, ["labels", "confidence"])
    assert labels_new.dtype == np.uint8 and confidence.dtype == np.uint8
    assert confidence.shape == labels_new.shape == (3, H, W)
    np.testing.assert_array_equal(labels_new, labels_old)
    expected = _expected_confidence(logits)
    assert np.abs(confidence.astype(np.int64) - expected).max() <= 1
    # The inputs span sure and unsure pixels, so the check covers the whole range.
    assert confidence.min() < 128 and confidence.max() == 255


@pytest.mark.parametrize("recipe", ["split", "sumexp"])
def test_large_logits_do_not_overflow(recipe: str):
    """Logits in the hundreds would overflow exp() without subtracting the max first."""
    new = tool.add_confidence(_conv_model(classes=4, scale=200.0), recipe=recipe)
    images = _images()
    (logits,) = _run(_with_logits(new), images, ["logits"])
    assert np.abs(logits).max() > 100
    (confidence,) = _run(new, images, ["confidence"])
    expected = _expected_confidence(logits)
    assert np.abs(confidence.astype(np.int64) - expected).max() <= 1


@pytest.mark.parametrize("recipe", ["split", "sumexp"])
def test_keepdims_and_other_axis_follow_the_argmax(recipe: str):
    """An ArgMax over the last axis with keepdims=1 gets a confidence of the same shape."""
    old = colour_classes(H, W, output="logits")
    graph = old.graph
    graph.node.append(helper.make_node("Transpose", ["logits"], ["nhwc"], perm=[0, 2, 3, 1]))
    graph.node.append(helper.make_node("ArgMax", ["nhwc"], ["argmax"], axis=3, keepdims=1))
    graph.node.append(helper.make_node("Cast", ["argmax"], ["labels"], to=TensorProto.UINT8))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("labels", TensorProto.UINT8, ["N", H, W, 1]))
    new = tool.add_confidence(old, recipe=recipe)
    images = np.random.default_rng(3).uniform(0, 1, (2, 3, H, W)).astype(np.float32)
    labels, confidence, nhwc = _run(_with_logits(new), images, ["labels", "confidence", "nhwc"])
    assert confidence.shape == labels.shape == (2, H, W, 1)
    expected = _expected_confidence(nhwc, axis=3)[..., np.newaxis]
    assert np.abs(confidence.astype(np.int64) - expected).max() <= 1


def test_refuses_models_it_cannot_edit():
    with pytest.raises(tool.ConfidenceError, match="no output 'scores'"):
        tool.add_confidence(_conv_model(), labels="scores")
    with pytest.raises(tool.ConfidenceError, match="not from an ArgMax"):
        tool.add_confidence(colour_classes(H, W, output="logits"), labels="logits")
    with pytest.raises(tool.ConfidenceError, match="already has"):
        tool.add_confidence(tool.add_confidence(_conv_model()))


def test_class_count_comes_from_shape_inference():
    """Split needs the class count; where shape inference cannot tell it, sumexp still works."""
    assert tool.class_count(_conv_model(classes=5), "logits", 1) == 5
    unknown = _conv_model()
    unknown.graph.initializer.pop(0)  # the weights become an input of unknown output channels
    unknown.graph.input.append(
        helper.make_tensor_value_info("w", TensorProto.FLOAT, ["K", 3, 3, 3])
    )
    assert tool.class_count(unknown, "logits", 1) is None
    with pytest.raises(tool.ConfidenceError, match="recipe sumexp"):
        tool.add_confidence(unknown)
    new = tool.add_confidence(unknown, recipe="sumexp")
    assert [o.name for o in new.graph.output] == ["labels", "confidence"]


def test_cli_writes_out_and_leaves_the_original(tmp_path: Path):
    source = tmp_path / "model.onnx"
    onnx.save(_conv_model(), source)
    before = source.read_bytes()
    out = tmp_path / "with_confidence" / "model.onnx"
    done = subprocess.run(
        [sys.executable, str(TOOL), str(source), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert source.read_bytes() == before
    assert [o.name for o in onnx.load(out).graph.output] == ["labels", "confidence"]
    # --out pointing at the input is refused; --in-place is the explicit way.
    same = subprocess.run(
        [sys.executable, str(TOOL), str(source), "--out", str(tmp_path / "." / "model.onnx")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert same.returncode == 2 and "--in-place" in same.stderr
    assert source.read_bytes() == before
    assert tool.main([str(source), "--in-place"]) == 0
    assert [o.name for o in onnx.load(source).graph.output] == ["labels", "confidence"]
    # A second run fails cleanly and leaves the file as it is.
    edited = source.read_bytes()
    assert tool.main([str(source), "--in-place"]) == 1
    assert source.read_bytes() == edited
