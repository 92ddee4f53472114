"""What both adapters share: the scores of a segmentation, the request of segserve, and serving."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from segserve_client.integrations import require

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from segserve_client.types import Segmentation

__all__ = ["add_service_arguments", "boundary_scores", "segmentation_scores", "serve"]


def segmentation_scores(result: Segmentation) -> tuple[dict[int, float], float]:
    """Per class present a score, and one for the whole image (0..1).

    With confidence (the request had include_confidence, which the adapters set when the model
    has_confidence): the mean confidence of each class's pixels (Segmentation.class_confidence)
    and the mean confidence over all pixels (ImageScores.mean_confidence), model probabilities.
    Without (a labels-only model): the stand-in of `boundary_scores`.
    """
    if result.scores is not None:
        return dict(result.class_confidence), float(result.scores.mean_confidence)
    return boundary_scores(np.asarray(result.labels, dtype=np.uint8))


def boundary_scores(labels: npt.NDArray[np.uint8]) -> tuple[dict[int, float], float]:
    """The stand-in for a confidence of models that have none (labels-only): per class present,
    1 - (share of its pixels on a class boundary), and the same over the whole map.

    A pixel is on a boundary when one of its 4 neighbours has another class (the image's edge is
    no boundary). Compact regions score near 1, thin or fragmented ones lower: a hint of where a
    label map is ragged, not a calibrated probability.
    """
    edge = np.zeros(labels.shape, dtype=np.bool_)
    vertical = labels[1:] != labels[:-1]
    horizontal = labels[:, 1:] != labels[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    areas = np.bincount(labels.reshape(-1), minlength=256)
    edges = np.bincount(labels[edge], minlength=256)
    scores = {
        int(c): round(1.0 - float(edges[c]) / float(areas[c]), 4) for c in np.flatnonzero(areas)
    }
    overall = round(1.0 - float(edge.sum()) / float(labels.size), 4)
    return scores, overall


def add_service_arguments(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--model", "-m", required=True, help="segserve model name")
    parser.add_argument(
        "--host", default="127.0.0.1", help="listen address (0.0.0.0: every interface)"
    )
    parser.add_argument("--port", type=int, default=port, help=f"listen port (default {port})")


def serve(app: Starlette, host: str, port: int) -> None:
    """Runs `app` with uvicorn until interrupted."""
    uvicorn = require("uvicorn")
    uvicorn.run(app, host=host, port=port, log_level="info")
