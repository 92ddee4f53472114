"""What the bench keeps of its calls: one answer (`Reply`), one failure (`CallFailed`), and the
`Recorder` that turns the calls of one measured point into its summary (throughput, latency
percentiles, errors by status code, the server's per-stage times and batch sizes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "CLIENT_OVERLOAD",
    "STAGES",
    "CallFailed",
    "Recorder",
    "Reply",
    "percentiles_ms",
]

STAGES = ("decode", "preprocess", "queue", "infer", "postprocess", "encode", "total")
CLIENT_OVERLOAD = "CLIENT_OVERLOAD"
"""Status of open-loop arrivals not sent because --max-outstanding calls were already open."""


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
