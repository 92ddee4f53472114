"""Soak: N minutes at saturation with mixed good and bad traffic; RSS over time, errors, latency.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--warmup-minutes W] [--concurrency 12]
        [--model deeplabv3plus_camvid] [--seed 0] [--bad-rate 4] [--stream-fps 3] [--json PATH]

It starts `segserve serve` on the bundled model_repository/ (free loopback ports, through
compare_servers.start_segserve) and for --minutes keeps it saturated (its batch queue never
empty) with --concurrency closed-loop calls split by SHARES, each with a GOOD_TIMEOUT_S deadline:
`unary` Segment calls (AsyncSegserveClient; SRLE, PNG + pixel counts, or SRLE + RAW; each answer's
size and encodings checked), `kserve_image` and `kserve_tensor` KServe ModelInfer calls
(tritonclient.grpc.aio) on `<model>.image` (JPEG in) and `<model>` (the preprocessed FP32 tensor
in); beside them two camera-paced SegmentStreams (stream_load.segserve_stream at --stream-fps, a
new stream every --stream-segment-s), `stream_queue` (QUEUE) and `stream_latest` (LATEST, whose
DROPPED frames are expected), each checked for one answer per frame, in order, and its end; and
--bad-rate bad calls per second (BAD_CASES in a seeded shuffled cycle), each with the statuses it
may get. Frames: CamVid val ($SEGSERVE_CAMVID/val, else ../shared/data/camvid/val, read at run
time) as --size JPEGs, else generated street-like scenes. Every --sample-s it samples the server's
RSS (VmRSS of /proc/<pid>/status, process_resident_memory_bytes of its /metrics), queue depth and
cores. Then it stops the server (SIGINT) and prints benchmarks/soak_report.py's report and verdict:
PASS or FAIL (exit code 1); --json PATH writes it as JSON. Ctrl-C stops the traffic at once (calls
in flight get STOP_GRACE_S, a second Ctrl-C cancels them) and the server; the partial report FAILs,
exit code 130.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import grpc
import grpc.aio
import numpy as np
import tritonclient.grpc.aio as triton
from compare_load import _busy_cpu_s, process_tree_cpu_s
from compare_servers import ROOT, ServerProcess, start_segserve
from prometheus_client.parser import text_string_to_metric_families
from soak_report import BAD_CASES, Answers, format_report, summarise, write_json
from stream_bench import image_folder
from stream_load import SEGMENT, Pace, segserve_stream
from tritonclient.utils import InferenceServerException

from segserve.v1 import segserve_pb2 as pb
from segserve_client import AsyncSegserveClient, SegserveError, bench
from segserve_client.errors import status_code
from segserve_client.types import Segmentation
from segserve_server.model_repository import ModelConfig, parse_config
from segserve_server.pipeline import decode as imaging
from segserve_server.pipeline.preprocess import Preprocessor

__all__ = ["SHARES", "Soak", "main", "parse_args"]

GOOD_TIMEOUT_S = 60.0  # good traffic's deadline: far above any queue wait at saturation
STOP_GRACE_S = 5.0  # after Ctrl-C: how long the calls in flight get before they are cancelled
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process that SIGINT ended
SHARES = {"unary": 2, "kserve_image": 1, "kserve_tensor": 1}  # of --concurrency
UNARY_VARIANTS = ((("srle",), False), (("png",), True), (("srle", "raw"), False))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--minutes", type=float, default=10.0)
    add("--warmup-minutes", type=float, help="default: min(2, 20 %% of --minutes)")
    add("--concurrency", type=int, default=12, help="closed-loop calls in flight")
    add("--model", default="deeplabv3plus_camvid")
    add("--seed", type=int, default=0)
    add("--bad-rate", type=float, default=4.0, help="bad calls per second")
    add("--stream-fps", type=float, default=3.0, help="frames per second of each stream")
    add("--stream-segment-s", type=float, default=30.0, help="a stream's life")
    add("--sample-s", type=float, default=5.0, help="RSS sampling interval")
    add("--rss-target-pct", type=float, default=5.0)
    add("--model-repository", type=Path, default=ROOT / "model_repository")
    add("--images", type=Path, help="default: $SEGSERVE_CAMVID/val or shared")
    add("--size", default="480x360", help="WxH the frames are JPEG-encoded at")
    add("--max-images", type=int, default=32)
    add("--json", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    if args.warmup_minutes is None:
        args.warmup_minutes = min(2.0, 0.2 * args.minutes)
    if not 0 <= args.warmup_minutes < args.minutes or args.concurrency < 1 or args.bad_rate <= 0:
        parser.error("need 0 <= --warmup-minutes < --minutes, --concurrency >= 1, --bad-rate > 0")
    if bench.parse_size(args.size) is None:
        parser.error("--size must be WxH (JPEG frames: the bad traffic edits their headers)")
    return args


def split_concurrency(total: int) -> dict[str, int]:
    """Calls each closed-loop good kind keeps in flight: `total` by SHARES, each >= 1."""
    weight = sum(SHARES.values())
    return {kind: max(1, round(total * share / weight)) for kind, share in SHARES.items()}


def generated_images(count: int, size: tuple[int, int], seed: int) -> list[bytes]:
    """Street-like scenes (sky, buildings, road, cars, sensor noise) as JPEGs (q90)."""
    rng, (w, h), images = np.random.default_rng(seed), size, []
    for _ in range(count):
        scene = np.empty((h, w, 3), np.float32)
        horizon = int(h * rng.uniform(0.35, 0.5))
        scene[:horizon], scene[horizon:] = (200, 170, 130), (90, 90, 95)  # BGR sky, road
        for x in range(0, w, w // 8):
            scene[int(rng.integers(h // 10, horizon)) : horizon, x : x + w // 8] = rng.integers(
                50, 170, 3
            )
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = int(rng.integers(0, w - w // 8)), int(rng.integers(horizon, h - h // 10))
            scene[cy : cy + h // 10, cx : cx + w // 8] = rng.integers(0, 255, 3)
        noisy = np.clip(scene + rng.normal(0, 8, scene.shape), 0, 255).astype(np.uint8)
        images.append(cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return images


def load_frames(args: argparse.Namespace) -> bench.ImageSet:
    folder = image_folder(args.images)
    if folder.is_dir():
        return bench.load_images(folder, args.size, jpeg_quality=90, limit=args.max_images)
    size = bench.parse_size(args.size)
    assert size is not None
    return bench.ImageSet(
        args.size, generated_images(args.max_images, size, args.seed), "generated", 90
    )


def oversized(jpeg: bytes, side: int = 60000) -> bytes:
    """The JPEG with its frame header (SOF0..2) claiming side x side pixels."""
    i = 2
    while i + 9 < len(jpeg):
        marker, length = jpeg[i + 1], int.from_bytes(jpeg[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            return jpeg[: i + 5] + side.to_bytes(2, "big") * 2 + jpeg[i + 9 :]
        i += 2 + length
    raise ValueError("no JPEG frame header")


def kserve_input(name: str, array: np.ndarray, datatype: str) -> Any:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _rpc_status(exc: BaseException) -> str:
    if isinstance(exc, SegserveError):
        return str(exc.code.name)
    if isinstance(exc, grpc.aio.AioRpcError):
        return str(exc.code().name)
    if isinstance(exc, InferenceServerException):
        return (exc.status() or "StatusCode.UNKNOWN").rsplit(".", 1)[-1]
    return f"CLIENT_{type(exc).__name__}"


async def _status_of(call: Awaitable[Any], check: Callable[[Any], bool] = bool) -> str:
    """OK when the call answers and `check` accepts the answer (else WRONG_ANSWER), or the
    status code name it failed with (failures on the client side: CLIENT_<exception>)."""
    try:
        answer = await call
    except Exception as exc:
        return _rpc_status(exc)
    return "OK" if check(answer) else "WRONG_ANSWER"


@dataclass(frozen=True)
class StoppablePace(Pace):
    """A stream's Pace that also ends at its soak's stop_at (which Ctrl-C moves to now)."""

    stop_at: Callable[[], float]

    @property
    def end(self) -> float:
        return min(self.start + self.duration_s, self.stop_at())


class Soak:
    """The load, the sampler and the tally of outcomes, against one running server."""

    def __init__(
        self, args: argparse.Namespace, server: ServerProcess, ports: dict[str, int],
        images: list[bytes], config: ModelConfig,
    ) -> None:  # fmt: skip
        self.args, self.server, self.images, self.model = args, server, images, args.model
        self.kserve_address = f"127.0.0.1:{ports['kserve']}"
        self.metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
        self.size = imaging.image_size(images[0], imaging.sniff_format(images[0]))
        srle = [pb.MASK_ENCODING_SRLE]
        self.stream_requests = [
            pb.SegmentRequest(model=self.model, image=pb.Image(encoded=i), encodings=srle)
            for i in images
        ]
        self.image_inputs = [
            kserve_input("IMAGE_BYTES", np.array([i], dtype=np.object_), "BYTES") for i in images
        ]
        preprocess, min_size = Preprocessor(config), (config.input_width, config.input_height)
        limits = imaging.ImageLimits(40_000_000, 16384)
        tensors = [preprocess(imaging.decode(i, limits, min_size=min_size)) for i in images[:8]]
        self.tensor_inputs = [kserve_input(config.input_name, t[None], "FP32") for t in tensors]
        self.tensor_output, self.labels_shape = config.output_name, (1, *min_size[::-1])
        self.rng = random.Random(args.seed)
        self.began = self.stop_at = 0.0
        self.statuses: dict[str, Counter[str]] = {}
        self.answers: Answers = {}
        self.samples: list[dict[str, Any]] = []
        self.interrupted, self.stopped = False, asyncio.Event()
        self.load: list[asyncio.Future[None]] = []

    def interrupt(self) -> None:
        """Ctrl-C during the load: the first stops the traffic (no new call, frame or sample;
        the calls in flight get STOP_GRACE_S), a second cancels the calls in flight at once."""
        for task in self.load if self.interrupted else ():
            task.cancel()
        if not self.interrupted:
            print("soak: interrupted, stopping (Ctrl-C again: at once)", file=sys.stderr)
            asyncio.get_running_loop().call_later(STOP_GRACE_S, self.interrupt)
        self.interrupted, self.stop_at = True, min(self.stop_at, time.monotonic())
        self.stopped.set()

    def running(self) -> bool:
        return time.monotonic() < self.stop_at

    def record(self, kind: str, status: str, latency_s: float, at: float | None = None) -> None:
        self.statuses.setdefault(kind, Counter())[status] += 1
        if status == "OK" or kind.startswith("bad:"):  # bad calls: how fast they are refused
            done = (time.monotonic() if at is None else at) - self.began
            self.answers.setdefault(kind, []).append((round(done, 3), latency_s))

    async def unary(self, client: AsyncSegserveClient, index: int, step: int) -> None:
        rng, k, size = random.Random(self.args.seed * 7919 + index), index, self.size
        while self.running():
            encodings, counts = rng.choice(UNARY_VARIANTS)
            image, started = self.images[k % len(self.images)], time.monotonic()
            call = client.segment(
                image, self.model, encodings=encodings, include_pixel_counts=counts,
                timeout_s=GOOD_TIMEOUT_S,
            )  # fmt: skip

            def check(r: Segmentation, wanted: tuple[str, ...] = encodings) -> bool:
                return (r.width, r.height) == size and tuple(r.masks) == wanted

            self.record("unary", await _status_of(call, check), time.monotonic() - started)
            k += step

    async def stream(self, policy: str) -> None:
        """Camera-paced streams of one policy, one after another (a new one every segment)."""
        kind, requests = f"stream_{policy}", self.stream_requests
        while (left := self.stop_at - time.monotonic()) > 1.0:
            seconds = min(self.args.stream_segment_s, left)
            pace = StoppablePace(
                time.monotonic(), 0.0, self.args.stream_fps, seconds, lambda: self.stop_at
            )
            try:
                result = await segserve_stream(
                    self.server.address, requests, pace, policy=policy, drain_s=GOOD_TIMEOUT_S
                )
            except Exception:  # a server that Ctrl-C reached too may end the stream mid-write
                if self.interrupted:
                    return
                raise
            for a in result.answers:
                status = a.status
                if status == "ERROR":  # Answer.error is "<code number>: <message>"
                    status = status_code(int(a.error.split(":", 1)[0] or 2)).name
                self.record(kind, status, a.latency_ms / 1e3, at=a.received_s)
            if [a.frame_id for a in result.answers] != result.sent_ids:
                self.record(kind, "STREAM_NOT_ONE_ANSWER_PER_FRAME_IN_ORDER", 0.0)
            if result.end != "OK" or result.drain_timed_out or result.echo_mismatches:
                self.record(kind, f"STREAM_END_{result.end}", 0.0)

    async def kserve(self, client: Any, kind: str, index: int) -> None:
        image, k, (w, h) = kind == "kserve_image", index, self.size
        model = self.model + ".image" if image else self.model
        inputs = self.image_inputs if image else self.tensor_inputs
        output = "MASK_SHAPE" if image else self.tensor_output

        def check(result: Any) -> bool:
            answer = result.as_numpy(output)
            return bool(answer.tolist() == [[h, w]] if image else answer.shape == self.labels_shape)

        while self.running():
            parameters = {"mask_encoding": "png" if k % 3 == 0 else "srle"} if image else None
            started = time.monotonic()
            call = client.infer(
                model, [inputs[k % len(inputs)]], outputs=[triton.InferRequestedOutput(output)],
                client_timeout=GOOD_TIMEOUT_S, parameters=parameters,
            )  # fmt: skip
            self.record(kind, await _status_of(call, check), time.monotonic() - started)
            k += 1

    def bad_calls(
        self, client: AsyncSegserveClient, kserve: Any, channel: grpc.aio.Channel
    ) -> dict[str, Callable[[], Awaitable[list[str]]]]:
        """How to send each of the BAD_CASES; each gives the statuses it got."""
        image, model, image_model = self.images[0], self.model, self.model + ".image"
        truncated, garbage = image[: len(image) // 2], self.rng.randbytes(4096)
        huge, raw_segment = oversized(image), channel.unary_unary(SEGMENT)
        bad_image = kserve_input("IMAGE_BYTES", np.array([truncated], dtype=np.object_), "BYTES")
        small = np.zeros((1, 3, 8, 8), np.float32)
        small_input = kserve_input(self.tensor_inputs[0].name(), small, "FP32")

        async def one(call: Awaitable[Any]) -> list[str]:
            return [await _status_of(call, lambda _: True)]

        def segment(data: bytes, name: str = model, timeout_s: float = 30.0) -> Awaitable[Any]:
            return client.segment(data, name, timeout_s=timeout_s)

        def infer(name: str, tensor: Any, timeout_s: float = 30.0) -> Awaitable[Any]:
            call: Awaitable[Any] = kserve.infer(name, [tensor], client_timeout=timeout_s)
            return call

        async def bad_frames() -> list[str]:
            statuses, frames = [], [(1, truncated), (2, garbage)]
            try:
                async for _, answer in client.stream(frames, model, timeout_s=30.0):
                    statuses.append(_rpc_status(answer) if isinstance(answer, Exception) else "OK")
            except Exception as exc:
                statuses.append(f"STREAM_{_rpc_status(exc)}")
            return statuses + ["STREAM_FRAME_UNANSWERED"] * (2 - len(statuses))

        return {
            "truncated_jpeg": lambda: one(segment(truncated)),
            "garbage_bytes": lambda: one(segment(garbage)),
            "oversized_dims": lambda: one(segment(huge)),
            "unknown_model": lambda: one(segment(image, "no_such_model")),
            "garbage_message": lambda: one(raw_segment(b"\xff\xff\xff\xff" + garbage, timeout=30)),
            "deadline_1ms": lambda: one(segment(image, timeout_s=0.001)),
            "deadline_20ms": lambda: one(segment(image, timeout_s=0.02)),
            "stream_bad_frames": bad_frames,
            "kserve_truncated_image": lambda: one(infer(image_model, bad_image)),
            "kserve_unknown_model": lambda: one(infer("no_such_model", self.image_inputs[0])),
            "kserve_wrong_shape": lambda: one(infer(model, small_input)),
            "kserve_deadline_1ms": lambda: one(infer(image_model, self.image_inputs[0], 0.001)),
        }

    async def bad(self, client: AsyncSegserveClient, kserve: Any) -> None:
        """Open loop: call k is due at k / --bad-rate s, each in its own task."""
        async with grpc.aio.insecure_channel(self.server.address) as channel:
            calls, names = self.bad_calls(client, kserve, channel), list(BAD_CASES)
            tasks: set[asyncio.Task[None]] = set()

            async def send(name: str) -> None:
                started = time.monotonic()
                for status in await calls[name]():
                    self.record(f"bad:{name}", status, time.monotonic() - started)

            k = 0
            while self.running():
                if k % len(names) == 0:
                    self.rng.shuffle(names)
                if len(tasks) < 32:  # a server that stopped answering gets no pile of calls
                    task = asyncio.create_task(send(names[k % len(names)]))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                k += 1
                due = min(self.began + k / self.args.bad_rate, self.stop_at)
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            await asyncio.gather(*tasks)

    def sample(self) -> dict[str, Any]:
        """The server's RSS (both ways), queue depth, in-flight requests and cores used."""
        now, pid, previous = time.monotonic(), self.server.process.pid, self.samples[-1:]
        vmrss = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
        wanted = ("segserve_queue_depth", "segserve_inflight_requests")
        found: dict[str, float] = {}
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=10) as page:
                for family in text_string_to_metric_families(page.read().decode()):
                    for s in family.samples:
                        if s.name == "process_resident_memory_bytes" or (
                            s.name in wanted and s.labels.get("model") == self.model
                        ):
                            found[s.name] = s.value
        except OSError as exc:
            print(f"    /metrics did not answer: {exc}", file=sys.stderr)
        cpu_s, t_s, cores = process_tree_cpu_s(pid), now - self.began, 0.0
        if previous:
            cores = (cpu_s - previous[0]["cpu_s"]) / max(1e-6, t_s - previous[0]["t_s"])
        return {
            "t_s": round(t_s, 2),
            "vmrss_bytes": int(vmrss.group(1)) * 1024 if vmrss else None,
            "metrics_rss_bytes": found.get("process_resident_memory_bytes"),
            "queue_depth": found.get("segserve_queue_depth"),
            "inflight": found.get("segserve_inflight_requests"),
            "server_cores": round(cores, 3),
            "cpu_s": round(cpu_s, 3),
            "machine_busy_s": round(_busy_cpu_s(), 3),
        }

    async def sampler(self) -> None:
        for i in range(1, sys.maxsize):
            self.samples.append(await asyncio.to_thread(self.sample))
            if time.monotonic() >= self.stop_at:
                return
            due = min(self.began + i * self.args.sample_s, self.stop_at)
            with contextlib.suppress(TimeoutError):  # Ctrl-C: the last sample now
                await asyncio.wait_for(self.stopped.wait(), max(0.0, due - time.monotonic()))

    async def run(self) -> dict[str, Any]:
        split, own = split_concurrency(self.args.concurrency), resource.getrusage(0)
        loop, this = asyncio.get_running_loop(), asyncio.current_task()
        async with AsyncSegserveClient(self.server.address) as client:
            kserve = triton.InferenceServerClient(self.kserve_address)
            try:
                self.began = time.monotonic()
                self.stop_at = self.began + self.args.minutes * 60
                work = [self.sampler(), self.bad(client, kserve)]
                work += [self.unary(client, i, split["unary"]) for i in range(split["unary"])]
                work += [self.stream(policy) for policy in ("queue", "latest")]
                for kind in ("kserve_image", "kserve_tensor"):
                    work += [self.kserve(kserve, kind, i) for i in range(split[kind])]
                self.load = [asyncio.ensure_future(w) for w in work]
                loop.add_signal_handler(signal.SIGINT, self.interrupt)
                try:
                    await asyncio.gather(*self.load)
                except asyncio.CancelledError:  # Ctrl-C: what was still in flight, cancelled
                    if not self.interrupted or (this is not None and this.cancelling()):
                        raise
                    await asyncio.wait(self.load, timeout=STOP_GRACE_S)
                finally:
                    loop.remove_signal_handler(signal.SIGINT)  # a Ctrl-C now: KeyboardInterrupt
                load_s, used = time.monotonic() - self.began, resource.getrusage(0)
                timeout_s = STOP_GRACE_S if self.interrupted else GOOD_TIMEOUT_S
                last = client.segment(self.images[0], self.model, timeout_s=timeout_s)
                final, after = await _status_of(last), await asyncio.to_thread(self.sample)
            finally:
                await kserve.close()
        client_s = used.ru_utime + used.ru_stime - own.ru_utime - own.ru_stime
        statuses = {k: dict(v) for k, v in sorted(self.statuses.items())}
        return {
            "split": split, "load_s": round(load_s, 2), "client_cores": round(client_s / load_s, 3),
            "final_call": final, "samples": self.samples, "after_load": after,
            "statuses": statuses, "answers": self.answers, "interrupted": self.interrupted,
        }  # fmt: skip


def server_ports(server: ServerProcess, timeout_s: float = 30.0) -> dict[str, int]:
    """The metrics and KServe ports the server logged (it was started with 0 for both)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = server.log.read_text(errors="replace")
        metrics = re.search(r"metrics on (\d+)\)", text)
        kserve = re.search(r"KServe v2 / Triton protocol on [\d.]+:(\d+)", text)
        if metrics and kserve:
            return {"metrics": int(metrics.group(1)), "kserve": int(kserve.group(1))}
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server logged no metrics or KServe port: see {server.log}")
        time.sleep(0.2)


@contextlib.contextmanager
def sigint_held() -> Iterator[list[int]]:
    """Holds SIGINT (one item a Ctrl-C); after, Ctrl-C raises KeyboardInterrupt again."""
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda *_: held.append(1))
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C raises KeyboardInterrupt even where SIGINT came ignored (a script's `... &` job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _soak(args)
    except KeyboardInterrupt:
        print("soak: interrupted, no report", file=sys.stderr)
        return EXIT_INTERRUPTED


def _soak(args: argparse.Namespace) -> int:
    frames = load_frames(args)
    model_dir = args.model_repository / args.model
    config = parse_config((model_dir / "config.pbtxt").read_text(), model_dir)
    with tempfile.TemporaryDirectory(prefix="segserve-soak-") as tmp:
        with sigint_held() as held:  # a Ctrl-C while the server starts: once it can be stopped
            server = start_segserve(args.model_repository, args.model, Path(tmp))
        try:
            if held:
                raise KeyboardInterrupt
            ports = server_ports(server)
            print(f"soak: {args.minutes:g} min against {server.address} (KServe :{ports['kserve']}, "
                  f"metrics :{ports['metrics']})", flush=True)  # fmt: skip
            measured = asyncio.run(Soak(args, server, ports, frames.images, config).run())
        finally:
            with sigint_held():  # not cut short (SIGINT, at most 30 s to exit, then SIGKILL)
                if "draining (up to" in server.log.read_text(errors="replace"):
                    with contextlib.suppress(subprocess.TimeoutExpired):  # Ctrl-C reached it
                        server.process.wait(30)  # too: a second SIGINT could cut its exit short
                server.stop()
        log = server.log.read_text(errors="replace").splitlines()
    measured["server_exit_code"] = server.process.returncode
    measured["log"] = [line for line in log if " ERROR " in line or "Traceback" in line][:20]
    report = summarise(args, frames.describe(), measured)
    print(format_report(report), flush=True)
    if args.json:
        write_json(report, args.json)
    if measured["interrupted"]:
        return EXIT_INTERRUPTED
    return 0 if report["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
