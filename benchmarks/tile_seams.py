"""Seams of tiled inference on real large images: CamVid val frames upscaled at run time.

    .venv/bin/python benchmarks/tile_seams.py [--frames 6] [--upscale 4] [--scale 2] \\
        [--overlap 64] [--model deeplabv3plus_camvid] [--out benchmarks/results/tile_seams.md]

Each frame (480x360) is upscaled `--upscale` times (INTER_LINEAR) and segmented by one
in-process server (gRPC on loopback) through variants of the bundled model that differ only in
their segserve.tiling parameters: tiled at segserve.tile_scale `--scale` with no overlap, with
`--overlap` px and the model's own rule (confidence), with the overlap and the "centre" rule;
and not tiled (resized to the input, as before). Measured on the canvas (OUTPUT_SIZE_MODEL):

- label disagreement across a line: the share of neighbouring pixel pairs straddling it whose
  labels differ, on the tile edges of the no-overlap plan (where its seams are) and on every
  other row/column (the interior baseline); a seam shows as disagreement above the baseline;
- accuracy against the frame's CamVid labels (upscaled the same way, nearest; void ignored)
  within 4 px of those seam lines and elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import cv2
import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from segserve.v1 import segserve_pb2 as pb  # noqa: E402
from segserve.v1 import segserve_pb2_grpc as pb_grpc  # noqa: E402
from segserve_server.core.tiling import axis_starts  # noqa: E402
from segserve_server.server import Server  # noqa: E402
from segserve_server.settings import Settings  # noqa: E402

CAMVID = ROOT.parent / "shared" / "data" / "camvid"
VOID = 11


def variants(overlap: int, scale: float) -> dict[str, str]:
    def params(tiling: str, overlap_px: int, blend: str) -> str:
        values = {"tiling": tiling, "tile_overlap_px": overlap_px, "tile_scale": scale}
        values["tile_blend"] = blend
        return "".join(
            f'parameters {{ key: "segserve.{k}" value: {{ string_value: "{v}" }} }}\n'
            for k, v in values.items()
        )

    return {
        "resized (no tiling)": params("off", 0, "auto"),
        "tiled, overlap 0": params("on", 0, "auto"),
        f"tiled, overlap {overlap}, confidence rule": params("on", overlap, "auto"),
        f"tiled, overlap {overlap}, centre rule": params("on", overlap, "centre"),
    }


def build_repository(root: Path, model: str, overlap: int, scale: float) -> dict[str, str]:
    """One folder per variant: the bundled config plus its parameters, the served version's
    model.onnx linked (not copied)."""
    source = ROOT / "model_repository" / model
    version = max(int(p.name) for p in source.iterdir() if p.is_dir() and p.name.isdigit())
    names = {}
    for i, (label, extra) in enumerate(variants(overlap, scale).items()):
        name = f"v{i}"
        folder = root / name
        (folder / "1").mkdir(parents=True)
        (folder / "1" / "model.onnx").symlink_to(source / str(version) / "model.onnx")
        (folder / "labels.txt").symlink_to(source / "labels.txt")
        text = (source / "config.pbtxt").read_text().replace(f'name: "{model}"', f'name: "{name}"')
        (folder / "config.pbtxt").write_text(text + extra)
        names[label] = name
    return names


def disagreement(labels: np.ndarray, axis: int, lines: list[int]) -> tuple[float, float]:
    """Share of differing pairs (line - 1, line) on `lines`, and on every other line."""
    diff = np.diff(labels.astype(np.int16), axis=axis) != 0  # diff[k]: pair (k, k + 1)
    per_line = diff.mean(axis=1 - axis)
    seam = np.zeros(per_line.shape, bool)
    seam[[line - 1 for line in lines]] = True
    return float(per_line[seam].mean()), float(per_line[~seam].mean())


async def measure(args: argparse.Namespace) -> str:
    frames = sorted((CAMVID / "val").glob("*.png"))[: args.frames]
    if not frames:
        raise SystemExit(f"no CamVid frames under {CAMVID}")
    with tempfile.TemporaryDirectory() as scratch:
        names = build_repository(Path(scratch), args.model, args.overlap, args.scale)
        settings = Settings(
            model_repository=Path(scratch), host="127.0.0.1", port=0, metrics_port=None,
            kserve_port=None, http_port=None, log_level="WARNING",
        )  # fmt: skip
        server = Server(settings)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                return await run(pb_grpc.SegmentationStub(channel), names, frames, args)
        finally:
            await server.stop(timeout_s=10)


async def run(stub, names: dict[str, str], frames: list[Path], args: argparse.Namespace) -> str:
    info = await stub.GetModel(pb.GetModelRequest(name=names["tiled, overlap 0"]))
    tile_w, tile_h = info.input_width, info.input_height
    totals: dict[str, list[np.ndarray]] = {label: [] for label in names}
    canvas = None
    for path in frames:
        frame = cv2.imread(str(path))
        truth = cv2.imread(str(CAMVID / "valannot" / path.name), cv2.IMREAD_UNCHANGED)
        big = cv2.resize(frame, None, fx=args.upscale, fy=args.upscale)
        ok, data = cv2.imencode(".png", big)
        assert ok
        for label, name in names.items():
            response = await stub.Segment(
                pb.SegmentRequest(
                    model=name,
                    image=pb.Image(encoded=data.tobytes()),
                    encodings=[pb.MASK_ENCODING_RAW],
                    output_size=pb.OUTPUT_SIZE_ORIGINAL,
                ),
                timeout=600,
            )
            labels = np.frombuffer(response.masks[0].data, np.uint8).reshape(
                response.height, response.width
            )
            # The canvas: the image at the model's resolution (1 / tile_scale).
            canvas = (round(big.shape[1] / args.scale), round(big.shape[0] / args.scale))
            labels = cv2.resize(labels, canvas, interpolation=cv2.INTER_NEAREST_EXACT)
            gt = cv2.resize(truth, canvas, interpolation=cv2.INTER_NEAREST_EXACT)
            xs = list(axis_starts(canvas[0], tile_w, 0)[1:])  # the no-overlap plan's seams
            ys = list(axis_starts(canvas[1], tile_h, 0)[1:])
            col_seam, col_base = disagreement(labels, 1, xs)
            row_seam, row_base = disagreement(labels, 0, ys)
            near = np.zeros(labels.shape, bool)
            for x in xs:
                near[:, x - 4 : x + 4] = True
            for y in ys:
                near[y - 4 : y + 4] = True
            valid = gt != VOID
            right = labels == gt
            totals[label].append(
                np.array(
                    [
                        (col_seam + row_seam) / 2,
                        (col_base + row_base) / 2,
                        right[near & valid].mean(),
                        right[~near & valid].mean(),
                        response.timings.total_us / 1e6,
                    ]
                )
            )
    lines = [
        "# Tile seams on upscaled CamVid frames",
        "",
        f"`.venv/bin/python benchmarks/tile_seams.py --frames {args.frames} --upscale "
        f"{args.upscale} --scale {args.scale:g} --overlap {args.overlap} --model {args.model}`",
        "",
        f"{len(frames)} CamVid val frames upscaled {args.upscale}x to "
        f"{args.upscale * 480}x{args.upscale * 360}; tile_scale {args.scale:g}: canvas "
        f"{canvas[0]}x{canvas[1]}, model input {tile_w}x{tile_h}; seams = the no-overlap plan's "
        "tile edges. Means over frames. Disagreement: share of neighbouring pixel pairs across "
        "the line with different labels (the interior baseline: every other row/column). "
        "Accuracy: against CamVid's labels, void ignored, within 4 px of a seam and elsewhere.",
        "",
        "| variant | disagreement at seams | interior | seam / interior | accuracy near seams "
        "| elsewhere | seconds per image |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, rows in totals.items():
        seam, base, near_acc, far_acc, seconds = np.mean(rows, axis=0)
        lines.append(
            f"| {label} | {seam:.2%} | {base:.2%} | {seam / base:.2f} | {near_acc:.2%} "
            f"| {far_acc:.2%} | {seconds:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--upscale", type=int, default=4)
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--model", default="deeplabv3plus_camvid")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/tile_seams.md")
    args = parser.parse_args()
    report = asyncio.run(measure(args))
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
