"""segserve-client bench: a gRPC load generator for segserve (and, to compare, Triton).

    segserve-client bench --model roadseg --concurrency 1,8 --rate 20 --mode both \\
        --output bench.json --plot bench.png

Loads: closed loop (N callers, each sending its next image when the previous answer is in) and
open loop (Poisson arrivals at a given rate; latency counts from each arrival's scheduled time,
so a slow server cannot hide its queue). Calls: unary `Segment` or `SegmentStream` frames.
Images: a folder of real images (default: CamVid val frames), as they are and/or resized and
re-encoded as JPEG (default both: `--size original,1920x1080`), prepared and serialised before
the clock starts. Every point is bounded in time (`--duration-s`) and count (`--max-requests`).

Each point reports throughput, p50/p90/p99/max latency, errors by status code and the server's
per-stage times (from the timings in every answer). The load core is target-agnostic: a `Target`
adapter turns an image into a prepared request and a call into a `Reply`; `SegserveTarget`
speaks segserve.v1 and `TritonTarget` (`--protocol triton`) the KServe v2 protocol of a Triton
model taking encoded image bytes (benchmarks/compare.py uses both). Images and the chart need
OpenCV (pip install opencv-python-headless); Triton needs tritonclient[grpc].

The package, one module per part: `images` (the image sets), `targets` (the servers' adapters),
`loadgen` (the closed and open load loops), `results` (what one call and one point produce),
`report` (the text line and the chart) and `command` (the command line). Every public name of
them is importable from `segserve_client.bench` itself.
"""

from segserve_client.bench.command import _int_list as _int_list  # benchmarks/compare.py uses it
from segserve_client.bench.command import add_arguments, loads_of, make_target, run
from segserve_client.bench.images import (
    CAMVID_ENV,
    IMAGE_SUFFIXES,
    ImageSet,
    default_image_folder,
    load_images,
    parse_size,
)
from segserve_client.bench.loadgen import Limits, Load, measure, run_bench
from segserve_client.bench.report import format_point, plot_latency_throughput
from segserve_client.bench.results import (
    CLIENT_OVERLOAD,
    STAGES,
    CallFailed,
    Recorder,
    Reply,
    percentiles_ms,
)
from segserve_client.bench.targets import FrameStream, SegserveTarget, Target, TritonTarget

__all__ = [
    "CAMVID_ENV",
    "CLIENT_OVERLOAD",
    "IMAGE_SUFFIXES",
    "STAGES",
    "CallFailed",
    "FrameStream",
    "ImageSet",
    "Limits",
    "Load",
    "Recorder",
    "Reply",
    "SegserveTarget",
    "Target",
    "TritonTarget",
    "add_arguments",
    "default_image_folder",
    "format_point",
    "load_images",
    "loads_of",
    "make_target",
    "measure",
    "parse_size",
    "percentiles_ms",
    "plot_latency_throughput",
    "run",
    "run_bench",
]
