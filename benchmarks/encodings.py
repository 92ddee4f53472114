"""Annotation-tool mask formats on a 1920x1080 street label map: size, encode and decode time.

    .venv/bin/python benchmarks/encodings.py [--label-map PATH] [--runs 30] [--size 1920x1080]

The label map is a CamVid val label PNG ($SEGSERVE_CAMVID/valannot, else
../shared/data/camvid/valannot; the first by name unless --label-map) upscaled nearest-neighbour
to --size. Every encoding covers all the classes present. `bytes` is what the message carries:
compact JSON (`separators=(",", ":")`) for the JSON formats, the raw bytes for SRLE and PNG
(segserve's own encodings, in a protobuf `bytes` field; base64 in JSON would be 4/3 of that).
Encode and decode times are medians over --runs runs after two warm-up runs, in this process,
on one thread; decode gives back the label map's class masks (SRLE and PNG the label map).
Absolute times vary from machine to machine: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "clients"))

from segserve_client.formats import (  # noqa: E402
    coco_rle_per_class,
    cvat_bitmap,
    cvat_masks_per_class,
    decode_coco_rle,
    decode_cvat_bitmap,
    decode_cvat_mask,
    decode_labelstudio_rle,
    labelstudio_rle_per_class,
    polygons_per_class,
    rasterize,
)
from segserve_client.masks import decode_png, decode_srle, encode_png, encode_srle  # noqa: E402


def default_label_map() -> Path:
    root = os.environ.get("SEGSERVE_CAMVID")
    folder = (Path(root) if root else ROOT.parent / "shared" / "data" / "camvid") / "valannot"
    files = sorted(folder.glob("*.png"))
    if not files:
        raise SystemExit(f"no CamVid val label maps in {folder}: pass --label-map")
    return files[0]


def json_size(obj: Any) -> int:
    return len(json.dumps(obj, separators=(",", ":")))


def median_ms(fn: Callable[[], object], runs: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def pycocotools_rows(labels: np.ndarray, runs: int) -> list[tuple[str, int, float, float]]:
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        return []

    def encode() -> list[dict[str, Any]]:
        out = []
        for class_id in np.unique(labels).tolist():
            rle = coco_mask.encode(np.asfortranarray((labels == class_id).view(np.uint8)))
            out.append(
                {
                    "class_id": class_id,
                    "rle": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "area": int(coco_mask.area(rle)),
                    "bbox": coco_mask.toBbox(rle).tolist(),
                }
            )
        return out

    encoded = encode()
    rles = [{"size": c["rle"]["size"], "counts": c["rle"]["counts"].encode()} for c in encoded]
    return [
        (
            "COCO RLE per class (pycocotools, reference)",
            json_size(encoded),
            median_ms(encode, runs),
            median_ms(lambda: [coco_mask.decode(r) for r in rles], runs),
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label-map", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--size", default="1920x1080", help="WIDTHxHEIGHT")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    path = args.label_map or default_label_map()
    small = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if small is None or small.ndim != 2:
        raise SystemExit(f"{path} is not a single-channel label PNG")
    labels = cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)
    classes = np.unique(labels).tolist()
    runs = args.runs
    rows: list[tuple[str, int, float, float]] = []

    def add(name: str, encode: Callable[[], Any], decode: Callable[[Any], object]) -> None:
        encoded = encode()
        size = len(encoded) if isinstance(encoded, bytes) else json_size(encoded)
        rows.append((name, size, median_ms(encode, runs), median_ms(lambda: decode(encoded), runs)))

    add("SRLE (segserve, zlib 1)", lambda: encode_srle(labels), decode_srle)
    add("PNG (segserve, zlib 1)", lambda: encode_png(labels), decode_png)
    add(
        "COCO RLE per class",
        lambda: coco_rle_per_class(labels),
        lambda out: [decode_coco_rle(c["rle"]) for c in out],
    )
    rows.extend(pycocotools_rows(labels, runs))
    add(
        "CVAT mask points per class",
        lambda: cvat_masks_per_class(labels),
        lambda out: [decode_cvat_mask(s["points"], height, width) for s in out],
    )
    add(
        "CVAT mask points per 8-connected region",
        lambda: cvat_masks_per_class(labels, connectivity=8),
        lambda out: [decode_cvat_mask(s["points"], height, width) for s in out],
    )
    add(
        "CVAT serverless bitmap per class",
        lambda: [cvat_bitmap(labels == c) for c in classes],
        lambda out: [decode_cvat_bitmap(m, height, width) for m in out],
    )
    add(
        "Label Studio brush RLE per class",
        lambda: labelstudio_rle_per_class(labels),
        lambda out: [decode_labelstudio_rle(c["rle"], height, width) for c in out],
    )
    for tolerance in (0.0, 1.0):
        add(
            f"polygons per class, tolerance {tolerance:g} px (cv2)",
            lambda tolerance=tolerance: polygons_per_class(labels, tolerance_px=tolerance),
            lambda out: [rasterize(c["regions"], height, width) for c in out],
        )

    print(
        f"{path.name} upscaled to {width}x{height}, {len(classes)} classes; "
        f"median of {runs} runs; Python {platform.python_version()}, numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs"
    )
    print()
    print("| encoding | bytes | encode ms | decode ms |")
    print("| --- | ---: | ---: | ---: |")
    for name, size, encode_ms, decode_ms in rows:
        print(f"| {name} | {size:,} | {encode_ms:.1f} | {decode_ms:.1f} |")


if __name__ == "__main__":
    main()
