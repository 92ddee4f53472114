"""The `segserve-client stream` command: plays a video or a folder of images to a model as one or
more real-time SegmentStreams, paced like a camera, and reports what became of every frame.

    segserve-client stream clip.mp4 --model roadseg --fps 30 --policy latest --max-age-ms 200 \\
        --streams 4 --duration-s 60 -o stream.json --overlay-video overlay.mp4

An entry of segserve_client.cli.COMMANDS: `add_arguments` and `run`. The frames are read and
encoded before the clock starts (`sources`), sent on the schedule of `pacing` (never early; a
frame the sender could not send on time still goes, counted late-sent), on `--streams` calls at
once, each playing the whole schedule with frame ids 0, 1, ...; the counts are `stats`', the
overlay video `overlay_video`'s. A live status line goes to stderr (4 times a second on a
terminal, once a second otherwise), the summary to stdout (JSON with --json). Exit status 0 when
every frame sent was answered, 1 when a stream ended early or answers are missing, 130 when
interrupted (Ctrl-C stops sending, waits briefly for the answers and still prints the summary).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from segserve_client.aio import AsyncSegserveClient
from segserve_client.errors import SegserveError
from segserve_client.overlay import color_table
from segserve_client.play.overlay_video import write_overlay_video
from segserve_client.play.pacing import Schedule, choose_fps
from segserve_client.play.sources import Source, load_source, opencv
from segserve_client.play.stats import StreamStats, format_summary, status_line, summarize, totals
from segserve_client.security import security_of
from segserve_client.streaming import POLICIES, StreamFrame, now_us
from segserve_client.types import ENCODINGS, Segmentation

__all__ = ["PlayConfig", "PlayResult", "StatusPrinter", "add_arguments", "play", "run"]

START_LEAD_S = 0.05
"""The clock starts this long after the streams are set up, so frame 0 is not already late."""
GRACE_S = 30.0
INTERRUPT_GRACE_S = 2.0
LIVE_SAMPLES = 300
"""The live line's latency percentiles are over each stream's last this many OK answers."""
READY_TIMEOUT_S = 10.0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _level(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be a priority level >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `segserve-client stream` (--server, --timeout and --json are common)."""
    parser.add_argument(
        "source", type=Path, metavar="SOURCE", help="a video file or a folder of images"
    )
    parser.add_argument("--model", "-m", required=True, help="model name")
    parser.add_argument(
        "--model-version", type=int, default=0, metavar="N", help="default: the serving one"
    )
    parser.add_argument(
        "--fps",
        type=_positive_float,
        default=None,
        help="frames per second of each stream (default: the video's own rate, else 30)",
    )
    parser.add_argument(
        "--policy",
        choices=list(POLICIES),
        default="queue",
        help="queue: every frame runs, in turn; latest: a frame superseded by a newer one "
        "before it started is dropped (default: queue)",
    )
    parser.add_argument(
        "--max-age-ms",
        type=_positive_int,
        default=None,
        metavar="N",
        help="frames older than this (since the server read them) when their batch forms expire",
    )
    parser.add_argument(
        "--priority",
        type=_level,
        default=0,
        metavar="P",
        help="priority level of the frames (1: the highest; default 0: the server's stream level)",
    )
    parser.add_argument(
        "--streams", type=_positive_int, default=1, metavar="N", help="concurrent streams"
    )
    parser.add_argument(
        "--duration-s",
        type=_positive_float,
        default=None,
        metavar="S",
        help="play this long, repeating the source if it is shorter (default: the source once)",
    )
    parser.add_argument(
        "--sequence", metavar="PREFIX", help="image folders: only the frames named PREFIX_*"
    )
    parser.add_argument("--encoding", choices=list(ENCODINGS), default="srle", help="masks")
    parser.add_argument(
        "--jpeg-quality", type=int, default=90, metavar="Q", help="videos: frames go as JPEG"
    )
    parser.add_argument(
        "--grace-s",
        type=_non_negative_float,
        default=GRACE_S,
        metavar="S",
        help=f"after the last frame is due, wait this long for answers (default {GRACE_S:g})",
    )
    parser.add_argument(
        "--output", "-o", type=Path, metavar="OUT.json", help="write the summary as JSON"
    )
    parser.add_argument(
        "--overlay-video",
        type=Path,
        metavar="OUT.mp4",
        help="write the first stream's overlays as an MP4 (needs OpenCV); frames with no "
        "segmentation repeat the last overlay",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no live status line")


@dataclass(frozen=True)
class PlayConfig:
    """What each stream sends, and how long the play waits for answers."""

    model: str
    version: int = 0
    encoding: str = "srle"
    streams: int = 1
    policy: str = "queue"
    max_age_ms: int | None = None
    priority: int = 0
    grace_s: float = GRACE_S
    keep_answers: bool = False  # keep the first stream's OK answers (for the overlay video)


@dataclass
class PlayResult:
    streams: list[StreamStats]
    answers: dict[int, Segmentation] = field(default_factory=dict)
    interrupted: bool = False


class StatusPrinter:
    """The live status line: rewritten in place on a terminal, one line per update otherwise."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._tty = out.isatty()
        self._shown = False
        self.interval_s = 0.25 if self._tty else 1.0

    def show(self, line: str) -> None:
        self._out.write(f"\r{line}\x1b[K" if self._tty else line + "\n")
        self._out.flush()
        self._shown = True

    def finish(self) -> None:
        if self._tty and self._shown:
            self._out.write("\n")
            self._out.flush()


async def play(
    client: AsyncSegserveClient,
    source: Source,
    schedule: Schedule,
    config: PlayConfig,
    printer: StatusPrinter | None = None,
) -> PlayResult:
    """Plays `schedule` on `config.streams` SegmentStreams at once; every frame sent is counted
    and so is every answer. Cancelling it (Ctrl-C) stops the senders and ends the play."""
    result = PlayResult([StreamStats(k) for k in range(config.streams)])
    stop = asyncio.Event()
    start = time.monotonic() + START_LEAD_S
    start_us = now_us() + round(START_LEAD_S * 1e6)

    async def frames(stats: StreamStats) -> AsyncIterator[StreamFrame]:
        for index in range(schedule.frames):
            delay = schedule.wait_s(index, time.monotonic() - start)
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            stats.sent_frame(schedule.is_late(index, time.monotonic() - start))
            yield StreamFrame(
                index,
                source.frames[schedule.source_index(index)],
                capture_time_us=schedule.capture_time_us(start_us, index),
            )

    async def one_stream(stats: StreamStats) -> None:
        keep = result.answers if config.keep_answers and stats.stream == 0 else None
        answers = client.stream(
            frames(stats),
            config.model,
            version=config.version,
            encodings=config.encoding,
            policy=config.policy,
            max_age_ms=config.max_age_ms,
            priority=config.priority,
        )
        try:
            async for frame_id, answer in answers:
                stats.answer(frame_id, answer, time.monotonic() - start)
                if keep is not None and isinstance(answer, Segmentation):
                    keep[frame_id] = answer
        except SegserveError as exc:
            stats.stream_error = str(exc)
        except Exception as exc:  # a failure here must end this stream, not hide in a task
            stats.stream_error = f"{type(exc).__name__}: {exc}"
        finally:
            stats.ended_s = time.monotonic() - start

    async def report(printer: StatusPrinter) -> None:
        before, then = totals(result.streams), time.monotonic()
        while True:
            await asyncio.sleep(printer.interval_s)
            now = time.monotonic()
            current = totals(result.streams)
            recent = [x for s in result.streams for x in s.capture_to_answer_us[-LIVE_SAMPLES:]]
            printer.show(status_line(now - start, current, before, now - then, recent))
            before, then = current, now

    tasks = [asyncio.create_task(one_stream(stats)) for stats in result.streams]
    reporter = asyncio.create_task(report(printer)) if printer is not None else None
    grace_s = config.grace_s
    try:
        try:
            await asyncio.wait(tasks, timeout=START_LEAD_S + schedule.length_s + grace_s)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            result.interrupted = True
            stop.set()
            grace_s = INTERRUPT_GRACE_S
            await asyncio.wait(tasks, timeout=grace_s)
        for task, stats in zip(tasks, result.streams, strict=True):
            if not task.done():
                when = "the interrupt" if result.interrupted else "the last frame was due"
                stats.stream_error = (
                    f"CANCELLED: {stats.sent - stats.answered} answers still missing "
                    f"{grace_s:g} s after {when}"
                )
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        stop.set()
        if reporter is not None:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
        if printer is not None:
            printer.finish()
    return result


def _report(
    args: argparse.Namespace, source: Source, schedule: Schedule, result: PlayResult
) -> dict[str, Any]:
    return {
        "config": {
            "server": args.server,
            "model": args.model,
            "model_version": args.model_version,
            "source": source.describe(),
            "fps": round(schedule.fps, 3),
            "frames_per_stream": schedule.frames,
            "duration_s": args.duration_s,
            "streams": args.streams,
            "policy": args.policy,
            "max_age_ms": args.max_age_ms,
            "priority": args.priority,
            "encoding": args.encoding,
        },
        "interrupted": result.interrupted,
        **summarize(result.streams),
    }


def run(args: argparse.Namespace, client: object = None) -> int:
    """Runs the stream command (the connected sync client of the CLI is not used: the streams
    run on an asyncio client of their own)."""
    del client
    try:
        source = load_source(
            args.source,
            sequence=args.sequence,
            fps=args.fps,
            duration_s=args.duration_s,
            jpeg_quality=args.jpeg_quality,
        )
    except FileNotFoundError as exc:
        from segserve_client.cli import UsageError  # the CLI imports this module

        raise UsageError(str(exc)) from None
    fps = choose_fps(args.fps, source.native_fps)
    schedule = Schedule.create(fps, len(source.frames), args.duration_s)
    overlay_video: Path | None = args.overlay_video
    if overlay_video is not None:
        opencv()  # no OpenCV: fail before playing
    config = PlayConfig(
        model=args.model,
        version=args.model_version,
        encoding=args.encoding,
        streams=args.streams,
        policy=args.policy,
        max_age_ms=args.max_age_ms,
        priority=args.priority,
        grace_s=args.grace_s,
        keep_answers=overlay_video is not None,
    )
    printer = None if args.quiet else StatusPrinter(sys.stderr)
    tls, token = security_of(args)

    async def main() -> tuple[PlayResult, list[tuple[int, int, int]]]:
        async with AsyncSegserveClient(
            args.server, timeout_s=args.timeout, tls=tls, token=token
        ) as client:
            await client.wait_until_ready(args.timeout or READY_TIMEOUT_S, model=args.model)
            palette = []
            if overlay_video is not None:
                palette = (await client.get_model(args.model, args.model_version)).palette
            return await play(client, source, schedule, config, printer), palette

    result, palette = asyncio.run(main())
    report = _report(args, source, schedule, result)
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_summary(report))
    if overlay_video is not None:
        sent = [source.frames[schedule.source_index(i)] for i in range(result.streams[0].sent)]
        if sent:
            colors = color_table(palette)
            write_overlay_video(overlay_video, sent, result.answers, schedule.fps, colors)
    if result.interrupted:
        return 130
    total = report["total"]
    if not total["accounted"]:
        print(
            f"error: {total['unanswered']} of {total['sent']} frames sent got no answer"
            + "".join(f"; {e}" for e in total["stream_errors"]),
            file=sys.stderr,
        )
        return 1
    return 0
