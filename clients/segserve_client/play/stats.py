"""What the stream player counts (pure): per stream, the frames sent and late-sent, the answers
by status (OK / DROPPED / EXPIRED / ERROR, errors by code), capture-to-answer latency and server
time of the OK answers; and the live status line and end-of-run summary made of them.

Capture-to-answer is from a frame's capture time to the client reading its answer, both on the
client's clock; server time is answer_time - receive_time, both on the server's clock. Rates are
per second of the stream's elapsed time, from the start to its last answer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from segserve_client.errors import FrameFailed
from segserve_client.streaming import FrameSkipped, FrameStatus
from segserve_client.types import Segmentation

__all__ = [
    "STATUSES",
    "StreamStats",
    "Totals",
    "format_summary",
    "percentiles_ms",
    "status_line",
    "stream_summary",
    "summarize",
    "totals",
]

STATUSES = tuple(FrameStatus)
"""OK, DROPPED, EXPIRED, ERROR: the columns of the summary."""


def percentiles_ms(values_us: Sequence[int], quantiles: Sequence[int]) -> dict[str, float | None]:
    """{"p50": ms, ..., "max": ms} of microsecond samples (None each when there are none)."""
    names = [f"p{q}" for q in quantiles] + ["max"]
    if not values_us:
        return dict.fromkeys(names)
    values = np.asarray(values_us, dtype=np.float64) / 1e3
    points = [*np.percentile(values, list(quantiles)).tolist(), float(values.max())]
    return {name: round(float(v), 3) for name, v in zip(names, points, strict=True)}


@dataclass
class StreamStats:
    """The counts of one played stream; times are seconds after the start of the play."""

    stream: int
    sent: int = 0
    late: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    capture_to_answer_us: list[int] = field(default_factory=list)
    server_us: list[int] = field(default_factory=list)
    out_of_order: int = 0
    last_answer_s: float = 0.0
    ended_s: float = 0.0
    stream_error: str | None = None

    @property
    def answered(self) -> int:
        return sum(self.answers.values())

    def sent_frame(self, late: bool) -> None:
        self.sent += 1
        self.late += late

    def answer(
        self, frame_id: int, result: Segmentation | FrameFailed | FrameSkipped, at_s: float
    ) -> None:
        """Counts the answer to frame `frame_id` (frames are numbered 0, 1, ... in send order,
        so the n-th answer should be frame n)."""
        if frame_id != self.answered:
            self.out_of_order += 1
        self.answers[result.status] += 1
        self.last_answer_s = max(self.last_answer_s, at_s)
        if isinstance(result, FrameFailed):
            self.errors[result.code.name] += 1
        elif isinstance(result, Segmentation) and result.frame is not None:
            latency = result.frame.capture_to_answer_us
            if latency is not None:
                self.capture_to_answer_us.append(latency)
            server = result.frame.server_us
            if server is not None:
                self.server_us.append(server)


class Totals(NamedTuple):
    """Counts summed over the streams at one moment (for the rates of the live line)."""

    sent: int
    late: int
    ok: int
    dropped: int
    expired: int
    errors: int


def totals(streams: Sequence[StreamStats]) -> Totals:
    def count(status: FrameStatus) -> int:
        return sum(s.answers[status] for s in streams)

    return Totals(
        sent=sum(s.sent for s in streams),
        late=sum(s.late for s in streams),
        ok=count(FrameStatus.OK),
        dropped=count(FrameStatus.DROPPED),
        expired=count(FrameStatus.EXPIRED),
        errors=count(FrameStatus.ERROR),
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def status_line(
    elapsed_s: float,
    now: Totals,
    before: Totals,
    interval_s: float,
    capture_to_answer_us: Sequence[int],
) -> str:
    """The live line: frames sent and answered OK per second over the last interval, the
    capture-to-answer percentiles of the samples given (the player passes each stream's latest
    OK answers), and the counts so far of skipped, failed and late-sent frames."""
    rate_in = (now.sent - before.sent) / interval_s if interval_s > 0 else 0.0
    rate_out = (now.ok - before.ok) / interval_s if interval_s > 0 else 0.0
    latency = percentiles_ms(capture_to_answer_us, (50, 99))
    return (
        f"{elapsed_s:6.1f} s  in {rate_in:5.1f} fps  out {rate_out:5.1f} fps  "
        f"capture-to-answer p50 {_ms(latency['p50'])} p99 {_ms(latency['p99'])} ms  "
        f"ok {now.ok}  dropped {now.dropped}  expired {now.expired}  errors {now.errors}"
        + (f"  late-sent {now.late}" if now.late else "")
    )


def stream_summary(
    stream: int | str,
    parts: Sequence[StreamStats],
    elapsed_s: float,
) -> dict[str, Any]:
    """The summary of one stream (one part) or of all of them (every part, the run's elapsed)."""
    answers = Counter[str]()
    errors = Counter[str]()
    latencies: list[int] = []
    server: list[int] = []
    for part in parts:
        answers.update(part.answers)
        errors.update(part.errors)
        latencies += part.capture_to_answer_us
        server += part.server_us
    sent = sum(p.sent for p in parts)
    answered = sum(answers.values())
    stream_errors = [p.stream_error for p in parts if p.stream_error]
    return {
        "stream": stream,
        "sent": sent,
        "late_sent": sum(p.late for p in parts),
        "answers": {status.value: answers[status] for status in STATUSES},
        "answered": answered,
        "unanswered": sent - answered,
        "accounted": answered == sent and not stream_errors,
        "out_of_order": sum(p.out_of_order for p in parts),
        "errors": dict(sorted(errors.items())),
        "elapsed_s": round(elapsed_s, 3),
        "fps_in": round(sent / elapsed_s, 2) if elapsed_s > 0 else 0.0,
        "fps_out": round(answers[FrameStatus.OK] / elapsed_s, 2) if elapsed_s > 0 else 0.0,
        "capture_to_answer_ms": percentiles_ms(latencies, (50, 90, 99)),
        "server_ms": {
            k: v for k, v in percentiles_ms(server, (50, 99)).items() if k in ("p50", "p99")
        },
        "stream_errors": stream_errors,
    }


def summarize(streams: Sequence[StreamStats]) -> dict[str, Any]:
    """Per stream and in total; each stream's elapsed time runs to its last answer (or its end),
    the total's to the last of them."""
    rows = [stream_summary(s.stream, [s], max(s.last_answer_s, s.ended_s, 1e-9)) for s in streams]
    elapsed = max((row["elapsed_s"] for row in rows), default=0.0)
    return {"streams": rows, "total": stream_summary("total", streams, elapsed)}


def _table(rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in cells
    )


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a text table (one row per stream and a total row) and notes."""
    header: list[object] = [
        "stream",
        "sent",
        "late",
        *STATUSES,
        "answers=sent",
        "fps in",
        "fps out",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "srv p50",
        "srv p99",
    ]
    rows: list[list[object]] = [header]
    parts = summary["streams"] if len(summary["streams"]) > 1 else []
    for row in [*parts, summary["total"]]:
        latency, server = row["capture_to_answer_ms"], row["server_ms"]
        rows.append(
            [
                row["stream"],
                row["sent"],
                row["late_sent"],
                *(row["answers"][status] for status in STATUSES),
                "yes" if row["accounted"] else f"NO ({row['unanswered']} unanswered)",
                f"{row['fps_in']:.1f}",
                f"{row['fps_out']:.1f}",
                *(_ms(latency[k]) for k in ("p50", "p90", "p99", "max")),
                _ms(server["p50"]),
                _ms(server["p99"]),
            ]
        )
    lines = [_table(rows)]
    total = summary["total"]
    if total["errors"]:
        lines.append("errors: " + ", ".join(f"{code} {n}" for code, n in total["errors"].items()))
    if total["out_of_order"]:
        lines.append(f"answers out of frame order: {total['out_of_order']}")
    for row in summary["streams"]:
        for error in row["stream_errors"]:
            lines.append(f"stream {row['stream']} ended early: {error}")
    lines.append(
        "latency: capture to answer (client clock), OK answers; srv: answer - receive time"
        " (server clock)"
    )
    return "\n".join(lines)
