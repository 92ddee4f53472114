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
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import simplejpeg

from segserve_client import bench, masks
from segserve_server.model_repository import ModelConfig, parse_config
from segserve_server.pipeline import decode as imaging
from segserve_server.pipeline import postprocess
from segserve_server.pipeline.preprocess import Preprocessor

ROOT = Path(__file__).resolve().parent.parent
TRITON_VENVS = (ROOT / ".venv-triton",)
LIMITS = imaging.ImageLimits(40_000_000, 16384)


# ----------------------------------------------------------------------------------------------
# (a) the limit, and segserve's own stage costs, in this process
# ----------------------------------------------------------------------------------------------


def _median_ms(fn: Callable[[Any], object], items: list[Any], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        for item in items:
            started = time.perf_counter()
            fn(item)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def _fastest(candidates: dict[str, Callable[[Any], object]], items: list[Any]) -> dict[str, Any]:
    timed: dict[str, float | str] = {}
    for name, fn in candidates.items():
        try:
            fn(items[0])
        except Exception as exc:  # a decoder that cannot read these frames is no candidate
            timed[name] = f"n/a ({type(exc).__name__})"
            continue
        timed[name] = round(_median_ms(fn, items), 3)
    best = min((v, k) for k, v in timed.items() if isinstance(v, float))
    return {"fastest": best[1], "ms": best[0], "candidates_ms": timed}


def _session(model_path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


@dataclass
class Frames:
    """The frames, their model inputs and their model outputs, made once, before any clock."""

    images: list[bytes]
    tensors: list[np.ndarray]
    labels: list[np.ndarray]  # model-size label maps
    size: tuple[int, int]  # (width, height) of the images


def prepare_frames(images: list[bytes], model_path: Path, config: ModelConfig) -> Frames:
    preprocessor = Preprocessor(config)
    min_size = (config.input_width, config.input_height)
    tensors = [
        np.ascontiguousarray(preprocessor(imaging.decode(d, LIMITS, min_size=min_size)))
        for d in images
    ]
    session = _session(model_path, 0)
    labels = [
        session.run([config.output_name], {config.input_name: t[np.newaxis]})[0][0] for t in tensors
    ]
    size = imaging.image_size(images[0], imaging.sniff_format(images[0]))
    return Frames(images, tensors, [postprocess.to_label_map(x, config) for x in labels], size)


def _cv2_reduced(data: bytes, flag: int) -> object:
    return cv2.imdecode(np.frombuffer(data, np.uint8), flag)


def measure_codecs(frames: Frames, config: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fastest decode of the frames (to at least the model's input size) and the fastest
    encode of their full-size label maps, each the median ms per frame of several ways."""
    cv2.setNumThreads(1)
    w, h = config.input_width, config.input_height
    full_w, full_h = frames.size
    fast_w, fast_h = imaging.dct_scaled_size(full_w, full_h, (w, h))
    decoders: dict[str, Callable[[bytes], object]] = {
        "simplejpeg, smallest DCT scale >= model input": lambda d: simplejpeg.decode_jpeg(
            d, min_width=w, min_height=h
        ),
        "simplejpeg, DCT scale 1/2^k >= model input (segserve's)": lambda d: simplejpeg.decode_jpeg(
            d, min_width=fast_w, min_height=fast_h
        ),
        "simplejpeg, same, fast IDCT and upsampling": lambda d: simplejpeg.decode_jpeg(
            d, min_width=fast_w, min_height=fast_h, fastdct=True, fastupsample=True
        ),
        "simplejpeg, full size": lambda d: simplejpeg.decode_jpeg(d),
        "OpenCV, full size": lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR),
    }
    for factor, flag in ((2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4)):
        if full_w // factor >= w and full_h // factor >= h:
            decoders[f"OpenCV, reduced 1/{factor}"] = functools.partial(_cv2_reduced, flag=flag)
    full_maps = [postprocess.resize_labels(lab, full_w, full_h) for lab in frames.labels]
    encoders: dict[str, Callable[[np.ndarray], object]] = {
        "SRLE (zlib 1)": lambda m: masks.encode_srle(m, zlib_level=1),
        "segserve PNG (zlib 1)": lambda m: masks.encode_png(m, zlib_level=1),
        "OpenCV PNG (level 1)": lambda m: cv2.imencode(".png", m, [cv2.IMWRITE_PNG_COMPRESSION, 1]),
    }
    return _fastest(decoders, frames.images), _fastest(encoders, full_maps)


def measure_model(
    model_path: Path, config: ModelConfig, tensors: list[np.ndarray], seconds: float
) -> dict[str, Any]:
    """ONNX Runtime alone on the pre-made tensors: ms per image at each batch size (one session,
    ONNX Runtime's default threads: every core), and with one single-threaded session per core
    running side by side (how segserve runs it on a CPU)."""
    session = _session(model_path, 0)
    per_image_ms: dict[int, float] = {}
    for size in [b for b in (1, 2, 4, 8) if b <= max(1, config.batching.max_batch_size)]:
        batches = [
            np.stack([tensors[(i * size + j) % len(tensors)] for j in range(size)])
            for i in range(max(1, len(tensors) // size))
        ]
        session.run([config.output_name], {config.input_name: batches[0]})
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 3:
            started = time.perf_counter()
            session.run(
                [config.output_name], {config.input_name: batches[len(times) % len(batches)]}
            )
            times.append((time.perf_counter() - started) / size)
        per_image_ms[size] = round(statistics.median(times) * 1e3, 3)
    best_batch = min(per_image_ms, key=lambda b: per_image_ms[b])

    cores = len(os.sched_getaffinity(0))
    lanes = [_session(model_path, 1) for _ in range(cores)]
    counts = [0] * cores

    def lane(index: int, deadline: float) -> None:
        sess, i = lanes[index], index
        while time.perf_counter() < deadline:
            sess.run(
                [config.output_name], {config.input_name: tensors[i % len(tensors)][np.newaxis]}
            )
            counts[index] += 1
            i += cores

    for index in range(cores):  # warm up
        lanes[index].run([config.output_name], {config.input_name: tensors[0][np.newaxis]})
    started = time.perf_counter()
    threads = [threading.Thread(target=lane, args=(i, started + seconds)) for i in range(cores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lanes_ms = (time.perf_counter() - started) / max(1, sum(counts)) * 1e3
    return {
        "ms_per_image_by_batch": per_image_ms,
        "best_batch": best_batch,
        "ms": per_image_ms[best_batch],
        "lanes": cores,
        "lanes_ms_per_image": round(lanes_ms, 3),
    }


def limit_of(
    model: dict[str, Any], decode: dict[str, Any], encode: dict[str, Any]
) -> dict[str, Any]:
    """limit = 1 / (model + fastest decode + fastest encode); also with the lanes' model time."""
    frame_ms = model["ms"] + decode["ms"] + encode["ms"]
    lanes_frame_ms = model["lanes_ms_per_image"] + decode["ms"] + encode["ms"]
    return {
        "model": model,
        "decode": decode,
        "encode": encode,
        "frame_ms": round(frame_ms, 3),
        "throughput_rps": round(1e3 / frame_ms, 3),
        "lanes_frame_ms": round(lanes_frame_ms, 3),
        "lanes_throughput_rps": round(1e3 / lanes_frame_ms, 3),
    }


def segserve_stage_cpu(frames: Frames, config: ModelConfig) -> dict[str, float]:
    """CPU milliseconds per frame (thread time) of segserve's own stages around the model, run
    here on the frames and their real model outputs: decode, preprocess, postprocess, encode."""
    from segserve_server.core.service import MaskEncoding, finish_output

    preprocessor = Preprocessor(config)
    min_size = (config.input_width, config.input_height)
    totals = dict.fromkeys(("decode", "preprocess", "postprocess", "encode"), 0.0)
    repeats = 3
    for _ in range(repeats):
        for data, labels in zip(frames.images, frames.labels, strict=True):
            t0 = time.thread_time()
            decoded = imaging.decode(data, LIMITS, min_size=min_size)
            t1 = time.thread_time()
            preprocessor(decoded)
            t2 = time.thread_time()
            output = finish_output(
                labels,
                config,
                decoded.original_width,
                decoded.original_height,
                (MaskEncoding.SRLE,),
            )
            t3 = time.thread_time()
            # finish_output times its two stages by the wall clock; split its CPU time the same way
            wall = output.timings.postprocess + output.timings.encode
            share = output.timings.postprocess / wall if wall > 0 else 0.5
            totals["decode"] += t1 - t0
            totals["preprocess"] += t2 - t1
            totals["postprocess"] += (t3 - t2) * share
            totals["encode"] += (t3 - t2) * (1 - share)
    count = repeats * len(frames.images)
    return {stage: round(seconds / count * 1e3, 3) for stage, seconds in totals.items()}


# ----------------------------------------------------------------------------------------------
# The servers under test, each in its own process
# ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen[bytes]
    address: str
    protocol: str
    model: str
    log: Path
    notes: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _wait_for_line(
    process: subprocess.Popen[bytes], log: Path, pattern: str, timeout_s: float
) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if match := re.search(pattern, log.read_text(errors="replace")):
            return match
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    text = log.read_text(errors="replace")
    errors = [line for line in text.splitlines() if line.startswith("E") or "rror" in line]
    raise RuntimeError(
        f"server did not start (see {log}): " + "; ".join(errors[-5:] or [text[-500:]])
    )


def start_segserve(repository: Path, model: str, work: Path) -> ServerProcess:
    log = work / "segserve.log"
    env = {**os.environ, "SEGSERVE_KSERVE_PORT": "0"}
    cmd = [
        sys.executable,
        "-m",
        "segserve_server.cli",
        "serve",
        "--model-repository",
        str(repository),
    ]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--log-level", "INFO"]
    process = _spawn(cmd, log, env)
    match = _wait_for_line(process, log, r"listening on 127\.0\.0\.1:(\d+)", 120)
    return ServerProcess("segserve", process, f"127.0.0.1:{match.group(1)}", "segserve", model, log)


def start_naive(model_dir: Path, work: Path) -> ServerProcess:
    log = work / "naive.log"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "naive_server.py"),
        "--model-dir",
        str(model_dir),
    ]
    process = _spawn(cmd, log)
    match = _wait_for_line(process, log, r"listening on 127\.0\.0\.1:(\d+)", 120)
    return ServerProcess(
        "naive", process, f"127.0.0.1:{match.group(1)}", "segserve", model_dir.name, log
    )


TRITON_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "image" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [
  {{ name: "mask" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "timings_us" data_type: TYPE_INT64 dims: [ 6 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ kind: KIND_CPU count: {instances} }} ]
parameters {{ key: "repo_root" value: {{ string_value: "{root}" }} }}
parameters {{ key: "segserve_model_dir" value: {{ string_value: "{model_dir}" }} }}
parameters {{ key: "ort_threads" value: {{ string_value: "{ort_threads}" }} }}
"""

_TRITON_PATHS = """import json, pathlib, sys, sysconfig, pytriton
root = pathlib.Path(pytriton.__file__).parent
print(json.dumps({"server": str(root / "tritonserver"), "libs": str(root.parent / "nvidia_pytriton.libs"),
    "libdir": sysconfig.get_config_var("LIBDIR"), "bin": str(pathlib.Path(sys.executable).parent),
    "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "version": __import__("importlib.metadata").metadata.version("nvidia-pytriton")}))
"""


def start_triton(
    triton_python: Path, model_dir: Path, config: ModelConfig, work: Path, instances: int
) -> ServerProcess:
    """The tritonserver binary of nvidia-pytriton, launched directly (see triton-on-cpu notes)."""
    paths = json.loads(subprocess.check_output([str(triton_python), "-c", _TRITON_PATHS]))
    name = f"{config.name}_triton"
    repo = work / "triton_repository"
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "benchmarks" / "triton" / "model.py", repo / name / "1" / "model.py")
    (repo / name / "config.pbtxt").write_text(
        TRITON_CONFIG.format(
            name=name,
            max_batch=max(1, config.batching.max_batch_size),
            delay_us=config.batching.max_queue_delay_us,
            instances=instances,
            root=ROOT,
            model_dir=model_dir.resolve(),
            ort_threads=0 if instances == 1 else max(1, len(os.sched_getaffinity(0)) // instances),
        )
    )
    server = Path(paths["server"])
    backends = work / "triton_backends"
    if not backends.exists():
        shutil.copytree(server / "backends", backends)
        stub = server / "python_backend_stubs" / paths["python"] / "triton_python_backend_stub"
        shutil.copy(stub, backends / "python" / "triton_python_backend_stub")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(
        p for p in (paths["libdir"], paths["libs"], env.get("LD_LIBRARY_PATH", "")) if p
    )
    env["PATH"] = f"{paths['bin']}:{env['PATH']}"
    port = free_port()
    cmd = [str(server / "bin" / "tritonserver"), "--model-repository", str(repo)]
    cmd += ["--backend-directory", str(backends), "--grpc-address", "127.0.0.1"]
    cmd += ["--grpc-port", str(port), "--allow-http", "false", "--allow-metrics", "false"]
    cmd += ["--log-verbose", "0", "--exit-timeout-secs", "10"]
    cmd += ["--backend-config", "python,stub-timeout-seconds=120"]
    log = work / "triton.log"
    process = _spawn(cmd, log, env)
    _wait_for_line(process, log, r"Started GRPCInferenceService", 180)
    notes = {"nvidia-pytriton": paths["version"], "instances": instances}
    return ServerProcess("triton", process, f"127.0.0.1:{port}", "triton", name, log, notes)


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (from /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
            times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(times.get(p, 0.0) for p in tree)


# ----------------------------------------------------------------------------------------------
# The load, one point at a time, in a segserve-client bench process
# ----------------------------------------------------------------------------------------------


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all processes, /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def bench_point(
    server: ServerProcess,
    frames: Path,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    work: Path,
) -> dict[str, Any]:
    """One closed-loop point from a `segserve-client bench` process, after its own warm-up.

    Adds the server's CPU per answered image (its whole process tree), the load generator's, and
    `other_cores`: how busy the machine was with anything else meanwhile (0 on a quiet machine).
    """

    def run(seconds: float, output: Path) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "segserve_client.cli", "bench", "--server", server.address]
        cmd += ["--protocol", server.protocol, "--model", server.model, "--images", str(frames)]
        cmd += ["--size", "original", "--concurrency", str(concurrency), "--timeout", "60"]
        cmd += ["--duration-s", str(seconds), "--warmup-s", "0", "--output", str(output), "--json"]
        client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_before, busy_before = process_tree_cpu_s(server.process.pid), _busy_cpu_s()
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, cwd=ROOT, timeout=seconds + 300)
        elapsed = time.perf_counter() - started
        server_s = process_tree_cpu_s(server.process.pid) - server_before
        busy_s = _busy_cpu_s() - busy_before
        client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_s = (client_after.ru_utime + client_after.ru_stime) - (
            client_before.ru_utime + client_before.ru_stime
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"bench against {server.name} failed: {done.stderr.decode()[-2000:]}"
            )
        point: dict[str, Any] = json.loads(output.read_text())["points"][0]
        ok = max(1, point["ok"])
        point["server_cpu_ms_per_image"] = round(server_s / ok * 1e3, 2)
        point["client_cpu_ms_per_image"] = round(client_s / ok * 1e3, 2)
        point["other_cores"] = round(max(0.0, busy_s - server_s - client_s) / elapsed, 2)
        return point

    if warmup_s > 0:
        run(warmup_s, work / "warmup.json")
    return run(duration_s, work / f"{server.name}_c{concurrency}.json")


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

TARGETS = {
    "segserve": "(b) segserve",
    "triton": "(c) Triton, Python model",
    "naive": "(d) naive gRPC server",
}


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def summarise_limit(limits: list[dict[str, Any]]) -> dict[str, Any]:
    """The limit from the medians over rounds of model, decode and encode times."""
    model = {
        "ms_per_image_by_batch": {
            b: _median([x["model"]["ms_per_image_by_batch"][b] for x in limits])
            for b in limits[0]["model"]["ms_per_image_by_batch"]
        },
        "lanes": limits[0]["model"]["lanes"],
        "lanes_ms_per_image": _median([x["model"]["lanes_ms_per_image"] for x in limits]),
    }
    model["best_batch"] = min(
        model["ms_per_image_by_batch"], key=model["ms_per_image_by_batch"].get
    )
    model["ms"] = model["ms_per_image_by_batch"][model["best_batch"]]
    codecs = {}
    for kind in ("decode", "encode"):
        fastest = statistics.mode(x[kind]["fastest"] for x in limits)
        codecs[kind] = {
            "fastest": fastest,
            "ms": _median([x[kind]["ms"] for x in limits if x[kind]["fastest"] == fastest]),
            "candidates_ms": limits[0][kind]["candidates_ms"],
        }
    return limit_of(model, codecs["decode"], codecs["encode"])


def summarise(
    rounds: list[dict[str, dict[int, dict[str, Any]]]], concurrencies: list[int]
) -> dict[str, Any]:
    """Medians over rounds of every figure of each target at each concurrency."""
    out: dict[str, Any] = {}
    for name in TARGETS:
        per_c: dict[int, Any] = {}
        for c in concurrencies:
            points = [r[name][c] for r in rounds if name in r and c in r[name]]
            if not points:
                continue
            per_c[c] = {
                "throughput_rps": _median([p["throughput_rps"] for p in points]),
                **{
                    f"{q}_ms": _median([p["latency_ms"][q] for p in points])
                    for q in ("p50", "p90", "p99", "max")
                },
                **{
                    key: _median([p[key] for p in points])
                    for key in ("server_cpu_ms_per_image", "client_cpu_ms_per_image", "other_cores")
                },
                "errors": sum(sum(p["errors"].values()) for p in points),
                "requests": sum(p["requests"] for p in points),
                "server_ms": {
                    stage: _median([p["server_ms"].get(stage, {}).get("mean") for p in points])
                    for stage in bench.STAGES
                },
                "batch_size_mean": _median([p["batch_size_mean"] for p in points]),
            }
        if per_c:
            out[name] = per_c
    return out


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def report(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The Markdown tables (results, then the targets met or not) and the verdicts."""
    limit, summary, cs = result["limit"], result["summary"], result["concurrencies"]
    high, low = max(cs), min(cs)
    model, frames = limit["model"], result["frames"]
    lines = [
        f"{frames['count']} CamVid val frames at {frames['size']} (JPEG q{frames['jpeg_quality']}, "
        f"mean {frames['mean_bytes']:,} bytes), model {result['model']}, {result['cpus']} CPUs; "
        f"closed loop, unary calls, {result['duration_s']:g} s per point and round, "
        f"{result['rounds']} rounds, medians.",
        "",
        f"| target | img/s at c={high} | × limit | p50 / p90 / p99 ms at c={high} "
        f"| p50 ms at c={low} | server CPU ms/img | mean batch | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| (a) limit: ORT alone b{model['best_batch']} {model['ms']:.1f} ms + decode "
        f"{limit['decode']['ms']:.1f} + encode {limit['encode']['ms']:.2f} "
        f"| {limit['throughput_rps']:.1f} | 1.00 | - | {limit['frame_ms']:.1f} | - | - | - |",
    ]
    for name, label in TARGETS.items():
        if name not in summary:
            if name in result["skipped"]:
                lines.append(f"| {label} | not run: {result['skipped'][name]} | | | | | | |")
            continue
        h, lo = summary[name].get(high, {}), summary[name].get(low, {})
        lines.append(
            f"| {label} | {_fmt(h.get('throughput_rps'))} "
            f"| {_fmt(_ratio(h.get('throughput_rps'), limit['throughput_rps']), 2)} "
            f"| {_fmt(h.get('p50_ms'))} / {_fmt(h.get('p90_ms'))} / {_fmt(h.get('p99_ms'))} "
            f"| {_fmt(lo.get('p50_ms'))} | {_fmt(h.get('server_cpu_ms_per_image'))} "
            f"| {_fmt(h.get('batch_size_mean'), 2)} | {h.get('errors', 0) + lo.get('errors', 0)} |"
        )
    seg = summary.get("segserve", {}).get(high, {})
    tri = summary.get("triton", {}).get(high, {})
    cpu = result["segserve_stage_cpu_ms"]
    prepost = round(cpu["preprocess"] + cpu["postprocess"], 3)
    checks: dict[str, tuple[float | None, Callable[[float], bool]]] = {
        "(b) / limit, throughput (>= 0.95)": (
            _ratio(seg.get("throughput_rps"), limit["throughput_rps"]),
            lambda v: v >= 0.95,
        ),
        f"(b) / (c), throughput at c={high} (>= 1.2)": (
            _ratio(seg.get("throughput_rps"), tri.get("throughput_rps")),
            lambda v: v >= 1.2,
        ),
        f"(b) / (c), p99 latency at c={high} (<= 0.7)": (
            _ratio(seg.get("p99_ms"), tri.get("p99_ms")),
            lambda v: v <= 0.7,
        ),
        "segserve preprocess + postprocess, CPU ms per frame (<= 10)": (prepost, lambda v: v <= 10),
    }
    verdicts = {}
    lines += ["", "| target | measured | met |", "| --- | ---: | --- |"]
    for text, (value, test) in checks.items():
        met = None if value is None else bool(test(value))
        verdicts[text] = {"value": value, "met": met}
        lines.append(
            f"| {text} | {_fmt(value, 2)} | {'-' if met is None else 'yes' if met else 'no'} |"
        )
    other = [p.get("other_cores") for c in summary.values() for p in c.values()]
    lines += [
        "",
        f"- segserve CPU per frame around the model (one thread, in-process): decode "
        f"{cpu['decode']:.2f} ms, preprocess {cpu['preprocess']:.2f}, postprocess "
        f"{cpu['postprocess']:.2f}, encode {cpu['encode']:.2f}.",
        "- ORT alone, ms per image by batch size: "
        + ", ".join(f"b{b} {ms:.1f}" for b, ms in model["ms_per_image_by_batch"].items())
        + f"; as {model['lanes']} single-threaded sessions side by side (segserve's CPU lanes): "
        f"{model['lanes_ms_per_image']:.1f}, which makes the limit {limit['lanes_throughput_rps']:.1f} "
        f"img/s and (b) {_fmt(_ratio(seg.get('throughput_rps'), limit['lanes_throughput_rps']), 2)} of it.",
        f"- Fastest decode: {limit['decode']['fastest']}; fastest encode: {limit['encode']['fastest']}.",
    ]
    for name in summary:
        h = summary[name].get(high, {})
        stages = ", ".join(
            f"{s} {v:.1f}" for s, v in h.get("server_ms", {}).items() if v is not None
        )
        lines.append(
            f"- {TARGETS[name]} at c={high}: server ms per request {stages or '-'}; load generator "
            f"{_fmt(h.get('client_cpu_ms_per_image'), 2)} CPU ms per image."
        )
    busiest = max((o for o in other if o is not None), default=0.0)
    lines.append(
        f"- Other load on the machine during the points: at most {busiest:.2f} cores (median per point)."
    )
    return "\n".join(lines) + "\n", verdicts


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


TRITON_MODULES = ("pytriton", "onnxruntime", "numpy", "cv2", "simplejpeg")


def find_triton_python(given: Path | None) -> tuple[Path | None, str]:
    """The first Triton venv whose python imports what benchmarks/triton/model.py needs, or
    None and why not."""
    candidates = [given] if given else [venv / "bin" / "python" for venv in TRITON_VENVS]
    check = (
        f"import importlib.util as u; print([m for m in {TRITON_MODULES!r} if not u.find_spec(m)])"
    )
    reasons = []
    for python in candidates:
        if python is None or not python.exists():
            continue
        found = subprocess.run([str(python), "-c", check], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == "[]":
            return python, ""
        reasons.append(
            f"{python.parent.parent} lacks {found.stdout.strip() or found.stderr.strip()[-200:]} "
            "(pip install opencv-python-headless simplejpeg there)"
        )
    tried = ", ".join(str(c.parent.parent) for c in candidates if c is not None)
    return None, "; ".join(reasons) or f"no Triton venv ({tried}); see --triton-python"


@contextlib.contextmanager
def servers_running(
    starters: dict[str, Callable[[], ServerProcess]], skipped: dict[str, str]
) -> Iterator[dict[str, ServerProcess]]:
    running: dict[str, ServerProcess] = {}
    try:
        for name, start in starters.items():
            try:
                running[name] = start()
            except Exception as exc:
                skipped[name] = f"failed to start: {exc}"
                print(f"{name}: {skipped[name]}", file=sys.stderr)
        yield running
    finally:
        for server in running.values():
            server.stop()


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)

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
    limits: list[dict[str, Any]] = []
    rounds: list[dict[str, dict[int, dict[str, Any]]]] = []
    with tempfile.TemporaryDirectory(prefix="segserve-compare-") as tmp:
        work = Path(tmp)
        frame_dir = work / "frames"
        frame_dir.mkdir()
        suffix = ".jpg" if frames.images[0][:3] == b"\xff\xd8\xff" else ".png"
        for i, data in enumerate(frames.images):
            (frame_dir / f"frame_{i:04d}{suffix}").write_bytes(data)

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

        with servers_running(starters, skipped) as running:
            notes = {name: s.notes for name, s in running.items() if s.notes}
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
                        point = bench_point(
                            server, frame_dir, c, args.duration_s, args.warmup_s, work
                        )
                        measured.setdefault(name, {})[c] = point
                        print(
                            f"    {name:>8} c={c}: "
                            + bench.format_point(point).split("\n")[0].strip(),
                            flush=True,
                        )
                rounds.append(measured)

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
