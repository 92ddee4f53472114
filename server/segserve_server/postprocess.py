"""Postprocessing: the model's output for one image becomes a uint8 label map at the output size."""

from __future__ import annotations

import cv2
import numpy as np

from segserve_server.errors import InferenceFailed
from segserve_server.model_repository import ModelConfig


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


def class_pixel_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels.reshape(-1), minlength=num_classes)
