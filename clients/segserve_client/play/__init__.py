"""segserve-client stream: plays a video or a folder of images to a model as real-time
SegmentStreams, paced like a camera, and reports the fate of every frame.

    segserve-client stream clip.mp4 --model roadseg --fps 30 --policy latest --max-age-ms 200 \\
        --streams 4 --duration-s 60 -o stream.json --overlay-video overlay.mp4

The package, one module per part: `sources` (the frames, read before the clock starts),
`pacing` (when each frame is due, and late-sent frames), `stats` (the counts, the live line and
the summary), `overlay_video` (the MP4 of the overlays) and `command` (the command line and the
play itself). Every part but `command` is pure or file I/O only, testable without a server.
Videos and the overlay video need OpenCV (pip install opencv-python-headless), imported only
when used.
"""

from segserve_client.play.command import (
    PlayConfig,
    PlayResult,
    StatusPrinter,
    add_arguments,
    play,
    run,
)
from segserve_client.play.overlay_video import overlay_plan, write_overlay_video
from segserve_client.play.pacing import LATE_FRACTION, Schedule, choose_fps, frame_count
from segserve_client.play.sources import (
    Source,
    decode_rgb,
    load_source,
    select_images,
    sequence_of,
    sequences,
)
from segserve_client.play.stats import (
    StreamStats,
    Totals,
    format_summary,
    percentiles_ms,
    status_line,
    stream_summary,
    summarize,
    totals,
)

__all__ = [
    "LATE_FRACTION",
    "PlayConfig",
    "PlayResult",
    "Schedule",
    "Source",
    "StatusPrinter",
    "StreamStats",
    "Totals",
    "add_arguments",
    "choose_fps",
    "decode_rgb",
    "format_summary",
    "frame_count",
    "load_source",
    "overlay_plan",
    "percentiles_ms",
    "play",
    "run",
    "select_images",
    "sequence_of",
    "sequences",
    "status_line",
    "stream_summary",
    "summarize",
    "totals",
    "write_overlay_video",
]
