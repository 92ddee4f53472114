"""segserve-client bench: a gRPC load generator for segserve (and, to compare, Triton).

    segserve-client bench --model roadseg --concurrency 1,8 --rate 20 --mode both \\
        --output bench.json --plot bench.png

Loads: closed loop (N callers, each sending its next image when the previous answer is in) and
open loop (Poisson arrivals at a given rate; latency counts from each arrival's scheduled time,
so a slow server cannot hide its queue). Calls: unary `Segment` or `SegmentStream` frames.
Images: a folder of real images (default: CamVid val frames), as they are and/or resized and
re-encoded as JPEG (default both: `--size original,1920x1080`), prepared and serialised before
the clock starts. Every point is bounded in time (`--duration-s`) and count (`--max-requests`).

Each point reports throughput, p50/p90/p99/max latency, errors by status code and the server's
per-stage times (from the timings in every answer). The load core is target-agnostic: a `Target`
adapter turns an image into a prepared request and a call into a `Reply`; `SegserveTarget`
speaks segserve.v1 and `TritonTarget` (`--protocol triton`) the KServe v2 protocol of a Triton
model taking encoded image bytes (benchmarks/compare.py uses both). Images and the chart need
OpenCV (pip install opencv-python-headless); Triton needs tritonclient[grpc].
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import grpc.aio
import numpy as np

from segserve.v1 import segserve_pb2 as pb
from segserve_client.errors import status_code
from segserve_client.types import ENCODINGS, channel_options

STAGES = ("decode", "preprocess", "queue", "infer", "postprocess", "encode", "total")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
CAMVID_ENV = "SEGSERVE_CAMVID"
CLIENT_OVERLOAD = "CLIENT_OVERLOAD"
"""Status of open-loop arrivals not sent because --max-outstanding calls were already open."""


def default_image_folder() -> Path:
    """CamVid's val frames: $SEGSERVE_CAMVID/val, else ../shared/data/camvid/val from here."""
    root = os.environ.get(CAMVID_ENV)
    return (Path(root) if root else Path.cwd().parent / "shared" / "data" / "camvid") / "val"


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSet:
    """Encoded images, all of one preparation: `size` is "original" or "WxH" (JPEG re-encoded)."""

    size: str
    images: list[bytes]
    folder: str
    jpeg_quality: int | None

    def describe(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "count": len(self.images),
            "mean_bytes": round(float(np.mean([len(i) for i in self.images]))),
            "folder": self.folder,
            "jpeg_quality": self.jpeg_quality,
        }


def _cv2() -> ModuleType:
    try:
        import cv2
    except ImportError as exc:
        raise ImportError(
            "resizing images and drawing charts need OpenCV: pip install opencv-python-headless"
        ) from exc
    return cv2


def parse_size(text: str) -> tuple[int, int] | None:
    """ "original" -> None; "1920x1080" -> (1920, 1080)."""
    if text == "original":
        return None
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image size {text!r} is not 'original' or WIDTHxHEIGHT") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {text!r} must be positive")
    return width, height


def load_images(
    folder: Path, size: str = "original", *, jpeg_quality: int = 90, limit: int = 0
) -> ImageSet:
    """The images of `folder` (sorted by name, at most `limit` if > 0), as they are or resized
    to `size` (WxH, bilinear) and encoded as JPEG at `jpeg_quality`."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit > 0:
        files = files[:limit]
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    target = parse_size(size)
    if target is None:
        return ImageSet("original", [p.read_bytes() for p in files], str(folder), None)
    cv2 = _cv2()
    images = []
    for path in files:
        pixels = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if pixels is None:
            raise ValueError(f"{path} does not decode")
        resized = cv2.resize(pixels, target, interpolation=cv2.INTER_LINEAR)
        ok, data = cv2.imencode(".jpg", resized, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        if not ok:
            raise ValueError(f"{path} does not encode as JPEG")
        images.append(data.tobytes())
    return ImageSet(f"{target[0]}x{target[1]}", images, str(folder), jpeg_quality)


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What the load generator keeps of one answer: server seconds per stage, batch size."""

    stages_s: dict[str, float]
    batch_size: int = 0


class CallFailed(Exception):
    """A call failed with the status named `code` (a gRPC status code name)."""

    def __init__(self, code: str, details: str = "") -> None:
        super().__init__(f"{code}: {details}")
        self.code = code


class Target(abc.ABC):
    """One server under load: prepares requests ahead of time, then calls it."""

    @abc.abstractmethod
    def prepare(self, image: bytes) -> Any:
        """A ready-to-send request for one encoded image (built before the clock starts)."""

    @abc.abstractmethod
    async def call(self, prepared: Any) -> Reply:
        """One unary call; raises CallFailed."""

    def stream(self) -> FrameStream:
        """A new bidirectional stream of frames."""
        raise NotImplementedError(f"{type(self).__name__} has no streaming call")

    @abc.abstractmethod
    async def close(self) -> None:
        """Releases the connection."""


class FrameStream(abc.ABC):
    """One open stream: `send` frames, `receive` answers in order (None at the end)."""

    @abc.abstractmethod
    async def send(self, prepared: Any) -> None: ...

    @abc.abstractmethod
    async def done_sending(self) -> None: ...

    @abc.abstractmethod
    async def receive(self) -> Reply | CallFailed | None:
        """The next answer in frame order (a failed frame as CallFailed), None at the end."""

    @abc.abstractmethod
    def cancel(self) -> None: ...


def _segserve_reply(response: pb.SegmentResponse) -> Reply:
    t = response.timings
    stages = {stage: getattr(t, f"{stage}_us") / 1e6 for stage in STAGES}
    return Reply(stages, t.batch_size)


class SegserveTarget(Target):
    """segserve.v1 over one grpc.aio channel; requests are serialised once per image, so the
    load generator spends as little CPU per call as it can (it shares the machine)."""

    SEGMENT = "/segserve.v1.Segmentation/Segment"
    SEGMENT_STREAM = "/segserve.v1.Segmentation/SegmentStream"

    def __init__(
        self, address: str, model: str, *, encoding: str = "srle", timeout_s: float | None = None
    ) -> None:
        self._channel = grpc.aio.insecure_channel(address, options=channel_options(256 << 20))
        self._model = model
        self._encoding = ENCODINGS[encoding]
        self._timeout_s = timeout_s
        self._segment = self._channel.unary_unary(
            self.SEGMENT, response_deserializer=pb.SegmentResponse.FromString
        )
        self._segment_stream = self._channel.stream_stream(
            self.SEGMENT_STREAM, response_deserializer=pb.SegmentStreamResponse.FromString
        )

    def prepare(self, image: bytes) -> bytes:
        request = pb.SegmentRequest(
            model=self._model, image=pb.Image(encoded=image), encodings=[self._encoding]
        )
        return request.SerializeToString()

    async def call(self, prepared: bytes) -> Reply:
        try:
            response = await self._segment(prepared, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(exc.code().name, exc.details() or "") from exc
        return _segserve_reply(response)

    def stream(self) -> FrameStream:
        return _SegserveStream(self._segment_stream(timeout=self._timeout_s))

    async def close(self) -> None:
        await self._channel.close()


class _SegserveStream(FrameStream):
    def __init__(self, call: Any) -> None:
        self._call = call
        self._frame_id = 0

    async def send(self, prepared: bytes) -> None:
        # SegmentStreamRequest on the wire: field 1 (frame_id, varint), field 2 (the request).
        self._frame_id += 1
        frame = b"\x08" + _varint(self._frame_id) + b"\x12" + _varint(len(prepared)) + prepared
        await self._call.write(frame)

    async def done_sending(self) -> None:
        await self._call.done_writing()

    async def receive(self) -> Reply | CallFailed | None:
        try:
            answer = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(exc.code().name, exc.details() or "") from exc
        if answer is grpc.aio.EOF:
            return None
        if answer.WhichOneof("result") == "error":
            return CallFailed(status_code(answer.error.code).name, answer.error.message)
        return _segserve_reply(answer.response)

    def cancel(self) -> None:
        self._call.cancel()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class TritonTarget(Target):
    """A Triton model with a BYTES input of encoded images, over tritonclient.grpc.aio.

    The model (benchmarks/triton/model.py) answers `mask` (the encoded label map) and
    `timings_us` (INT64: decode, preprocess, infer, postprocess, encode; 0 where unknown).
    """

    TIMED_STAGES = ("decode", "preprocess", "infer", "postprocess", "encode")

    def __init__(
        self,
        address: str,
        model: str,
        *,
        input_name: str = "image",
        timeout_s: float | None = None,
    ) -> None:
        try:
            import tritonclient.grpc.aio as triton
        except ImportError as exc:
            raise ImportError(
                "--protocol triton needs tritonclient: pip install 'tritonclient[grpc]'"
            ) from exc
        self._triton = triton
        self._client = triton.InferenceServerClient(address)
        self._model = model
        self._input_name = input_name
        self._timeout_s = timeout_s
        self._outputs = [
            triton.InferRequestedOutput("mask"),
            triton.InferRequestedOutput("timings_us"),
        ]

    def prepare(self, image: bytes) -> Any:
        tensor = self._triton.InferInput(self._input_name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
        return tensor

    async def call(self, prepared: Any) -> Reply:
        from tritonclient.utils import InferenceServerException

        try:
            result = await self._client.infer(
                self._model,
                [prepared],
                outputs=self._outputs,
                client_timeout=self._timeout_s,
            )
        except InferenceServerException as exc:
            code = (exc.status() or "StatusCode.UNKNOWN").rsplit(".", 1)[-1]
            raise CallFailed(code, exc.message() or "") from exc
        timings = result.as_numpy("timings_us")
        stages: dict[str, float] = {}
        if timings is not None:
            values = timings.reshape(-1)
            stages = {s: float(v) / 1e6 for s, v in zip(self.TIMED_STAGES, values, strict=False)}
            batch = int(values[len(self.TIMED_STAGES)]) if values.size > 5 else 0
            return Reply(stages, batch)
        return Reply(stages)

    async def close(self) -> None:
        await self._client.close()


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def percentiles_ms(latencies_s: Sequence[float]) -> dict[str, float | None]:
    """p50, p90, p99, max and mean in milliseconds (linear interpolation between samples)."""
    if not latencies_s:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    values = np.asarray(latencies_s, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "max": round(float(values.max()), 3),
        "mean": round(float(values.mean()), 3),
    }


@dataclass
class Recorder:
    """Collects the outcome of every call of one measured point."""

    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    stages_s: dict[str, list[float]] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.latencies_s) + sum(self.errors.values())

    def ok(self, latency_s: float, reply: Reply) -> None:
        self.latencies_s.append(latency_s)
        for stage, seconds in reply.stages_s.items():
            self.stages_s.setdefault(stage, []).append(seconds)
        if reply.batch_size:
            self.batch_sizes.append(reply.batch_size)

    def failed(self, code: str) -> None:
        self.errors[code] += 1

    def summary(self, elapsed_s: float) -> dict[str, Any]:
        ok = len(self.latencies_s)
        return {
            "requests": self.calls,
            "ok": ok,
            "errors": dict(sorted(self.errors.items())),
            "elapsed_s": round(elapsed_s, 3),
            "throughput_rps": round(ok / elapsed_s, 3) if elapsed_s > 0 else 0.0,
            "latency_ms": percentiles_ms(self.latencies_s),
            "server_ms": {
                stage: {
                    "mean": round(float(np.mean(values)) * 1e3, 3),
                    "p50": round(float(np.median(values)) * 1e3, 3),
                }
                for stage, values in self.stages_s.items()
            },
            "batch_size_mean": round(float(np.mean(self.batch_sizes)), 3)
            if self.batch_sizes
            else None,
        }


@dataclass(frozen=True)
class Load:
    """One measured point: closed loop at `concurrency` or open loop at `rate_rps`."""

    mode: str  # "unary" or "stream"
    concurrency: int | None = None
    rate_rps: float | None = None

    @property
    def label(self) -> str:
        if self.rate_rps is not None:
            return f"{self.mode} open {self.rate_rps:g}/s"
        return f"{self.mode} closed x{self.concurrency}"


@dataclass(frozen=True)
class Limits:
    """Bounds of every point: measured seconds, calls, open calls (open loop), stream window."""

    duration_s: float = 10.0
    max_requests: int = 100_000
    max_outstanding: int = 256
    stream_window: int = 1
    drain_s: float = 30.0


class _Feed:
    """Hands out prepared requests round robin until the time or count bound is reached."""

    def __init__(self, prepared: Sequence[Any], limits: Limits, offset: int = 0) -> None:
        self._prepared = prepared
        self._next = offset
        self._sent = 0
        self._max = limits.max_requests
        self.deadline = time.perf_counter() + limits.duration_s

    def take(self) -> Any | None:
        if self._sent >= self._max or time.perf_counter() >= self.deadline:
            return None
        self._sent += 1
        self._next += 1
        return self._prepared[self._next % len(self._prepared)]


async def _closed_unary(target: Target, feed: _Feed, concurrency: int, rec: Recorder) -> None:
    async def caller() -> None:
        while (request := feed.take()) is not None:
            started = time.perf_counter()
            try:
                reply = await target.call(request)
            except CallFailed as exc:
                rec.failed(exc.code)
            else:
                rec.ok(time.perf_counter() - started, reply)

    await asyncio.gather(*(caller() for _ in range(concurrency)))


async def _closed_stream(
    target: Target, feed: _Feed, streams: int, window: int, rec: Recorder
) -> None:
    async def one_stream() -> None:
        stream = target.stream()
        sent: deque[float] = deque()
        slots = asyncio.Semaphore(window)

        async def writer() -> None:
            try:
                while True:
                    await slots.acquire()
                    request = feed.take()
                    if request is None:
                        break
                    sent.append(time.perf_counter())
                    await stream.send(request)
            finally:
                await stream.done_sending()

        async def reader() -> None:
            while (answer := await stream.receive()) is not None:
                started = sent.popleft()
                if isinstance(answer, CallFailed):
                    rec.failed(answer.code)
                else:
                    rec.ok(time.perf_counter() - started, answer)
                slots.release()

        try:
            await asyncio.gather(writer(), reader())
        except CallFailed as exc:
            rec.failed(exc.code)  # the stream itself failed; the frames in flight are lost
            for _ in sent:
                rec.failed(exc.code)
        finally:
            stream.cancel()

    await asyncio.gather(*(one_stream() for _ in range(streams)))


async def _open_loop(
    target: Target,
    feed: _Feed,
    load: Load,
    limits: Limits,
    rec: Recorder,
    rng: random.Random,
) -> None:
    """Poisson arrivals; each call's latency counts from its scheduled arrival time."""
    assert load.rate_rps is not None
    open_calls: set[asyncio.Task[None]] = set()
    stream = target.stream() if load.mode == "stream" else None
    sent: deque[float] = deque()

    async def unary(request: Any, scheduled: float) -> None:
        try:
            reply = await target.call(request)
        except CallFailed as exc:
            rec.failed(exc.code)
        else:
            rec.ok(time.perf_counter() - scheduled, reply)

    async def read_answers(frame_stream: FrameStream) -> None:
        with contextlib.suppress(CallFailed):
            while (answer := await frame_stream.receive()) is not None:
                scheduled = sent.popleft()
                if isinstance(answer, CallFailed):
                    rec.failed(answer.code)
                else:
                    rec.ok(time.perf_counter() - scheduled, answer)
        for _ in sent:
            rec.failed("CANCELLED")
        sent.clear()

    reader = asyncio.create_task(read_answers(stream)) if stream is not None else None
    scheduled = time.perf_counter()
    try:
        while True:
            scheduled += rng.expovariate(load.rate_rps)
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            request = feed.take()
            if request is None:
                break
            if len(open_calls) + len(sent) >= limits.max_outstanding:
                rec.failed(CLIENT_OVERLOAD)
                continue
            if stream is not None:
                sent.append(scheduled)
                await stream.send(request)
            else:
                task = asyncio.create_task(unary(request, scheduled))
                open_calls.add(task)
                task.add_done_callback(open_calls.discard)
        if stream is not None:
            await stream.done_sending()
        pending = [*open_calls, *([reader] if reader is not None else [])]
        if pending:
            _, late = await asyncio.wait(pending, timeout=limits.drain_s)
            for task in late:  # still unanswered after drain_s: given up
                task.cancel()
                for _ in range(len(sent) if task is reader else 1):
                    rec.failed("CANCELLED")
    finally:
        if stream is not None:
            stream.cancel()
        if reader is not None:
            reader.cancel()


async def measure(
    target: Target,
    prepared: Sequence[Any],
    load: Load,
    limits: Limits,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Runs one point and returns its summary (with the load that made it)."""
    rec = Recorder()
    feed = _Feed(prepared, limits, offset=seed)
    started = time.perf_counter()
    if load.rate_rps is not None:
        await _open_loop(target, feed, load, limits, rec, random.Random(seed))
    elif load.mode == "stream":
        assert load.concurrency is not None
        await _closed_stream(target, feed, load.concurrency, limits.stream_window, rec)
    else:
        assert load.concurrency is not None
        await _closed_unary(target, feed, load.concurrency, rec)
    elapsed_s = time.perf_counter() - started
    return {"load": {**asdict(load), "label": load.label}, **rec.summary(elapsed_s)}


async def run_bench(
    target: Target,
    image_sets: Sequence[ImageSet],
    loads: Sequence[Load],
    limits: Limits,
    *,
    warmup_s: float = 2.0,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every load on every image set, each after a short warm-up at its own load."""
    points = []
    for image_set in image_sets:
        prepared = [target.prepare(image) for image in image_set.images]
        for index, load in enumerate(loads):
            if warmup_s > 0:
                warm = dataclasses.replace(limits, duration_s=warmup_s)
                await measure(target, prepared, load, warm, seed=index + 1000)
            point = await measure(target, prepared, load, limits, seed=index)
            point["images"] = image_set.describe()
            points.append(point)
            if on_point is not None:
                on_point(point)
    return points


# ----------------------------------------------------------------------------------------------
# Report and chart
# ----------------------------------------------------------------------------------------------


def format_point(point: dict[str, Any]) -> str:
    lat = point["latency_ms"]
    server = point["server_ms"]
    stages = ", ".join(
        f"{stage} {server[stage]['mean']:.1f}" for stage in STAGES[:-1] if stage in server
    )
    errors = point["errors"]
    line = (
        f"{point['images']['size']:>9}  {point['load']['label']:<22} "
        f"{point['throughput_rps']:7.2f}/s  p50 {_ms(lat['p50'])}  p90 {_ms(lat['p90'])}  "
        f"p99 {_ms(lat['p99'])}  max {_ms(lat['max'])}  errors {sum(errors.values())}"
    )
    if errors:
        line += " (" + ", ".join(f"{code} {n}" for code, n in errors.items()) + ")"
    if stages:
        batch = point["batch_size_mean"]
        line += f"\n{'':11}server ms: {stages}" + (f"; batch {batch:.2f}" if batch else "")
    return line


def _ms(value: float | None) -> str:
    return f"{value:7.1f}ms" if value is not None else "      -  "


def plot_latency_throughput(
    points: Sequence[dict[str, Any]], path: Path, title: str = "latency vs throughput"
) -> None:
    """A PNG chart: p50 (solid) and p99 (dashed) latency against throughput, one colour per
    series (image size and call mode, closed and open loop)."""
    cv2 = _cv2()
    series: dict[str, list[tuple[float, float, float]]] = {}
    for point in points:
        lat = point["latency_ms"]
        if lat["p50"] is None:
            continue
        loop = "open" if point["load"]["rate_rps"] is not None else "closed"
        key = f"{point['images']['size']} {point['load']['mode']} {loop}"
        series.setdefault(key, []).append((point["throughput_rps"], lat["p50"], lat["p99"]))
    width, height, margin = 960, 600, (80, 30, 40, 70)  # left, right, top, bottom
    canvas = np.full((height, width, 3), 255, np.uint8)
    x_max = max((x for s in series.values() for x, _, _ in s), default=1.0) * 1.1 or 1.0
    y_max = max((y for s in series.values() for _, _, y in s), default=1.0) * 1.1 or 1.0
    left, right, top, bottom = margin
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(x: float, y: float) -> tuple[int, int]:
        return int(left + x / x_max * plot_w), int(top + plot_h - y / y_max * plot_h)

    font, grey, black = cv2.FONT_HERSHEY_SIMPLEX, (200, 200, 200), (0, 0, 0)
    for i in range(6):
        xv, yv = x_max * i / 5, y_max * i / 5
        cv2.line(canvas, xy(xv, 0), xy(xv, y_max), grey, 1)
        cv2.line(canvas, xy(0, yv), xy(x_max, yv), grey, 1)
        cv2.putText(
            canvas, f"{xv:.1f}", (xy(xv, 0)[0] - 15, top + plot_h + 20), font, 0.45, black, 1
        )
        cv2.putText(canvas, f"{yv:.0f}", (10, xy(0, yv)[1] + 5), font, 0.45, black, 1)
    cv2.rectangle(canvas, (left, top), (left + plot_w, top + plot_h), black, 1)
    cv2.putText(
        canvas,
        "throughput (images/s)",
        (left + plot_w // 2 - 90, height - 20),
        font,
        0.55,
        black,
        1,
    )
    cv2.putText(canvas, "latency ms", (10, top - 12), font, 0.55, black, 1)
    cv2.putText(
        canvas, title + "  (solid p50, dashed p99)", (left + 120, top - 12), font, 0.55, black, 1
    )
    palette = [
        (180, 119, 31),
        (14, 127, 255),
        (44, 160, 44),
        (40, 39, 214),
        (189, 103, 148),
        (75, 86, 140),
        (194, 119, 227),
        (127, 127, 127),
        (34, 189, 188),
        (207, 190, 23),
    ]
    for index, (name, values) in enumerate(sorted(series.items())):
        colour = palette[index % len(palette)]
        values.sort()
        for column, dashed in ((1, False), (2, True)):
            pts = [xy(v[0], v[column]) for v in values]
            for a, b in itertools.pairwise(pts):
                _line(cv2, canvas, a, b, colour, dashed)
            for p in pts:
                cv2.circle(canvas, p, 4, colour, -1)
        y = top + 20 + 22 * index
        cv2.line(canvas, (left + 15, y - 5), (left + 45, y - 5), colour, 2)
        cv2.putText(canvas, name, (left + 52, y), font, 0.5, black, 1)
    if not cv2.imwrite(str(path), canvas):
        raise OSError(f"cannot write {path}")


def _line(
    cv2: ModuleType,
    canvas: np.ndarray,
    a: tuple[int, int],
    b: tuple[int, int],
    colour: tuple[int, int, int],
    dashed: bool,
) -> None:
    if not dashed:
        cv2.line(canvas, a, b, colour, 2, cv2.LINE_AA)
        return
    length = math.dist(a, b)
    steps = max(1, int(length // 8))
    for i in range(0, steps, 2):
        p = (a[0] + (b[0] - a[0]) * i / steps, a[1] + (b[1] - a[1]) * i / steps)
        q = (a[0] + (b[0] - a[0]) * (i + 1) / steps, a[1] + (b[1] - a[1]) * (i + 1) / steps)
        cv2.line(canvas, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), colour, 2, cv2.LINE_AA)


# ----------------------------------------------------------------------------------------------
# Command line (an entry of segserve_client.cli.COMMANDS)
# ----------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8, got {text!r}")
    return values


def _rate_list(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive rates like 10,20.5, got {text!r}")
    return values


def _size_list(text: str) -> list[str]:
    sizes = [v.strip() for v in text.split(",") if v.strip()]
    try:
        for size in sizes:
            parse_size(size)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not sizes:
        raise argparse.ArgumentTypeError("no image size given")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", required=True, help="model name")
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"folder of images (default: CamVid val, ${CAMVID_ENV}/val or ../shared/data/camvid/val)",
    )
    parser.add_argument(
        "--size",
        type=_size_list,
        default=["original", "1920x1080"],
        metavar="SIZES",
        help="comma-separated: 'original' (the files as they are) and/or WxH (resized, JPEG); "
        "default original,1920x1080",
    )
    parser.add_argument("--jpeg-quality", type=int, default=90, metavar="Q")
    parser.add_argument("--max-images", type=int, default=0, metavar="N", help="0: all")
    parser.add_argument(
        "--concurrency", type=_int_list, default=[1, 8], metavar="N,...", help="closed-loop points"
    )
    parser.add_argument(
        "--rate", type=_rate_list, default=[], metavar="R,...", help="open-loop points (requests/s)"
    )
    parser.add_argument("--no-closed", action="store_true", help="open-loop points only")
    parser.add_argument("--mode", choices=["unary", "stream", "both"], default="unary")
    parser.add_argument(
        "--stream-window", type=int, default=1, metavar="N", help="frames in flight per stream"
    )
    parser.add_argument("--duration-s", type=float, default=10.0, help="measured seconds per point")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument(
        "--max-requests", type=int, default=100_000, help="calls per point, at most"
    )
    parser.add_argument(
        "--max-outstanding", type=int, default=256, help="open loop: calls open at once, at most"
    )
    parser.add_argument("--encoding", choices=list(ENCODINGS), default="srle")
    parser.add_argument(
        "--protocol",
        choices=["segserve", "triton"],
        default="segserve",
        help="segserve.v1, or a Triton model taking encoded image bytes (for comparisons)",
    )
    parser.add_argument("--output", "-o", type=Path, metavar="BENCH.json", help="write the report")
    parser.add_argument("--plot", type=Path, metavar="CHART.png", help="write a latency chart")


def loads_of(args: argparse.Namespace) -> list[Load]:
    modes = ["unary", "stream"] if args.mode == "both" else [args.mode]
    loads = []
    for mode in modes:
        if not args.no_closed:
            loads += [Load(mode, concurrency=n) for n in args.concurrency]
        loads += [Load(mode, rate_rps=r) for r in args.rate]
    return loads


def make_target(args: argparse.Namespace) -> Target:
    if args.protocol == "triton":
        return TritonTarget(args.server, args.model, timeout_s=args.timeout)
    return SegserveTarget(args.server, args.model, encoding=args.encoding, timeout_s=args.timeout)


def run(args: argparse.Namespace, client: object = None) -> int:
    """Runs the bench command (the connected sync client of the CLI is not used)."""
    del client
    loads = loads_of(args)
    if not loads:
        raise ValueError("nothing to measure: give --concurrency and/or --rate")
    folder = args.images or default_image_folder()
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist; pass --images DIR")
    image_sets = [
        load_images(folder, size, jpeg_quality=args.jpeg_quality, limit=args.max_images)
        for size in args.size
    ]
    limits = Limits(
        duration_s=args.duration_s,
        max_requests=args.max_requests,
        max_outstanding=args.max_outstanding,
        stream_window=args.stream_window,
    )

    def show(point: dict[str, Any]) -> None:
        if not args.json:
            print(format_point(point), flush=True)

    async def main() -> list[dict[str, Any]]:
        target = make_target(args)
        try:
            return await run_bench(
                target, image_sets, loads, limits, warmup_s=args.warmup_s, on_point=show
            )
        finally:
            await target.close()

    points = asyncio.run(main())
    report = {
        "server": args.server,
        "protocol": args.protocol,
        "model": args.model,
        "encoding": args.encoding,
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "points": points,
    }
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot_latency_throughput(points, args.plot, f"{args.model} on {args.server}")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0
