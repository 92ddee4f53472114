"""The `segserve-client bench` command: its arguments (`add_arguments`) and what it runs
(`run`), an entry of segserve_client.cli.COMMANDS. It loads the images, runs every point against
the target `--protocol` names, prints each point as it is measured and writes the report
(`--output`, JSON) and chart (`--plot`, PNG).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from segserve_client.bench.images import CAMVID_ENV, default_image_folder, load_images, parse_size
from segserve_client.bench.loadgen import Limits, Load, run_bench
from segserve_client.bench.report import format_point, plot_latency_throughput
from segserve_client.bench.targets import SegserveTarget, Target, TritonTarget
from segserve_client.security import security_of
from segserve_client.types import ENCODINGS

__all__ = [
    "add_arguments",
    "loads_of",
    "make_target",
    "run",
]


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8, got {text!r}")
    return values


def _rate_list(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive rates like 10,20.5, got {text!r}")
    return values


def _size_list(text: str) -> list[str]:
    sizes = [v.strip() for v in text.split(",") if v.strip()]
    try:
        for size in sizes:
            parse_size(size)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not sizes:
        raise argparse.ArgumentTypeError("no image size given")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `segserve-client bench` (--server, --timeout and --json are common)."""
    parser.add_argument("--model", "-m", required=True, help="model name")
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"folder of images (default: CamVid val, ${CAMVID_ENV}/val or ../shared/data/camvid/val)",
    )
    parser.add_argument(
        "--size",
        type=_size_list,
        default=["original", "1920x1080"],
        metavar="SIZES",
        help="comma-separated: 'original' (the files as they are) and/or WxH (resized, JPEG); "
        "default original,1920x1080",
    )
    parser.add_argument("--jpeg-quality", type=int, default=90, metavar="Q")
    parser.add_argument("--max-images", type=int, default=0, metavar="N", help="0: all")
    parser.add_argument(
        "--concurrency", type=_int_list, default=[1, 8], metavar="N,...", help="closed-loop points"
    )
    parser.add_argument(
        "--rate", type=_rate_list, default=[], metavar="R,...", help="open-loop points (requests/s)"
    )
    parser.add_argument("--no-closed", action="store_true", help="open-loop points only")
    parser.add_argument("--mode", choices=["unary", "stream", "both"], default="unary")
    parser.add_argument(
        "--stream-window", type=int, default=1, metavar="N", help="frames in flight per stream"
    )
    parser.add_argument("--duration-s", type=float, default=10.0, help="measured seconds per point")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument(
        "--max-requests", type=int, default=100_000, help="calls per point, at most"
    )
    parser.add_argument(
        "--max-outstanding", type=int, default=256, help="open loop: calls open at once, at most"
    )
    parser.add_argument("--encoding", choices=list(ENCODINGS), default="srle")
    parser.add_argument(
        "--protocol",
        choices=["segserve", "triton"],
        default="segserve",
        help="segserve.v1, or a Triton model taking encoded image bytes (for comparisons)",
    )
    parser.add_argument("--output", "-o", type=Path, metavar="BENCH.json", help="write the report")
    parser.add_argument("--plot", type=Path, metavar="CHART.png", help="write a latency chart")


def loads_of(args: argparse.Namespace) -> list[Load]:
    """The points the arguments ask for: closed loop first, then open loop, mode by mode."""
    modes = ["unary", "stream"] if args.mode == "both" else [args.mode]
    loads: list[Load] = []
    for mode in modes:
        if not args.no_closed:
            loads += [Load(mode, concurrency=n) for n in args.concurrency]
        loads += [Load(mode, rate_rps=r) for r in args.rate]
    return loads


def make_target(args: argparse.Namespace) -> Target[Any]:
    """The target `--protocol` names, at `--server`."""
    if args.protocol == "triton":
        return TritonTarget(args.server, args.model, timeout_s=args.timeout)
    tls, token = security_of(args)
    return SegserveTarget(
        args.server,
        args.model,
        encoding=args.encoding,
        timeout_s=args.timeout,
        tls=tls,
        token=token,
    )


def run(args: argparse.Namespace, client: object = None) -> int:
    """Runs the bench command (the connected sync client of the CLI is not used)."""
    del client
    loads = loads_of(args)
    if not loads:
        raise ValueError("nothing to measure: give --concurrency and/or --rate")
    folder: Path = args.images or default_image_folder()
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist; pass --images DIR")
    image_sets = [
        load_images(folder, size, jpeg_quality=args.jpeg_quality, limit=args.max_images)
        for size in args.size
    ]
    limits = Limits(
        duration_s=args.duration_s,
        max_requests=args.max_requests,
        max_outstanding=args.max_outstanding,
        stream_window=args.stream_window,
    )

    def show(point: dict[str, Any]) -> None:
        if not args.json:
            print(format_point(point), flush=True)

    async def main() -> list[dict[str, Any]]:
        target = make_target(args)
        try:
            return await run_bench(
                target, image_sets, loads, limits, warmup_s=args.warmup_s, on_point=show
            )
        finally:
            await target.close()

    points = asyncio.run(main())
    report = {
        "server": args.server,
        "protocol": args.protocol,
        "model": args.model,
        "encoding": args.encoding,
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "points": points,
    }
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot_latency_throughput(points, args.plot, f"{args.model} on {args.server}")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0
