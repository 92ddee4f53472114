"""(a) The limit, measured in this process: what the model and the fastest codecs allow.

On frames prepared once before any clock (`prepare_frames`), it times ONNX Runtime alone on
pre-made tensors at each batch size and as one single-threaded session per core
(`measure_model`), the fastest of several decoders of the frames and of several encoders of their
full-size label maps (`measure_codecs`), and combines them: limit = 1 / (model + decode + encode)
(`limit_of`). `segserve_stage_cpu` times segserve's own stages around the model (decode,
preprocess, postprocess, encode) on the same frames and their real model outputs. Used by
benchmarks/compare.py once per round.
"""

from __future__ import annotations

import functools
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import simplejpeg

from segserve_client import masks
from segserve_server.model_repository import ModelConfig
from segserve_server.pipeline import decode as imaging
from segserve_server.pipeline import postprocess
from segserve_server.pipeline.preprocess import Preprocessor

LIMITS = imaging.ImageLimits(40_000_000, 16384)


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
    # Imported here, when this runs, and only here: the one line to follow if it moves.
    from segserve_server.core.answers import finish_output
    from segserve_server.pipeline.encode import MaskEncoding

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
