"""Side-by-side benchmark: the model's own limit, segserve, a real Triton and a naive server.

    .venv/bin/python benchmarks/compare.py [--model-repository model_repository]
        [--model deeplabv3plus_camvid] [--rounds 3] [--duration-s 10] [--out-dir benchmarks/results]

In one run, on the same frames (CamVid val upscaled to 1920x1080 JPEG by default), it measures
  (a) the limit: ONNX Runtime alone on pre-made tensors at its best batch size, plus the fastest
      decode and the fastest mask encode of the same frames: limit = 1 / (model + decode + encode);
  (b) segserve end to end (`segserve serve`, its own process);
  (c) a real Triton (the tritonserver bundled with nvidia-pytriton) whose Python model runs
      segserve's decode, preprocessing, postprocessing and encoding around the same ONNX model,
      with Triton's dynamic batching and the config's instance count (benchmarks/triton/model.py);
  (d) a naive gRPC server: decode, ONNX Runtime, PNG per request, no batching
      (benchmarks/naive_server.py).
Each server runs in its own process and is loaded by `segserve-client bench` in another one
(closed loop at each --concurrency, unary calls, loopback only, bounded in time and count). Each
round measures (a), then every server at every concurrency, each point after its own warm-up;
the figures are medians over the rounds, so a burst of other work on the machine moves one round,
not the result (the machine's other load is recorded per point). It prints a table with ratios
and writes it as Markdown and JSON to --out-dir. The Triton side needs a venv of its own
(numpy < 2) with nvidia-pytriton, onnxruntime, opencv-python-headless and simplejpeg: the first
of .venv-triton (`make triton-env`) and --triton-python that has them; without one, (c) is left out.

The pieces, beside this file (run as a script, benchmarks/ is first on sys.path):
  compare_limit.py    (a): frames prepared once, ORT alone, the fastest decode and encode, the
                      limit, and segserve's own stage CPU in this process;
  compare_servers.py  (b), (c), (d): start each server in its own process, stop them all;
  compare_load.py     one closed-loop point from a `segserve-client bench` process, with CPU costs;
  compare_report.py   medians over rounds, the Markdown tables and the verdicts;
  compare.py          the command line, the rounds, and the files written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compare_limit import (
    Frames,
    limit_of,
    measure_codecs,
    measure_model,
    prepare_frames,
    segserve_stage_cpu,
)
from compare_load import bench_point
from compare_report import report, summarise, summarise_limit
from compare_servers import (
    ROOT,
    ServerProcess,
    find_triton_python,
    servers_running,
    start_naive,
    start_segserve,
    start_triton,
)

from segserve_client import bench
from segserve_server.model_repository import ModelConfig, parse_config

Rounds = list[dict[str, dict[int, dict[str, Any]]]]  # per round: target -> concurrency -> point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", default="deeplabv3plus_camvid")
    parser.add_argument("--images", type=Path, default=None, help="default: CamVid val")
    parser.add_argument("--size", default="1920x1080", help="WxH, or 'original'")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--max-images", type=int, default=32)
    parser.add_argument("--concurrency", type=bench._int_list, default=[1, 8])
    parser.add_argument("--duration-s", type=float, default=10.0, help="per point and round")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="segserve,triton,naive", help="targets to run")
    parser.add_argument("--triton-python", type=Path, help="python of the Triton venv")
    parser.add_argument(
        "--triton-instances", type=int, help="model instances in Triton (default: the config's)"
    )
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    return parser.parse_args(argv)


def write_frames(frames: Frames, folder: Path) -> None:
    """The frames as files, for the load generator's --images."""
    folder.mkdir()
    suffix = ".jpg" if frames.images[0][:3] == b"\xff\xd8\xff" else ".png"
    for i, data in enumerate(frames.images):
        (folder / f"frame_{i:04d}{suffix}").write_bytes(data)


def server_starters(
    args: argparse.Namespace,
    model_dir: Path,
    config: ModelConfig,
    work: Path,
    skipped: dict[str, str],
) -> dict[str, Callable[[], ServerProcess]]:
    """How to start each of the --only targets; a target that cannot run goes to `skipped`."""
    wanted = args.only.split(",")
    triton_python, triton_missing = find_triton_python(args.triton_python)
    starters: dict[str, Callable[[], ServerProcess]] = {}
    if "segserve" in wanted:
        starters["segserve"] = lambda: start_segserve(args.model_repository, args.model, work)
    if "triton" in wanted:
        if triton_python is None:
            skipped["triton"] = triton_missing
        else:
            instances = args.triton_instances or config.instance_count
            starters["triton"] = lambda: start_triton(
                triton_python, model_dir, config, work, instances
            )
    if "naive" in wanted:
        starters["naive"] = lambda: start_naive(model_dir, work)
    return starters


def run_rounds(
    args: argparse.Namespace,
    running: dict[str, ServerProcess],
    frames: Frames,
    frame_dir: Path,
    model_path: Path,
    config: ModelConfig,
    work: Path,
) -> tuple[list[dict[str, Any]], Rounds]:
    """Each round: (a), then every server at every concurrency, each point after its warm-up."""
    limits: list[dict[str, Any]] = []
    rounds: Rounds = []
    for index in range(args.rounds):
        print(f"round {index + 1}/{args.rounds}: (a) ORT alone, decode, encode", flush=True)
        decode, encode = measure_codecs(frames, config)
        limits.append(
            limit_of(measure_model(model_path, config, frames.tensors, 1.5), decode, encode)
        )
        print(f"    limit {limits[-1]['throughput_rps']:.2f} img/s", flush=True)
        measured: dict[str, dict[int, dict[str, Any]]] = {}
        for name, server in running.items():
            for c in args.concurrency:
                point = bench_point(server, frame_dir, c, args.duration_s, args.warmup_s, work)
                measured.setdefault(name, {})[c] = point
                print(
                    f"    {name:>8} c={c}: " + bench.format_point(point).split("\n")[0].strip(),
                    flush=True,
                )
        rounds.append(measured)
    return limits, rounds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = args.model_repository / args.model
    config = parse_config((model_dir / "config.pbtxt").read_text(), model_dir)
    version = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    model_path = model_dir / str(version) / config.model_filename
    folder = args.images or bench.default_image_folder()
    image_set = bench.load_images(
        folder, args.size, jpeg_quality=args.jpeg_quality, limit=args.max_images
    )
    frames = prepare_frames(image_set.images, model_path, config)
    stage_cpu = segserve_stage_cpu(frames, config)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="segserve-compare-") as tmp:
        work = Path(tmp)
        frame_dir = work / "frames"
        write_frames(frames, frame_dir)
        starters = server_starters(args, model_dir, config, work, skipped)
        with servers_running(starters, skipped) as running:
            notes = {name: s.notes for name, s in running.items() if s.notes}
            limits, rounds = run_rounds(args, running, frames, frame_dir, model_path, config, work)

    result = {
        "model": args.model,
        "model_repository": str(args.model_repository),
        "cpus": os.cpu_count(),
        "frames": image_set.describe(),
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "rounds": args.rounds,
        "concurrencies": args.concurrency,
        "limit": summarise_limit(limits),
        "limit_rounds": limits,
        "segserve_stage_cpu_ms": stage_cpu,
        "summary": summarise(rounds, args.concurrency),
        "skipped": skipped,
        "notes": notes,
        "points": rounds,
    }
    table, verdicts = report(result)
    result["targets"] = verdicts
    print()
    print(table)
    (args.out_dir / "compare.md").write_text(table)
    (args.out_dir / "compare.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out_dir / 'compare.md'} and {args.out_dir / 'compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
