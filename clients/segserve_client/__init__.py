"""segserve client library: talk to a segserve server and decode its masks (grpcio, protobuf, numpy).

    from segserve_client import SegserveClient

    with SegserveClient("localhost:50051") as client:
        labels = client.segment("street.jpg", "roadseg").labels  # (H, W) uint8 class ids

AsyncSegserveClient is the same over asyncio. `stream()` is the real-time API: each frame's
answer is a Segmentation, a FrameFailed, or a FrameDropped / FrameExpired (FrameSkipped; see
`segserve_client.streaming`). `segserve_client.masks` holds the mask codecs,
`segserve_client.overlay` colours label maps; OpenCV is needed only to read or write image files.
"""

from segserve_client.aio import AsyncSegserveClient
from segserve_client.client import SegserveClient
from segserve_client.confidence import ImageScores
from segserve_client.errors import FrameFailed, SegserveError
from segserve_client.security import TLSConfig
from segserve_client.streaming import (
    FrameDropped,
    FrameExpired,
    FrameSkipped,
    FrameStatus,
    FrameTiming,
    StreamFrame,
)
from segserve_client.types import (
    ClassInfo,
    ClassPresence,
    ModelInfo,
    ModelSummary,
    Segmentation,
    StageTimings,
)

__all__ = [
    "AsyncSegserveClient",
    "ClassInfo",
    "ClassPresence",
    "FrameDropped",
    "FrameExpired",
    "FrameFailed",
    "FrameSkipped",
    "FrameStatus",
    "FrameTiming",
    "ImageScores",
    "ModelInfo",
    "ModelSummary",
    "Segmentation",
    "SegserveClient",
    "SegserveError",
    "StageTimings",
    "StreamFrame",
    "TLSConfig",
]
