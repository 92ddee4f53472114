"""segserve-client prefill: segment a folder of images into one import file for a labelling tool.

    segserve-client prefill images/ --model roadseg --format coco -o prefill.json

Images are segmented `--concurrency` at a time (default 4) at the model's default priority level
(bulk work, below real-time streams; --priority to choose). Each finished image is appended to a
sidecar state file, OUT.partial.jsonl: a rerun after an interruption or failures skips the images
it holds. The import file (see segserve_client.exports) is written at the end from the state,
and the state file removed when no image failed. A file that fails (unreadable, not an image) is
reported on stderr and in the summary without stopping the run; the exit status is then 1.

Scores: when the model has confidence (GetModel's has_confidence, asked once at the start), each
image is segmented with include_confidence and its record carries `score`, the image's mean
confidence (ImageScores.mean_confidence), and per class `score`, the mean confidence of the
class's pixels (Segmentation.class_confidence); the exports write them (segserve_client.exports:
Label Studio prediction and item scores, COCO annotation scores). Without confidence (a
labels-only model) records have no scores and the exports keep their stand-ins.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, Protocol

from segserve_client.aio import AsyncSegserveClient
from segserve_client.client import SegserveClient
from segserve_client.errors import SegserveError
from segserve_client.exports import ANNOTATION_OF_FORMAT, EXPORT_FORMATS, ImageRecord, write_export
from segserve_client.security import security_of
from segserve_client.types import Segmentation

__all__ = ["IMAGE_SUFFIXES", "add_arguments", "list_images", "prefill", "run", "state_path"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class _Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def close(self) -> Any: ...


class _LineProgress:
    """A one-line stderr progress counter, shown on terminals only (tqdm's stand-in)."""

    def __init__(self, total: int, initial: int) -> None:
        self.total, self.count = total, initial
        self.shown = sys.stderr.isatty()

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.shown:
            print(f"\rprefill {self.count}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.shown:
            print(file=sys.stderr)


def _progress(total: int, initial: int) -> _Progress:
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineProgress(total, initial)
    bar: _Progress = tqdm(total=total, initial=initial, unit="image", disable=None)
    return bar


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, metavar="FOLDER", help="folder of images")
    parser.add_argument("--model", "-m", required=True, help="model name")
    parser.add_argument("--format", choices=EXPORT_FORMATS, required=True, help="import file")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="OUT",
        help="the import file (cvat: .xml, or .zip with annotations.xml inside)",
    )
    parser.add_argument("--recursive", "-r", action="store_true", help="include sub-folders")
    parser.add_argument("--concurrency", type=int, default=4, metavar="N", help="default 4")
    parser.add_argument(
        "--priority", type=int, default=0, metavar="P", help="default: the model's default level"
    )
    parser.add_argument(
        "--skip-class",
        type=int,
        action="append",
        default=[],
        metavar="ID",
        help="leave class ID out (e.g. 0, background); default: every class",
    )
    parser.add_argument(
        "--iscrowd", action="store_true", help="coco: mark annotations iscrowd=1 (default 0)"
    )
    parser.add_argument("--from-name", default="tag", help="labelstudio: the BrushLabels name")
    parser.add_argument("--to-name", default="image", help="labelstudio: the Image name")
    parser.add_argument(
        "--image-url-prefix",
        default="",
        metavar="PREFIX",
        help="labelstudio: data.image is PREFIX + the path relative to FOLDER",
    )


def _class_score(result: Segmentation, class_id: int) -> dict[str, float]:
    """{"score": the class's mean confidence} with confidence, {} without."""
    score = result.class_confidence.get(class_id)
    return {} if score is None else {"score": float(score)}


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """The images of `folder`, sorted by relative path."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def state_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial.jsonl")


def _load_state(path: Path, fmt: str) -> dict[str, ImageRecord]:
    done: dict[str, ImageRecord] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the interruption
            continue
        if record.get("format") == fmt:
            done[record["file"]] = record
    return done


async def prefill(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the prefill of `args`; returns the summary."""
    folder: Path = args.folder
    images = list_images(folder, args.recursive)
    names = [p.relative_to(folder).as_posix() for p in images]
    fmt: str = args.format
    sidecar = state_path(args.output)
    done = _load_state(sidecar, fmt)
    resumed = sum(name in done for name in names)
    todo = [(p, n) for p, n in zip(images, names, strict=True) if n not in done]
    failed: dict[str, str] = {}
    annotation = ANNOTATION_OF_FORMAT[fmt]
    key = "coco_rle_counts" if annotation == "coco_rle" else annotation  # ClassAnnotation's
    tls, token = security_of(args)
    async with AsyncSegserveClient(
        args.server, timeout_s=args.timeout, tls=tls, token=token
    ) as client:
        info = await client.get_model(args.model)
        semaphore = asyncio.Semaphore(args.concurrency)
        progress = _progress(len(names), resumed)
        with sidecar.open("a") as state:

            async def one(path: Path, name: str) -> None:
                async with semaphore:
                    try:
                        data = await asyncio.to_thread(path.read_bytes)
                        result = await client.segment(
                            data,
                            args.model,
                            priority=args.priority,
                            annotations=[annotation],
                            include_confidence=info.has_confidence,
                        )
                    except (SegserveError, OSError) as exc:
                        failed[name] = str(exc)
                        print(f"error: {name}: {exc}", file=sys.stderr)
                    else:
                        record: ImageRecord = {
                            "file": name,
                            "width": result.width,
                            "height": result.height,
                            "format": fmt,
                            "model_version": result.model_version,
                            "annotations": [
                                {
                                    "class_id": a.class_id,
                                    "name": a.name,
                                    "area": a.area,
                                    "bbox": list(a.bbox),
                                    key: getattr(a, key),
                                }
                                | _class_score(result, a.class_id)
                                for a in result.annotations
                            ],
                        }
                        if result.scores is not None:
                            record["score"] = float(result.scores.mean_confidence)
                        state.write(json.dumps(record) + "\n")
                        state.flush()
                        done[name] = record
                    progress.update(1)

            try:
                await asyncio.gather(*(one(p, n) for p, n in todo))
            finally:
                progress.close()
    records = [done[n] for n in names if n in done]
    classes = [(c.id, c.name, c.color) for c in info.classes]
    write_export(
        args.output,
        fmt,
        records,
        classes,
        model_version=f"{info.name} v{info.version}",
        iscrowd=int(args.iscrowd),
        skip_classes=args.skip_class,
        from_name=args.from_name,
        to_name=args.to_name,
        image_url_prefix=args.image_url_prefix,
    )
    if not failed:
        sidecar.unlink(missing_ok=True)
    return {
        "output": str(args.output),
        "format": fmt,
        "images": len(names),
        "segmented": len(todo) - len(failed),
        "resumed": resumed,
        "failed": failed,
        "state": str(sidecar) if failed else None,
    }


def run(args: argparse.Namespace, client: SegserveClient) -> int:
    """The prefill subcommand (its own asyncio client; `client` is not used)."""
    del client
    if not args.folder.is_dir():
        from segserve_client.cli import UsageError

        raise UsageError(f"no such folder: {args.folder}")
    if args.priority < 0:
        from segserve_client.cli import UsageError

        raise UsageError(f"--priority must be >= 0 (0: the model's default), got {args.priority}")
    if args.concurrency < 1:
        from segserve_client.cli import UsageError

        raise UsageError(f"--concurrency must be >= 1, got {args.concurrency}")
    summary = asyncio.run(prefill(args))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"wrote {summary['output']} ({summary['format']}): {summary['images']} images, "
            f"{summary['segmented']} segmented, {summary['resumed']} from the state file, "
            f"{len(summary['failed'])} failed"
        )
        for name, error in summary["failed"].items():
            print(f"  failed: {name}: {error}")
        if summary["failed"]:
            print(f"  rerun to retry the failed images (state kept in {summary['state']})")
    return 1 if summary["failed"] else 0
