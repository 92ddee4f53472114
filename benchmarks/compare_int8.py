"""FP32 against INT8 (and FP32 with test-time flip averaging) through the service, side by side.

    .venv/bin/python benchmarks/compare_int8.py --repository DIR \\
        [--models deeplabv3plus_camvid,unet_camvid] [--concurrency 1,4] [--rounds 3] \\
        [--duration-s 10] [--flip] [--eval ../shared/data/camvid/val] [--out-dir benchmarks/results]

DIR holds each model with its FP32 version and an INT8 version written by `segserve quantize`
(the highest version with a quantization.json; FP32 is its source version). For each variant
(fp32, int8, and with --flip fp32+flip, whose model.flip.onnx `segserve flip-average` writes
into a scratch copy) a scratch repository serves that one version of every model as version 1,
each variant from its own `segserve serve` process; all of them start first and stay up (idle
servers take no CPU: ONNX Runtime's threads do not spin). Each round then runs, per model and
concurrency, one closed-loop `segserve-client bench` point per variant, in A/B/A/B order
(reversed every other round), on the same CamVid val frames (480x360 PNG as they are), so
load from other work on a shared machine falls on both sides alike. The figures are medians
over rounds, and the ratios are medians of the per-round ratios of neighbouring points.
--eval also scores every variant on that labelled folder with `segserve eval --offline`'s code
(mIoU). Writes int8.md and int8.json to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from compare_load import bench_point
from compare_servers import ROOT, ServerProcess, start_segserve

from segserve_client import bench
from segserve_server.training.repository import QUANTIZATION_REPORT

FLIP_PARAMETER = 'parameters { key: "segserve.flip_average" value: { string_value: "true" } }\n'


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--models", default="deeplabv3plus_camvid,unet_camvid")
    parser.add_argument("--images", type=Path, default=None, help="default: CamVid val")
    parser.add_argument("--max-images", type=int, default=32)
    parser.add_argument("--concurrency", type=bench._int_list, default=[1, 4])
    parser.add_argument("--duration-s", type=float, default=10.0, help="per point and round")
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flip", action="store_true", help="also fp32 with flip averaging")
    parser.add_argument("--eval", type=Path, help="labelled folder to score every variant on")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    return parser.parse_args(argv)


def versions_of(model_dir: Path) -> tuple[int, int, dict[str, Any]]:
    """(fp32 version, int8 version, the INT8 version's quantization.json)."""
    quantized = sorted(
        int(p.parent.name)
        for p in model_dir.glob(f"*/{QUANTIZATION_REPORT}")
        if p.parent.name.isdigit()
    )
    if not quantized:
        raise SystemExit(f"{model_dir} has no INT8 version (run segserve quantize first)")
    report = json.loads((model_dir / str(quantized[-1]) / QUANTIZATION_REPORT).read_text())
    return int(report["source_version"]), quantized[-1], report


def scratch_repository(
    source: Path, models: list[str], chosen: dict[str, int], root: Path, flip: bool
) -> Path:
    """`root` with each model's config, labels and its chosen version linked as version 1."""
    root.mkdir(parents=True)
    for model in models:
        src, dst = source / model, root / model
        dst.mkdir()
        config = (src / "config.pbtxt").read_text()
        (dst / "config.pbtxt").write_text(config + ("\n" + FLIP_PARAMETER if flip else ""))
        for extra in src.glob("*.txt"):
            shutil.copy(extra, dst / extra.name)
        (dst / "1").mkdir()
        for item in (src / str(chosen[model])).iterdir():
            (dst / "1" / item.name).symlink_to(item.resolve())
    if flip:
        from segserve_server.training.flip import write_flip_variants

        for model in models:
            (root / model / "1" / "model.flip.onnx").unlink(missing_ok=True)
            write_flip_variants(root, model, [1])
    return root


def evaluate(repositories: dict[str, Path], models: list[str], folder: Path) -> dict[str, Any]:
    from segserve_server.training.evaluate import evaluate_offline, list_samples, resolve_dataset

    images, labels = resolve_dataset(folder)
    samples = list_samples(images, labels)
    out: dict[str, Any] = {}
    for model in models:
        for variant, repository in repositories.items():
            result = evaluate_offline(samples, model, repository)
            scores = result.to_json(images, labels)
            out.setdefault(model, {})[variant] = {
                "miou": scores.get("miou"),
                "pixel_accuracy": scores.get("pixel_accuracy"),
                "frames": result.frames,
                "seconds": round(result.seconds, 1),
            }
            print(f"  eval {model} {variant}: mIoU {scores.get('miou')}", flush=True)
    return out


def run_rounds(
    args: argparse.Namespace,
    servers: dict[str, ServerProcess],
    models: list[str],
    frames: Path,
    work: Path,
) -> list[dict[str, Any]]:
    points: list[dict[str, Any]] = []
    variants = list(servers)
    for index in range(args.rounds):
        order = variants if index % 2 == 0 else variants[::-1]
        for model in models:
            for c in args.concurrency:
                for variant in order:
                    server = servers[variant]
                    server.model = model
                    point = bench_point(server, frames, c, args.duration_s, args.warmup_s, work)
                    points.append(
                        {"round": index, "model": model, "concurrency": c, "variant": variant}
                        | point
                    )
                    print(
                        f"round {index + 1} {model} c={c} {variant:>9}: "
                        f"{point['throughput_rps']:.2f} img/s, p50 "
                        f"{point['latency_ms']['p50']:.1f} ms, other cores "
                        f"{point['other_cores']}",
                        flush=True,
                    )
    return points


def summarise(points: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    keys = sorted({(p["model"], p["concurrency"]) for p in points})
    for model, c in keys:
        mine = [p for p in points if p["model"] == model and p["concurrency"] == c]
        entry: dict[str, Any] = {}
        for variant in variants:
            vs = [p for p in mine if p["variant"] == variant]
            entry[variant] = {
                "throughput_rps": round(statistics.median(p["throughput_rps"] for p in vs), 2),
                "p50_ms": round(statistics.median(p["latency_ms"]["p50"] for p in vs), 1),
                "server_cpu_ms_per_image": round(
                    statistics.median(p["server_cpu_ms_per_image"] for p in vs), 1
                ),
                "other_cores": round(statistics.median(p["other_cores"] for p in vs), 2),
                "errors": sum(sum(p["errors"].values()) for p in vs),
            }
        for variant in variants[1:]:
            ratios = []
            for r in sorted({p["round"] for p in mine}):
                base = next(p for p in mine if p["round"] == r and p["variant"] == variants[0])
                other = next(p for p in mine if p["round"] == r and p["variant"] == variant)
                ratios.append(other["throughput_rps"] / base["throughput_rps"])
            entry[variant]["ratio_to_fp32"] = round(statistics.median(ratios), 3)
            entry[variant]["ratios_per_round"] = [round(x, 3) for x in ratios]
        out.setdefault(model, {})[c] = entry
    return out


def report(result: dict[str, Any]) -> str:
    variants = result["variants"]
    lines = [
        f"# FP32 vs INT8 through the service ({result['date']})",
        "",
        f"{result['cpus']} CPUs, CamVid val frames ({result['frames']}), closed loop, "
        f"{result['duration_s']:g} s per point after {result['warmup_s']:g} s warm-up, "
        f"{result['rounds']} rounds interleaved A/B/A/B (order reversed every other round); "
        "medians over rounds; ratio: median of the per-round ratios to fp32.",
        "",
        "| model | concurrency | variant | img/s | ratio | p50 ms | server CPU ms/img | other cores |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model, per_c in result["summary"].items():
        for c, entry in per_c.items():
            for variant in variants:
                e = entry[variant]
                ratio = f"{e['ratio_to_fp32']:.2f}x" if "ratio_to_fp32" in e else "1"
                lines.append(
                    f"| {model} | {c} | {variant} | {e['throughput_rps']:.2f} | {ratio} | "
                    f"{e['p50_ms']:.1f} | {e['server_cpu_ms_per_image']:.1f} | "
                    f"{e['other_cores']:.2f} |"
                )
    if result.get("eval"):
        lines += [
            "",
            "| model | variant | val mIoU | pixel accuracy |",
            "| --- | --- | ---: | ---: |",
        ]
        for model, per_variant in result["eval"].items():
            for variant, e in per_variant.items():
                lines.append(
                    f"| {model} | {variant} | {100 * e['miou']:.2f} % | "
                    f"{100 * e['pixel_accuracy']:.2f} % |"
                )
    lines += ["", "INT8 versions: " + "; ".join(
        f"{m}: version {q['version']} from {q['source_version']}, {q['calibration_method']}, "
        f"{q['calibration_frames']} frames, {q['size_bytes'] / 1e6:.1f} MB"
        for m, q in result["quantization"].items()
    ), ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = args.models.split(",")
    chosen: dict[str, dict[str, int]] = {"fp32": {}, "int8": {}}
    quantization: dict[str, Any] = {}
    for model in models:
        fp32, int8, info = versions_of(args.repository / model)
        chosen["fp32"][model], chosen["int8"][model] = fp32, int8
        quantization[model] = info
    folder = args.images or bench.default_image_folder()
    with tempfile.TemporaryDirectory(prefix="segserve-int8-") as tmp:
        work = Path(tmp)
        repositories = {
            variant: scratch_repository(args.repository, models, versions, work / variant, False)
            for variant, versions in chosen.items()
        }
        if args.flip:
            repositories["fp32+flip"] = scratch_repository(
                args.repository, models, chosen["fp32"], work / "flip", True
            )
        scores = evaluate(repositories, models, args.eval) if args.eval else {}
        frames = work / "frames"
        frames.mkdir()
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
        for path in files[: args.max_images]:
            (frames / path.name).symlink_to(path.resolve())
        servers: dict[str, ServerProcess] = {}
        try:
            for variant, repository in repositories.items():
                logs = work / f"logs-{variant}"
                logs.mkdir()
                servers[variant] = start_segserve(repository, models[0], logs)
            points = run_rounds(args, servers, models, frames, work)
        finally:
            for server in servers.values():
                server.stop()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "frames": f"{min(len(files), args.max_images)} PNG 480x360 from {folder.name}",
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "rounds": args.rounds,
        "variants": list(repositories),
        "quantization": quantization,
        "eval": scores,
        "summary": summarise(points, list(repositories)),
        "points": points,
    }
    text = report(result)
    print()
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "int8.md").write_text(text)
    (args.out_dir / "int8.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out_dir / 'int8.md'} and {args.out_dir / 'int8.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
