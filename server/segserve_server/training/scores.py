"""The numbers of `segserve eval`, and of model selection in `segserve train`: one definition.

`confusion_matrix` counts (ground truth, prediction) pairs, void labels skipped; `Scores` are what
a confusion matrix says (per-class IoU, mIoU, pixel accuracy, mean class accuracy); `EvalResult` is
one scored evaluation run of `segserve eval`, as JSON and as the printed report.

Needs numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EvalResult", "Scores", "confusion_matrix"]


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction.

    Label pixels >= num_classes (void) are skipped; predictions are class ids < num_classes.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
    valid = label < num_classes
    index = label[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    counts = np.bincount(index, minlength=num_classes * num_classes)
    if counts.size != num_classes * num_classes:
        raise ValueError(f"prediction holds a class id >= {num_classes}")
    return counts.reshape(num_classes, num_classes)


@dataclass(frozen=True)
class Scores:
    """What a confusion matrix says; NaN IoU for a class absent from labels and predictions."""

    iou: np.ndarray  # per class
    miou: float  # mean over classes with a defined IoU
    pixel_accuracy: float  # correctly labelled / labelled (non-void) pixels
    mean_class_accuracy: float  # recall averaged over classes present in the labels

    @classmethod
    def from_confusion(cls, conf: np.ndarray) -> Scores:
        conf = conf.astype(np.float64)
        tp = np.diag(conf)
        truth, predicted = conf.sum(axis=1), conf.sum(axis=0)
        union = truth + predicted - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            recall = np.where(truth > 0, tp / truth, np.nan)
        total = conf.sum()
        defined = ~np.isnan(iou)
        return cls(
            iou=iou,
            miou=float(iou[defined].mean()) if defined.any() else math.nan,
            pixel_accuracy=float(tp.sum() / total) if total else math.nan,
            mean_class_accuracy=float(np.nanmean(recall)) if (truth > 0).any() else math.nan,
        )


@dataclass
class EvalResult:
    model: str
    model_version: int
    mode: str  # "server" or "offline"
    source: str  # server address or model repository
    class_names: list[str]
    confusion: np.ndarray
    frames: int
    ignored_pixels: int
    seconds: float

    @property
    def scores(self) -> Scores:
        return Scores.from_confusion(self.confusion)

    def to_json(self, images: Path | None = None, labels: Path | None = None) -> dict[str, Any]:
        s = self.scores

        def number(v: float) -> float | None:
            return None if math.isnan(v) else round(float(v), 6)

        return {
            "model": self.model,
            "model_version": self.model_version,
            "mode": self.mode,
            "source": self.source,
            "images": str(images) if images else None,
            "labels": str(labels) if labels else None,
            "frames": self.frames,
            "num_classes": len(self.class_names),
            "class_names": self.class_names,
            "iou": {n: number(v) for n, v in zip(self.class_names, s.iou, strict=True)},
            "miou": number(s.miou),
            "pixel_accuracy": number(s.pixel_accuracy),
            "mean_class_accuracy": number(s.mean_class_accuracy),
            "labelled_pixels": int(self.confusion.sum()),
            "ignored_pixels": self.ignored_pixels,
            "confusion_matrix": self.confusion.tolist(),
            "seconds": round(self.seconds, 3),
        }

    def report(self) -> str:
        s = self.scores
        width = max([len(n) for n in self.class_names] + [5])
        lines = [
            f"{self.model} version {self.model_version} ({self.mode}: {self.source}), "
            f"{self.frames} frames in {self.seconds:.1f} s",
            f"{'class':<{width}}  IoU",
        ]
        for name, value in zip(self.class_names, s.iou, strict=True):
            shown = "  n/a (absent)" if math.isnan(value) else f"{value:7.4f}"
            lines.append(f"{name:<{width}}  {shown}")
        lines += [
            f"{'mIoU':<{width}}  {s.miou:7.4f}",
            f"pixel accuracy {s.pixel_accuracy:.4f}, mean class accuracy "
            f"{s.mean_class_accuracy:.4f} ({int(self.confusion.sum())} labelled pixels, "
            f"{self.ignored_pixels} void/ignored)",
        ]
        return "\n".join(lines)
