"""Postprocessing: the model's output for one image becomes a uint8 label map at the output size.

The label map is resized once, nearest-neighbour, from the model's size to the output size; the
classes present are found on whichever of the two maps is smaller whenever that gives the same
answer (an enlarged map holds every pixel of the model's map), with OpenCV's histogram rather
than numpy's bincount (0.13 ms on 480x360 and 0.85 ms on 1920x1080, against 2.6 ms).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from segserve_server.errors import InferenceFailed
from segserve_server.model_repository import ModelConfig

__all__ = [
    "Postprocessed",
    "Scores",
    "check_output_shape",
    "class_pixel_counts",
    "classes_present",
    "has_confidence",
    "label_map",
    "label_output",
    "postprocess",
    "resize_labels",
    "review_scores",
    "softmax_confidence",
    "to_label_map",
]


def label_output(model_output: np.ndarray, config: ModelConfig) -> np.ndarray:
    """The labels or scores of one image's output (labels first where confidence is stacked)."""
    return model_output[0] if config.confidence_output is not None else model_output


def to_label_map(output: np.ndarray, config: ModelConfig) -> np.ndarray:
    """(H, W) class ids, or (C, H, W) scores reduced by argmax, as a (H, W) uint8 map."""
    labels = output if config.outputs_labels else output.argmax(axis=0)
    if labels.dtype != np.uint8:
        labels = labels.astype(np.uint8)
    if config.outputs_labels:
        highest = int(output.max())
        if highest >= len(config.classes) or (output.dtype.kind == "i" and int(output.min()) < 0):
            raise InferenceFailed(
                f"model {config.name} produced class id {highest} but has {len(config.classes)} classes"
            )
    return labels


def resize_labels(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize with pixel centres aligned (no half-pixel shift)."""
    if labels.shape == (height, width):
        return labels
    return cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)


def label_map(output: np.ndarray, config: ModelConfig, width: int, height: int) -> np.ndarray:
    """One image's model output as the (height, width) uint8 label map the server answers with:
    to_label_map, then resize_labels. The single definition of that step for serving and
    `segserve eval --offline`."""
    return resize_labels(to_label_map(label_output(output, config), config), width, height)


def class_pixel_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels per class id: at least num_classes entries, more if a larger id occurs."""
    histogram = cv2.calcHist([labels], [0], None, [256], [0, 256]).reshape(-1).astype(np.int64)
    present = np.flatnonzero(histogram)
    length = max(num_classes, int(present[-1]) + 1 if present.size else 0)
    return histogram[:length]


def classes_present(model_labels: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The class ids in `labels`, the nearest-neighbour resize of `model_labels`.

    Counted on `model_labels` when `labels` is at least as large in both directions: an enlarging
    nearest-neighbour resize keeps every source pixel, so the same ids are present.
    """
    enlarged = labels.shape[0] >= model_labels.shape[0] and labels.shape[1] >= model_labels.shape[1]
    return np.flatnonzero(class_pixel_counts(model_labels if enlarged else labels, num_classes))


def check_output_shape(model_output: np.ndarray, config: ModelConfig) -> None:
    """One image's output must be what config.pbtxt declares: labels (H, W), scores (C, H, W),
    or labels and confidence stacked (2, H, W)."""
    size = (config.input_height, config.input_width)
    if config.confidence_output is not None:
        expected: tuple[int, ...] = (2, *size)
    else:
        expected = size if config.outputs_labels else (len(config.classes), *size)
    if model_output.shape != expected:
        raise InferenceFailed(
            f"model {config.name} returned an output of shape {model_output.shape} per image; "
            f"its config declares {expected}"
        )


def has_confidence(config: ModelConfig) -> bool:
    """Whether the model gives a confidence map: a confidence output, or scores."""
    return config.confidence_output is not None or not config.outputs_labels


def softmax_confidence(scores: np.ndarray) -> np.ndarray:
    """(C, H, W) scores to (H, W) uint8 round(255 × max softmax): 255 / sum(exp(x - max))."""
    scores = scores.astype(np.float32, copy=False)
    top = scores.max(axis=0)
    total = np.exp(scores - top).sum(axis=0)
    confidence: np.ndarray = np.rint(255.0 / total).astype(np.uint8)
    return confidence


@dataclass(frozen=True)
class Postprocessed:
    """One image's answer before encoding."""

    labels: np.ndarray  # (height, width) uint8
    present: list[tuple[int, int]]  # (class id, pixels; 0 unless counted)
    model_labels: np.ndarray  # at the model's size
    confidence: np.ndarray | None = None  # (height, width) uint8, when asked for
    model_confidence: np.ndarray | None = None


def postprocess(
    model_output: np.ndarray,
    config: ModelConfig,
    width: int,
    height: int,
    *,
    count_pixels: bool = False,
    confidence: bool = False,
) -> Postprocessed:
    """One image's model output to its (height, width) label map and the classes present, as
    (class id, pixels) pairs; pixels are 0 unless count_pixels (counting costs a full pass).
    With `confidence` (see has_confidence), also the confidence map at both sizes."""
    check_output_shape(model_output, config)
    model_labels = to_label_map(label_output(model_output, config), config)
    labels = resize_labels(model_labels, width, height)
    if count_pixels:
        counts = class_pixel_counts(labels, len(config.classes))
        present = [(int(i), int(counts[i])) for i in np.flatnonzero(counts)]
    else:
        found = classes_present(model_labels, labels, len(config.classes))
        present = [(int(i), 0) for i in found]
    if not confidence:
        return Postprocessed(labels, present, model_labels)
    if config.confidence_output is not None:
        model_confidence = np.ascontiguousarray(model_output[1], dtype=np.uint8)
    else:
        model_confidence = softmax_confidence(model_output)
    return Postprocessed(
        labels,
        present,
        model_labels,
        resize_labels(model_confidence, width, height),
        model_confidence,
    )


@dataclass(frozen=True)
class Scores:
    """Review-routing scores of one image (see ImageScores in the proto)."""

    uncertainty: float
    mean_confidence: float
    boundary_length: int
    regions: int
    class_confidence: list[tuple[int, float]]  # (class id, mean confidence 0..1)


def review_scores(
    model_labels: np.ndarray, model_confidence: np.ndarray, threshold: float
) -> Scores:
    """Scores on the model-size maps: uncertainty (share below `threshold`), mean confidence
    overall and per class, boundary length (pixel edges between classes) and the number of
    8-connected regions."""
    limit = round(255 * threshold)
    flat_labels = model_labels.reshape(-1)
    flat_conf = model_confidence.reshape(-1).astype(np.float64)
    counts = np.bincount(flat_labels, minlength=1)
    sums = np.bincount(flat_labels, weights=flat_conf, minlength=counts.size)
    present = np.flatnonzero(counts)
    boundary = int((model_labels[:, 1:] != model_labels[:, :-1]).sum()) + int(
        (model_labels[1:] != model_labels[:-1]).sum()
    )
    regions = 0
    for class_id in present:
        found, _ = cv2.connectedComponents((model_labels == class_id).astype(np.uint8), None, 8)
        regions += int(found) - 1
    return Scores(
        uncertainty=float((model_confidence < limit).mean()),
        mean_confidence=float(flat_conf.mean() / 255.0),
        boundary_length=boundary,
        regions=regions,
        class_confidence=[(int(c), float(sums[c] / counts[c] / 255.0)) for c in present],
    )
