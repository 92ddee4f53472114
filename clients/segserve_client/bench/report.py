"""The bench's report for people: one text line per measured point (`format_point`) and a PNG
chart of latency against throughput (`plot_latency_throughput`, needs OpenCV).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from segserve_client.bench.images import _cv2
from segserve_client.bench.results import STAGES

__all__ = [
    "format_point",
    "plot_latency_throughput",
]


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
