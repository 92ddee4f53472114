"""The GPU device check's benchmark (tools/gpu_check.sh runs it): one table of

  pipeline   the device pipeline's own cost per 1920x1080 JPEG frame on --device: JPEG decode
             (torchvision's batched nvJPEG, one frame at a time too, and nvImageCodec where it is
             installed: measured side by side, to choose), preprocess (resize + normalise), and
             postprocess (argmax/validation, nearest resize back to 1080p, classes present, the
             uint8 map to pinned host memory); target: decode + preprocess + postprocess <= 2 ms
  engine     the FP16 TensorRT engine `segserve build-engine` writes for --model (work copy),
             from the version build-engine chooses: the latest unquantized (FP32) one
  tensorrt   that engine's own throughput at --batch (polygraphy's TrtRunner on device tensors;
             where polygraphy fails to import or run, e.g. no libcudart beside pip's CUDA wheels,
             segserve's own TensorRT binding, and the table says so)
  segserve   end to end over gRPC: `segserve serve` with the engine on the device pipeline, and
             on the CPU host path the same FP32 ONNX version the engine was built from (pinned
             by version_policy in the <model>_cpu copy), loaded by `segserve-client bench`
             (closed loop, 1080p JPEG frames); target: segserve >= 0.9 x the engine's own
             throughput

    python benchmarks/gpu_bench.py [--model deeplabv3plus_camvid] [--device cuda:0] [--batch 8]
        [--frames 32] [--duration-s 10] [--concurrency 16,64] [--stages pipeline,engine,...]
        [--work DIR] [--out results.json]

`--stages pipeline` runs the pipeline stage alone (torch and torchvision, no TensorRT); with
`--device cpu` it runs on the CPU (the same torch code; tests/test_device_pipeline.py runs it
so). A stage that fails (engine build, polygraphy, segserve end to end, any exception) becomes a
note row naming the error, and the stages after it that do not need it still run; the JSON
(`--out`) is rewritten after each stage, and the table and JSON are written however the run
ends (SIGTERM from tools/gpu_check.sh's timeout included; SIGKILL keeps the last JSON).

The frames are made here (smooth colour fields with noise, JPEG quality 90): nothing from a data
set travels to a bare GPU machine. Nothing here has run on a GPU in this repository's CI: its
numbers come from tools/gpu_check.sh runs only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from compare_servers import ServerProcess, start_segserve

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("pipeline", "engine", "tensorrt", "segserve")
PIPELINE_TARGET_MS = 2.0
E2E_TARGET_RATIO = 0.9


class StageError(Exception):
    """A stage could not measure; the message says why (it becomes a note row)."""


class Terminated(BaseException):
    """SIGTERM (a timeout): stop the stages, then print and write what was measured."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


def make_frames(folder: Path, count: int, width: int = 1920, height: int = 1080) -> list[Path]:
    """`count` synthetic JPEG frames in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(12)
    paths = []
    for index in range(count):
        coarse = rng.integers(0, 256, (height // 60, width // 60, 3), dtype=np.uint8)
        smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        noise = rng.integers(-12, 12, smooth.shape, dtype=np.int16)
        frame = np.clip(smooth.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        path = folder / f"frame_{index:03d}.jpg"
        cv2.imwrite(str(path), frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


def measure_pipeline(
    repository: Path, model: str, device: str, frames: list[bytes], batch: int, rounds: int
) -> dict[str, Any]:
    """Per-frame milliseconds of each device-pipeline stage (medians over rounds)."""
    import torch

    from segserve_server.backends.device import DeviceTensors, check_device
    from segserve_server.model_repository import parse_config
    from segserve_server.pipeline.decode import ImageLimits
    from segserve_server.pipeline.device import DevicePipeline

    config = parse_config((repository / model / "config.pbtxt").read_text(), repository / model)
    chosen = check_device(device)
    tensors = DeviceTensors()
    pipeline = DevicePipeline(config, tensors, chosen, ImageLimits(1 << 26, 1 << 14))
    shape = (config.input_height, config.input_width)
    if config.confidence_output is not None:
        fake = torch.zeros((2, *shape), dtype=torch.uint8, device=chosen)
    elif config.outputs_labels:
        fake = torch.zeros(shape, dtype=torch.uint8, device=chosen)
    else:
        fake = torch.zeros((len(config.classes), *shape), dtype=torch.float32, device=chosen)
    fake[..., : shape[0] // 2, :] = 1  # two classes present: the counts have work to do

    def sync() -> None:
        if chosen.type == "cuda":
            torch.cuda.synchronize(chosen)

    decode_s: list[float] = []
    single_s: list[float] = []
    pre_s: list[float] = []
    post_s: list[float] = []
    for round_index in range(rounds + 1):  # round 0 warms up (cuDNN / nvJPEG handles, caches)
        group = [frames[(round_index * batch + i) % len(frames)] for i in range(batch)]
        sync()
        started = time.perf_counter()
        images = pipeline.decode_jpegs(group)
        sync()
        decoded = time.perf_counter()
        pipeline.decode(group[0])
        sync()
        single = time.perf_counter()
        for image in images:
            pipeline.preprocess(image, "RGB")
        sync()
        prepared = time.perf_counter()
        handle = tensors.put(fake)
        for image in images:
            pipeline.postprocess(handle, int(image.shape[1]), int(image.shape[0]))
        done = time.perf_counter()
        if round_index:
            decode_s.append((decoded - started) / batch)
            single_s.append(single - decoded)
            pre_s.append((prepared - single) / batch)
            post_s.append((done - prepared) / batch)
    result: dict[str, Any] = {
        "device": str(chosen),
        "frame": "x".join(map(str, images[0].shape[1::-1])),
        "gpu_decode": pipeline.gpu_decode,
        "batch": batch,
        "decode_ms": _median_ms(decode_s),
        "decode_one_ms": _median_ms(single_s),
        "preprocess_ms": _median_ms(pre_s),
        "postprocess_ms": _median_ms(post_s),
    }
    result["total_ms"] = round(
        result["decode_ms"] + result["preprocess_ms"] + result["postprocess_ms"], 3
    )
    result["nvimgcodec_decode_ms"] = _nvimgcodec_ms(frames[:batch], chosen, rounds)
    return result


def _nvimgcodec_ms(frames: list[bytes], device: Any, rounds: int) -> float | None:
    """nvImageCodec's batched decode per frame, where it is installed (the alternative)."""
    if device.type != "cuda":
        return None
    try:
        import torch
        from nvidia import nvimgcodec
    except ImportError:
        return None
    decoder = nvimgcodec.Decoder()
    samples = []
    for round_index in range(rounds + 1):
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        images = decoder.decode(frames)
        _ = [torch.as_tensor(image, device=device) for image in images]
        torch.cuda.synchronize(device)
        if round_index:
            samples.append((time.perf_counter() - started) / len(frames))
    return _median_ms(samples)


def build_engine(
    repository: Path, model: str, source: int, device: str, timing_cache: Path
) -> dict[str, Any]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "segserve_server.cli", "build-engine", model,
         "--model-repository", str(repository), "--from-version", str(source),
         "--device", device, "--timing-cache", str(timing_cache)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    if done.returncode != 0:
        raise StageError(f"build-engine exit {done.returncode}: {done.stderr.strip()[-600:]}")
    (plan,) = sorted((repository / model).glob("*/model.plan"))
    info = json.loads((plan.parent / "build.json").read_text())
    return {**info, "plan": str(plan), "wall_s": round(time.monotonic() - started, 1)}


def tensorrt_throughput(plan: Path, config_dir: Path, batch: int, seconds: float) -> dict[str, Any]:
    """The engine alone at `batch`, inputs and outputs on the GPU: polygraphy's TrtRunner, else
    (any exception: not installed, libcudart not found, ...) segserve's own TensorRT binding,
    and `fallback` says why."""
    import torch

    from segserve_server.model_repository import parse_config

    config = parse_config((config_dir / "config.pbtxt").read_text(), config_dir)
    shape = (batch, 3, config.input_height, config.input_width)
    inputs = torch.zeros(shape, dtype=torch.float32, device="cuda")
    result: dict[str, Any] = {"batch": batch}
    try:
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        with TrtRunner(EngineFromBytes(plan.read_bytes())) as runner:

            def step() -> None:
                runner.infer({config.input_name: inputs}, copy_outputs_to_host=False)

            runs, elapsed = _loop(step, seconds)
        result["tool"] = "polygraphy TrtRunner"
    except Exception as exc:  # ImportError, OSError (libcudart), polygraphy's own errors
        from segserve_server.backends.tensorrt import TensorRTBackend

        result["fallback"] = f"polygraphy failed ({_why(exc)}): segserve TensorRTBackend instead"
        backend = TensorRTBackend(config, plan)
        try:
            runs, elapsed = _loop(lambda: backend.infer_device(inputs), seconds)
        finally:
            backend.close()
        result["tool"] = "segserve TensorRTBackend"
    result["images_per_s"] = round(runs * batch / elapsed, 1)
    return result


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _loop(step: Any, seconds: float) -> tuple[int, float]:
    import torch

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        runs += 1
    torch.cuda.synchronize()
    return runs, time.perf_counter() - started


def bench_model(address: str, model: str, frames: Path, args: argparse.Namespace) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "segserve_client.cli", "bench", "--server",
         address, "--model", model, "--images", str(frames), "--size", "original",
         "--concurrency", args.concurrency, "--duration-s", str(args.duration_s),
         "--warmup-s", "3", "--json"],
        capture_output=True, text=True, timeout=60 + 2 * args.duration_s * len(points_of(args)),
    )  # fmt: skip
    if done.returncode != 0:
        raise StageError(f"bench of {model} exit {done.returncode}: {done.stderr.strip()[-600:]}")
    points = json.loads(done.stdout)["points"]
    best = max(points, key=lambda p: p["throughput_rps"])
    return {
        "images_per_s": best["throughput_rps"],
        "concurrency": best["load"].get("concurrency"),
        "p50_ms": best["latency_ms"]["p50"],
        "errors": best["errors"],
    }


def points_of(args: argparse.Namespace) -> list[str]:
    return [c for c in args.concurrency.split(",") if c]


def work_repository(source: Path, model: str, work: Path) -> dict[str, Any]:
    """A copy of the model for the engine, and one named <model>_cpu for the CPU host path that
    serves only the version build-engine builds from (the latest unquantized one)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from segserve_server.training.engine import EngineError, source_entry, source_version

    try:
        entry, config = source_entry(source, model)
        version = source_version(entry, config, None)
    except EngineError as exc:
        raise StageError(str(exc)) from exc
    repository = work / "repository"
    shutil.rmtree(repository, ignore_errors=True)
    shutil.copytree(source / model, repository / model)
    cpu = repository / f"{model}_cpu"
    shutil.copytree(source / model, cpu)
    raw = text_format.Parse((cpu / "config.pbtxt").read_text(), mc.ModelConfig())
    raw.name = cpu.name
    raw.version_policy.Clear()
    raw.version_policy.specific.versions.append(version)
    (cpu / "config.pbtxt").write_text(text_format.MessageToString(raw))
    return {"repository": str(repository), "source_version": version}


def table(results: dict[str, Any]) -> str:
    rows = [("measure", "value", "target / note")]
    if pipe := results.get("pipeline"):
        total = pipe["total_ms"]
        verdict = "ok" if total <= PIPELINE_TARGET_MS else "MISSED"
        rows += [
            (f"decode, batched {pipe['batch']} ({pipe['device']})", f"{pipe['decode_ms']} ms",
             "torchvision nvJPEG" if pipe["gpu_decode"] else "host decode"),
            ("decode, one frame", f"{pipe['decode_one_ms']} ms", ""),
            ("decode, nvImageCodec batched", f"{pipe['nvimgcodec_decode_ms']} ms", "alternative"),
            ("preprocess", f"{pipe['preprocess_ms']} ms", ""),
            ("postprocess (to frame size, pinned copy)", f"{pipe['postprocess_ms']} ms", ""),
            (f"pipeline per {pipe['frame']} frame", f"{total} ms",
             f"<= {PIPELINE_TARGET_MS} ms at 1920x1080: {verdict}"),
        ]  # fmt: skip
    if engine := results.get("engine"):
        note = f"{engine['precision']} of v{engine.get('source_version')}"
        rows.append(
            ("engine build", f"{engine['build_s']} s", f"{note}, TensorRT {engine['tensorrt']}")
        )
    trt = results.get("tensorrt")
    if trt:
        rows.append(
            (f"TensorRT alone, batch {trt['batch']}", f"{trt['images_per_s']}/s", trt["tool"])
        )
        if "fallback" in trt:
            rows.append(("TensorRT alone: tool", trt["fallback"], ""))
    version = results.get("work", {}).get("source_version", "?")
    labels = {
        "segserve_gpu": f"segserve GPU end to end (engine of v{version})",
        "segserve_cpu": f"segserve CPU end to end (v{version} ONNX, host path)",
    }
    for name, label in labels.items():
        if point := results.get(name):
            note = f"p50 {point['p50_ms']} ms at concurrency {point['concurrency']}"
            rows.append((label, f"{point['images_per_s']}/s", note))
    if trt and trt["images_per_s"] and (gpu := results.get("segserve_gpu")):
        ratio = gpu["images_per_s"] / trt["images_per_s"]
        verdict = "ok" if ratio >= E2E_TARGET_RATIO else "MISSED"
        rows.append(("segserve / TensorRT", f"{ratio:.2f}", f">= {E2E_TARGET_RATIO}: {verdict}"))
    if (
        (gpu := results.get("segserve_gpu"))
        and (cpu := results.get("segserve_cpu"))
        and cpu["images_per_s"]
    ):
        rows.append(("GPU / CPU path", f"{gpu['images_per_s'] / cpu['images_per_s']:.1f}x", ""))
    for name, text in results.get("notes", {}).items():
        rows.append((name, text, ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--model", default="deeplabv3plus_camvid")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--frame-size", default="1920x1080", help="WxH of the frames made")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--concurrency", default="16,64")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {STAGES}")
    p.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    p.add_argument("--out", type=Path, help="write the results as JSON (after each stage)")
    p.add_argument(
        "--note", action="append", default=[], help="NAME=TEXT: a row of its own in the table"
    )
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    results: dict[str, Any] = {"notes": dict(n.partition("=")[::2] for n in args.note)}
    notes: dict[str, str] = results["notes"]
    running = "frames"

    def save() -> None:
        if args.out:
            temporary = args.out.with_name(f".{args.out.name}.tmp")
            temporary.write_text(json.dumps(results, indent=2) + "\n")
            os.replace(temporary, args.out)

    def stage(name: str, measure: Callable[[], Any]) -> Any:
        """measure() into results[name]; an exception becomes notes[name] (and None)."""
        nonlocal running
        running = name
        try:
            results[name] = measure()
            return results[name]
        except Exception as exc:
            notes[name] = f"FAILED: {_why(exc)}"
            return None
        finally:
            save()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    server: ServerProcess | None = None
    try:
        work = args.work or Path(tempfile.mkdtemp(prefix="segserve-gpu-bench-"))
        frames_dir = work / "frames"
        width, _, height = args.frame_size.partition("x")
        frames = make_frames(frames_dir, args.frames, int(width), int(height))
        if "pipeline" in stages:
            data = [path.read_bytes() for path in frames]
            stage("pipeline", lambda: measure_pipeline(
                args.model_repository, args.model, args.device, data, args.batch, args.rounds
            ))  # fmt: skip
        copy = engine = None
        if {"engine", "tensorrt", "segserve"} & set(stages):
            copy = stage("work", lambda: work_repository(args.model_repository, args.model, work))
        if copy:
            repository = Path(copy["repository"])
            engine = stage("engine", lambda: build_engine(
                repository, args.model, copy["source_version"], args.device, work / "timing.cache"
            ))  # fmt: skip
        if "tensorrt" in stages and not engine:
            notes["tensorrt"] = "not run: no engine"
        elif "tensorrt" in stages:
            stage("tensorrt", lambda: tensorrt_throughput(
                Path(engine["plan"]), repository / args.model, args.batch, args.duration_s
            ))  # fmt: skip
        if "segserve" in stages and copy:
            running = "segserve"
            server = start_segserve(repository, args.model, work)
            address = server.address
            if engine:
                stage("segserve_gpu", lambda: bench_model(address, args.model, frames_dir, args))
            else:
                notes["segserve_gpu"] = "not run: no engine"
            cpu_model = f"{args.model}_cpu"
            stage("segserve_cpu", lambda: bench_model(address, cpu_model, frames_dir, args))
    except Terminated as exc:
        notes["terminated"] = f"{exc} during the {running} stage: the rows above are all"
    except Exception as exc:  # outside a stage: making frames, starting segserve serve
        notes[running] = f"FAILED: {_why(exc)}"
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if server is not None:
            server.stop()
        print(table(results), flush=True)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
