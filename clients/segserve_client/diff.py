"""segserve-client diff: compare predicted masks with ground truth, or two annotators' masks.

    segserve-client diff pred/ gt/ --model roadseg -o diff.png
    segserve-client diff alice.json bob.zip --classes names.txt --annotators

PRED and GT are label PNGs (pixel = class id), COCO JSON, Label Studio tasks JSON or CVAT
xml/zip files, or folders of them, matched by file stem. Reported per class: IoU, boundary
F-score (boundary pixels matched within `--tolerance` px, 2 by default, square neighbourhood),
and overall the changed pixels and mean IoU (over the classes in either map). The image -o
shows agreement dimmed grey and disagreement in PRED's class colour (magenta where that colour
is dark); for several pairs -o is a folder of STEM.png.
"""

from __future__ import annotations

import argparse
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from segserve_client.client import SegserveClient
from segserve_client.exports import read_label_maps
from segserve_client.overlay import color_table

__all__ = [
    "ClassScore",
    "PairScore",
    "add_arguments",
    "boundary",
    "disagreement_image",
    "encode_rgb_png",
    "run",
    "score_pair",
]

Labels = npt.NDArray[np.uint8]
Bool = npt.NDArray[np.bool_]


def _dilate(mask: Bool, radius: int) -> Bool:
    """Square (Chebyshev) dilation by `radius` pixels, numpy alone."""
    out = mask.copy()
    for _ in range(radius):
        grown = out.copy()
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
        out = grown
    return out


def boundary(mask: Bool) -> Bool:
    """The pixels of `mask` with a 4-neighbour outside it (the image edge is not a boundary)."""
    padded = np.pad(mask, 1, mode="edge")
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~inner


@dataclass
class ClassScore:
    """Sums for one class over one or more pairs."""

    intersection: int = 0
    union: int = 0
    pred_boundary: int = 0
    pred_matched: int = 0
    gt_boundary: int = 0
    gt_matched: int = 0

    def add(self, other: ClassScore) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def iou(self) -> float:
        return self.intersection / self.union if self.union else 1.0

    @property
    def boundary_f(self) -> float:
        if self.pred_boundary == 0 and self.gt_boundary == 0:
            return 1.0
        precision = self.pred_matched / self.pred_boundary if self.pred_boundary else 0.0
        recall = self.gt_matched / self.gt_boundary if self.gt_boundary else 0.0
        total = precision + recall
        return 2 * precision * recall / total if total else 0.0


@dataclass
class PairScore:
    """The comparison of one or more pairs of label maps."""

    pixels: int = 0
    changed: int = 0
    classes: dict[int, ClassScore] = field(default_factory=dict)

    def add(self, other: PairScore) -> None:
        self.pixels += other.pixels
        self.changed += other.changed
        for cid, score in other.classes.items():
            self.classes.setdefault(cid, ClassScore()).add(score)

    @property
    def mean_iou(self) -> float:
        return float(np.mean([s.iou for s in self.classes.values()])) if self.classes else 1.0

    def as_dict(self, names: dict[int, str]) -> dict[str, Any]:
        return {
            "pixels": self.pixels,
            "changed_pixels": self.changed,
            "changed_share": self.changed / self.pixels if self.pixels else 0.0,
            "mean_iou": self.mean_iou,
            "classes": [
                {
                    "class_id": cid,
                    "name": names.get(cid, str(cid)),
                    "iou": s.iou,
                    "boundary_f": s.boundary_f,
                    "intersection": s.intersection,
                    "union": s.union,
                }
                for cid, s in sorted(self.classes.items())
            ],
        }


def score_pair(pred: Labels, gt: Labels, tolerance: int = 2) -> PairScore:
    """IoU and boundary F per class present in either map, and the changed pixels."""
    if pred.shape != gt.shape:
        raise ValueError(f"sizes differ: {pred.shape[::-1]} and {gt.shape[::-1]}")
    score = PairScore(pixels=int(pred.size), changed=int(np.count_nonzero(pred != gt)))
    for cid in np.union1d(np.unique(pred), np.unique(gt)).tolist():
        p, g = pred == cid, gt == cid
        pb, gb = boundary(p), boundary(g)
        score.classes[int(cid)] = ClassScore(
            intersection=int(np.count_nonzero(p & g)),
            union=int(np.count_nonzero(p | g)),
            pred_boundary=int(np.count_nonzero(pb)),
            pred_matched=int(np.count_nonzero(pb & _dilate(gb, tolerance))),
            gt_boundary=int(np.count_nonzero(gb)),
            gt_matched=int(np.count_nonzero(gb & _dilate(pb, tolerance))),
        )
    return score


DARK_SUBSTITUTE = (255, 0, 255)


def disagreement_image(pred: Labels, gt: Labels, colors: npt.NDArray[np.uint8]) -> Labels:
    """(H, W, 3) RGB: agreement as the class colour's grey level dimmed to 40 %, disagreement in
    PRED's class colour, magenta where that colour is dark (channel sum < 96)."""
    table = color_table(colors).astype(np.int64)
    grey = (table.mean(axis=1) * 0.4).astype(np.uint8)
    vivid = table.astype(np.uint8).copy()
    vivid[table.sum(axis=1) < 96] = DARK_SUBSTITUTE
    image = np.repeat(grey[gt][..., None], 3, axis=2)
    differ = pred != gt
    image[differ] = vivid[pred[differ]]
    return image


def _chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def encode_rgb_png(image: Labels) -> bytes:
    """An (H, W, 3) uint8 image as an RGB PNG."""
    height, width = image.shape[:2]
    rows = np.concatenate(
        [np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _chunk(b"IEND", b"")
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pred", type=Path, metavar="PRED", help="masks: file or folder")
    parser.add_argument("gt", type=Path, metavar="GT", help="masks: file or folder")
    names = parser.add_mutually_exclusive_group()
    names.add_argument("--model", "-m", help="class names and colours from this model")
    names.add_argument(
        "--classes", type=Path, metavar="NAMES.txt", help="one name a line, id 0 first"
    )
    parser.add_argument("-o", "--output", type=Path, metavar="DIFF.png", help="disagreement image")
    parser.add_argument(
        "--tolerance", type=int, default=2, metavar="PX", help="boundary, default 2"
    )
    parser.add_argument(
        "--annotators", action="store_true", help="PRED and GT are two annotators' masks"
    )


def _report_text(report: dict[str, Any], annotators: bool) -> str:
    total = report["total"]
    if annotators:
        lines = [f"agreement between the annotators over {len(report['pairs'])} image(s)"]
        head = ["id", "class", "agreement (IoU)", "boundary agreement (F)"]
    else:
        lines = [f"prediction vs ground truth over {len(report['pairs'])} image(s)"]
        head = ["id", "class", "IoU", "boundary F"]
    rows = [head] + [
        [str(c["class_id"]), c["name"], f"{c['iou']:.4f}", f"{c['boundary_f']:.4f}"]
        for c in total["classes"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines += [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]
    share = 100 * total["changed_share"]
    if annotators:
        lines.append(f"mean agreement (IoU) {total['mean_iou']:.4f}")
        lines.append(
            f"pixels the annotators label differently: {total['changed_pixels']} ({share:.2f}%)"
        )
    else:
        lines.append(f"mean IoU {total['mean_iou']:.4f}")
        lines.append(f"changed pixels: {total['changed_pixels']} ({share:.2f}%)")
    for stem in report["unmatched"]:
        lines.append(f"unmatched: {stem}")
    return "\n".join(lines)


def run(args: argparse.Namespace, client: SegserveClient) -> int:
    """The diff subcommand; it calls the server only for --model."""
    from segserve_client.cli import UsageError

    for path in (args.pred, args.gt):
        if not path.exists():
            raise UsageError(f"no such file or folder: {path}")
    names: dict[int, str] = {}
    colors = color_table()
    if args.model:
        info = client.get_model(args.model)
        names = {c.id: c.name for c in info.classes}
        colors = color_table(info.palette)
    elif args.classes:
        lines = [line.strip() for line in args.classes.read_text().splitlines() if line.strip()]
        names = dict(enumerate(lines))
    ids = {name: cid for cid, name in names.items()}
    preds, gts = read_label_maps(args.pred, ids), read_label_maps(args.gt, ids)
    stems = sorted(set(preds) & set(gts))
    if not stems:
        raise UsageError("no masks of PRED and GT share a file stem")
    total = PairScore()
    pairs: dict[str, Any] = {}
    for stem in stems:
        score = score_pair(preds[stem], gts[stem], args.tolerance)
        total.add(score)
        pairs[stem] = score.as_dict(names)
        if args.output:
            target = args.output / f"{stem}.png" if len(stems) > 1 else args.output
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(encode_rgb_png(disagreement_image(preds[stem], gts[stem], colors)))
    report = {
        "mode": "annotators" if args.annotators else "prediction",
        "total": total.as_dict(names),
        "pairs": pairs,
        "unmatched": sorted(set(preds) ^ set(gts)),
    }
    print(json.dumps(report, indent=2) if args.json else _report_text(report, args.annotators))
    return 0
