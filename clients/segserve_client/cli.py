"""segserve-client: segment an image and look at the models of a segserve server.

    segserve-client segment street.jpg --model roadseg -o mask.png --overlay overlay.png
    segserve-client models
    segserve-client model roadseg
    segserve-client stream clip.mp4 --model roadseg --fps 30 --policy latest

Each subcommand is one entry of COMMANDS: its help, a function adding its arguments and a
function running it with a connected client; `bench` (segserve_client.bench) and `stream`
(segserve_client.play) live in packages of their own. Every subcommand takes --server (default
$SEGSERVE_SERVER or localhost:50051), --timeout and --json, and the TLS and token flags
(--tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name, --token or $SEGSERVE_TOKEN;
`segserve_client.security`).
Exit status: 0 done, 1 a failed call (printed as `error: CODE: details`) or a local failure,
2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from segserve_client import bench, diff, play, prefill
from segserve_client.client import SegserveClient
from segserve_client.errors import SegserveError
from segserve_client.integrations import cvat as cvat_function
from segserve_client.integrations import labelstudio
from segserve_client.masks import encode_png
from segserve_client.overlay import color_table, load_image_rgb, overlay, save_image_rgb
from segserve_client.security import add_security_arguments, security_of
from segserve_client.types import ENCODINGS, OUTPUT_SIZES, ModelInfo, Segmentation
from segserve_client.upload import UPLOAD_ABOVE_BYTES

__all__ = [
    "COMMANDS",
    "DEFAULT_SERVER",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "SERVER_ENV",
    "Command",
    "UsageError",
    "build_parser",
    "main",
]

DEFAULT_SERVER = "localhost:50051"
SERVER_ENV = "SEGSERVE_SERVER"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A wrong argument found after parsing (an image file that is not there): exit status 2."""


class Command(NamedTuple):
    """One subcommand."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, SegserveClient], int]


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _version(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: the serving version), got {text}")
    return value


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _table(rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


# ----------------------------------------------------------------------------------------------
# segment
# ----------------------------------------------------------------------------------------------


def _add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, metavar="IMAGE", help="JPEG, PNG, WebP or BMP file")
    parser.add_argument("--model", "-m", required=True, help="model name")
    parser.add_argument(
        "--model-version", type=_version, default=0, metavar="N", help="default: the serving one"
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="MASK.png",
        help="write the label map: an indexed PNG in the model's class colours",
    )
    parser.add_argument(
        "--overlay",
        type=Path,
        metavar="OVERLAY.png",
        help="write the image with the class colours blended over it (needs OpenCV)",
    )
    parser.add_argument("--encoding", choices=list(ENCODINGS), default="srle", help="on the wire")
    parser.add_argument(
        "--output-size",
        choices=list(OUTPUT_SIZES),
        default="original",
        help="label map at the image's size or the model's input size",
    )
    parser.add_argument(
        "--counts", action="store_true", help="pixel counts from the server (else counted here)"
    )
    parser.add_argument(
        "--upload",
        action="store_true",
        help="send the file in chunks (SegmentUpload), as files over 60 MiB always are",
    )


def _segment_report(
    args: argparse.Namespace, result: Segmentation, labels: np.ndarray, round_trip_ms: float
) -> dict[str, Any]:
    if args.counts:
        counts = {c.class_id: c.pixel_count for c in result.classes}
    else:
        counted = np.bincount(labels.ravel(), minlength=256)
        counts = {c.class_id: int(counted[c.class_id]) for c in result.classes}
    pixels = result.width * result.height
    return {
        "model": result.model,
        "model_version": result.model_version,
        "width": result.width,
        "height": result.height,
        "encoding": args.encoding,
        "mask_bytes": len(result.masks.get(args.encoding, b"")),
        "classes": [
            {
                "class_id": c.class_id,
                "name": c.name,
                "pixel_count": counts[c.class_id],
                "percent": round(100.0 * counts[c.class_id] / pixels, 2),
            }
            for c in result.classes
        ],
        "timings_us": asdict(result.timings),
        "round_trip_ms": round(round_trip_ms, 3),
        "written": {
            name: str(path)
            for name, path in (("mask", args.output), ("overlay", args.overlay))
            if path is not None
        },
    }


def _print_segment_report(report: dict[str, Any]) -> None:
    print(
        f"{report['model']} v{report['model_version']}: {report['width']}x{report['height']} "
        f"label map, {report['encoding']} {report['mask_bytes'] / 1024:.1f} KiB"
    )
    rows: list[list[object]] = [["id", "class", "pixels", "%"]]
    rows += [
        [c["class_id"], c["name"], c["pixel_count"], f"{c['percent']:.2f}"]
        for c in report["classes"]
    ]
    print("  " + _table(rows).replace("\n", "\n  "))
    t = report["timings_us"]
    stages = ("decode", "preprocess", "queue", "infer", "postprocess", "encode")
    print(
        f"server {t['total_us'] / 1e3:.2f} ms: "
        + ", ".join(f"{s} {t[s + '_us'] / 1e3:.2f}" for s in stages)
        + f" (batch of {t['batch_size']})"
    )
    print(f"round trip {report['round_trip_ms']:.2f} ms")
    if report["written"]:
        print("wrote " + ", ".join(report["written"].values()))


def _run_segment(args: argparse.Namespace, client: SegserveClient) -> int:
    if not args.image.is_file():
        raise UsageError(f"no such image file: {args.image}")
    image_rgb = load_image_rgb(args.image) if args.overlay else None  # no OpenCV: fail now
    started = time.perf_counter()
    options: dict[str, Any] = {
        "version": args.model_version,
        "encodings": args.encoding,
        "output_size": args.output_size,
        "include_pixel_counts": args.counts,
    }
    if args.upload or args.image.stat().st_size > UPLOAD_ABOVE_BYTES:
        result = client.segment_large(args.image, args.model, **options)
    else:
        result = client.segment(args.image.read_bytes(), args.model, **options)
    round_trip_ms = (time.perf_counter() - started) * 1e3
    labels = result.labels
    if args.output or image_rgb is not None:
        palette = client.get_model(result.model, result.model_version).palette
        colors = color_table(palette)
        if args.output:
            size = max(int(labels.max()) + 1, len(palette))
            png_palette = [(r, g, b) for r, g, b in colors[:size].tolist()]
            args.output.write_bytes(encode_png(labels, palette=png_palette))
        if image_rgb is not None:
            save_image_rgb(args.overlay, overlay(image_rgb, labels, colors, alpha=0.5))
    report = _segment_report(args, result, labels, round_trip_ms)
    if args.json:
        _print_json(report)
    else:
        _print_segment_report(report)
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# models, model
# ----------------------------------------------------------------------------------------------


def _add_models_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no arguments of its own


def _run_models(args: argparse.Namespace, client: SegserveClient) -> int:
    models = client.list_models()
    if args.json:
        _print_json([asdict(m) for m in models])
    elif not models:
        print("no models")
    else:
        rows: list[list[object]] = [["NAME", "STATE", "SERVING", "VERSIONS", "REASON"]]
        rows += [
            [m.name, m.state, m.serving_version or "-", ",".join(map(str, m.versions)), m.reason]
            for m in models
        ]
        print(_table(rows))
    return EXIT_OK


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="model name")
    parser.add_argument(
        "--model-version", type=_version, default=0, metavar="N", help="default: the serving one"
    )


def _print_model(info: ModelInfo) -> None:
    b = info.batching
    print(f"{info.name} v{info.version} {info.state}" + (f": {info.reason}" if info.reason else ""))
    fields = [
        ["platform", f"{info.platform} on {info.backend}"],
        ["input", f"{info.input_width}x{info.input_height}"],
        ["outputs", "class ids" if info.outputs_labels else "class scores (argmax on the server)"],
        [
            "batching",
            f"max batch {b.max_batch_size}, preferred {b.preferred_batch_sizes or '-'}, "
            f"max queue delay {b.max_queue_delay_us} us, max queue size {b.max_queue_size}",
        ],
    ]
    if info.description:
        fields.append(["description", info.description])
    print("  " + _table(fields).replace("\n", "\n  "))
    rows: list[list[object]] = [["id", "class", "colour"]]
    rows += [[c.id, c.name, "#{:02x}{:02x}{:02x}".format(*c.color)] for c in info.classes]
    print("  " + _table(rows).replace("\n", "\n  "))


def _run_model(args: argparse.Namespace, client: SegserveClient) -> int:
    info = client.get_model(args.name, args.model_version)
    if args.json:
        _print_json(asdict(info))
    else:
        _print_model(info)
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "segment": Command("segment one image", _add_segment_arguments, _run_segment),
    "models": Command("list the server's models", _add_models_arguments, _run_models),
    "model": Command("describe one model", _add_model_arguments, _run_model),
    "bench": Command("measure throughput and latency", bench.add_arguments, bench.run),
    "stream": Command("play a video or images as real-time streams", play.add_arguments, play.run),
    "prefill": Command(
        "segment a folder into one labelling-tool import file", prefill.add_arguments, prefill.run
    ),
    "diff": Command("compare masks: IoU, boundary F, changes", diff.add_arguments, diff.run),
    "labelstudio-backend": Command(
        "serve a Label Studio ML backend", labelstudio.add_arguments, labelstudio.run
    ),
    "cvat-function": Command(
        "serve a CVAT serverless detector, or write its function.yaml",
        cvat_function.add_arguments,
        cvat_function.run,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of segserve-client, one sub-parser per COMMANDS entry."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=os.environ.get(SERVER_ENV) or DEFAULT_SERVER,
        metavar="HOST:PORT",
        help=f"server address (default: ${SERVER_ENV} or {DEFAULT_SERVER})",
    )
    common.add_argument(
        "--timeout", type=_positive_float, metavar="S", help="deadline of each call in seconds"
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_security_arguments(common)
    parser = argparse.ArgumentParser(
        prog="segserve-client", description="Segment images with a segserve server."
    )
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub = subcommands.add_parser(
            name, parents=[common], help=command.help, description=command.help
        )
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def _fail(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Runs segserve-client with `argv` (default: sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        tls, token = security_of(args)
        with SegserveClient(args.server, timeout_s=args.timeout, tls=tls, token=token) as client:
            run: Callable[[argparse.Namespace, SegserveClient], int] = args.run  # Command.run
            return run(args, client)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except SegserveError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except (OSError, ValueError, ImportError) as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
