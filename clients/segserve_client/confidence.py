"""What a segserve answer says of its own certainty (SegmentRequest.include_confidence): the
image's review scores, and the decoding of the confidence map.

Models whose config has a confidence output, and score (logits) models, have it
(`ModelInfo.has_confidence`); asking a labels-only model is FAILED_PRECONDITION ("confidence
unavailable"), raised as SegserveError with that code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segserve.v1 import segserve_pb2 as pb
from segserve_client.masks import MaskDecodeError, decode_png

__all__ = ["ImageScores", "class_means", "decode_confidence", "image_scores"]


@dataclass(frozen=True)
class ImageScores:
    """What a reviewer-routing rule needs of one image (set with include_confidence).

    `uncertainty`: the share of pixels whose confidence is below the request's
    confidence_threshold (0..1); `mean_confidence`: the mean confidence over all pixels (0..1);
    `boundary_length`: pixel edges between different classes, and `regions`: connected regions
    (8-connected, all classes), both on the model-size label map.
    """

    uncertainty: float
    mean_confidence: float
    boundary_length: int
    regions: int

    @classmethod
    def from_proto(cls, scores: pb.ImageScores) -> ImageScores:
        return cls(
            uncertainty=scores.uncertainty,
            mean_confidence=scores.mean_confidence,
            boundary_length=scores.boundary_length,
            regions=scores.regions,
        )


def image_scores(response: pb.SegmentResponse) -> ImageScores | None:
    """The response's scores, None when it has none (confidence not asked for)."""
    return ImageScores.from_proto(response.scores) if response.HasField("scores") else None


def class_means(response: pb.SegmentResponse) -> dict[int, float]:
    """{class id: mean confidence over its pixels (0..1)} of the classes present."""
    return {entry.class_id: entry.mean for entry in response.class_confidence}


def decode_confidence(data: bytes, width: int, height: int) -> np.ndarray:
    """The (height, width) uint8 confidence map (255 x top class probability) of its 8-bit grey
    PNG, read-only."""
    confidence, _palette = decode_png(data)
    if confidence.shape != (height, width):
        raise MaskDecodeError(
            f"the confidence map is {confidence.shape[1]}x{confidence.shape[0]}, "
            f"the response {width}x{height}"
        )
    confidence.setflags(write=False)
    return confidence
