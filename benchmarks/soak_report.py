"""Figures, checks and the text and JSON report of benchmarks/soak.py.

`summarise` turns what `soak.Soak.run` measured (plus the server's exit code and log) into the
report: RSS over time, its growth from the end of the warm-up (default: 2 minutes or 20 %, the
shorter) to the end (medians of the three samples at each end), saturation, throughput and
p50/p90/p99 per kind, outcomes by status (expected / unexpected: GOOD_KINDS may only be OK,
stream_latest also DROPPED; each of the BAD_CASES the statuses it lists) and the checks: RSS growth
below --rss-target-pct, no unexpected outcome, every good kind answered, the server answering after
the load and exiting 0 on SIGINT, no ERROR or Traceback in its log, and the run not interrupted
(a run stopped by Ctrl-C gets a partial report and FAIL). PASS or FAIL. `format_report` writes it
as text, `write_json` as JSON (every sample included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from segserve_client import bench

__all__ = [
    "BAD_CASES",
    "GOOD_KINDS",
    "Answers",
    "format_report",
    "rss_growth",
    "rss_rows",
    "summarise",
    "write_json",
]

MIB = 1024 * 1024
GOOD_KINDS = ("unary", "stream_queue", "stream_latest", "kserve_image", "kserve_tensor")
BAD_CASES = {  # case -> the statuses it may get
    "truncated_jpeg": {"INVALID_ARGUMENT"},
    "garbage_bytes": {"INVALID_ARGUMENT"},
    "oversized_dims": {"INVALID_ARGUMENT"},  # a JPEG header claiming 60000x60000
    "unknown_model": {"NOT_FOUND"},
    "garbage_message": {"INVALID_ARGUMENT"},  # bytes that are no SegmentRequest
    "deadline_1ms": {"DEADLINE_EXCEEDED"},  # expires on the way
    "deadline_20ms": {"DEADLINE_EXCEEDED", "OK"},  # expires in the queue, or is answered in time
    "stream_bad_frames": {"INVALID_ARGUMENT"},  # a truncated and a garbage frame, one stream
    "kserve_truncated_image": {"INVALID_ARGUMENT"},
    "kserve_unknown_model": {"NOT_FOUND"},
    "kserve_wrong_shape": {"INVALID_ARGUMENT"},
    "kserve_deadline_1ms": {"DEADLINE_EXCEEDED"},
}
Answers = dict[str, list[tuple[float, float]]]  # kind -> (done at s, latency s)


def _allowed(kind: str) -> set[str]:
    if kind.startswith("bad:"):
        return BAD_CASES[kind[4:]]
    return {"OK", "DROPPED"} if kind == "stream_latest" else {"OK"}


def _median(samples: list[dict[str, Any]], key: str) -> float | None:
    values = [s[key] for s in samples if s.get(key) is not None]
    return float(statistics.median(values)) if values else None


def rss_growth(samples: list[dict[str, Any]], warmup_s: float, key: str) -> dict[str, Any]:
    """`key`'s growth from the end of the warm-up to the end: medians of the three samples at
    or before the warm-up's end, and of the last three; the max and the slope after it."""
    warm, end = (
        _median([s for s in samples if s["t_s"] <= warmup_s][-3:], key),
        _median(samples[-3:], key),
    )
    after = [s for s in samples if s["t_s"] >= warmup_s and s.get(key) is not None]
    slope = None
    if len(after) >= 3:
        fit = np.polyfit([s["t_s"] / 60 for s in after], [s[key] / MIB for s in after], 1)
        slope = round(float(fit[0]), 3)
    growth = round((end - warm) / warm * 100, 2) if warm and end else None
    peak = max((s[key] for s in after), default=None)
    return {"warm_bytes": warm, "end_bytes": end, "growth_pct": growth,
            "max_after_warmup_bytes": peak, "slope_mib_per_min": slope}  # fmt: skip


def rss_rows(
    samples: list[dict[str, Any]], answers: Answers, load_s: float
) -> list[dict[str, Any]]:
    """The sample nearest to the start and to each tenth of the run, with the good kinds' OK
    answers per second since the previous row."""
    rows: list[dict[str, Any]] = []
    done = sorted(t for kind in GOOD_KINDS for t, _ in answers.get(kind, []))
    previous = 0.0
    for i in range(11):
        s = min(samples, key=lambda x: abs(x["t_s"] - load_s * i / 10))
        if rows and s["t_s"] <= previous:
            continue
        ok = sum(1 for t in done if previous < t <= s["t_s"])
        rate = round(ok / (s["t_s"] - previous), 2) if s["t_s"] > previous else None
        kept = {k: v for k, v in s.items() if k not in ("cpu_s", "machine_busy_s")}
        rows.append({**kept, "good_ok_per_s": rate})
        previous = s["t_s"]
    return rows


def summarise(
    args: argparse.Namespace, frames: dict[str, Any], measured: dict[str, Any]
) -> dict[str, Any]:
    """The report: settings, RSS, saturation, kinds, outcomes by status, checks, verdict."""
    samples, answers, load_s = measured["samples"], measured.pop("answers"), measured["load_s"]
    warmup_s, statuses = args.warmup_minutes * 60, measured["statuses"]
    kinds: dict[str, Any] = {}
    outcomes: dict[str, list[dict[str, Any]]] = {"expected": [], "unexpected": []}
    order = [k for k in GOOD_KINDS if k in statuses] + sorted(set(statuses) - set(GOOD_KINDS))
    for kind in order:
        ok = statuses[kind].get("OK", 0)
        latency = bench.percentiles_ms([latency for _, latency in answers.get(kind, [])])
        kinds[kind] = {"calls": sum(statuses[kind].values()), "ok": ok,
                       "ok_per_s": round(ok / load_s, 2), "latency_ms": latency}  # fmt: skip
        for status, count in sorted(statuses[kind].items()):
            if status != "OK" or kind.startswith("bad:"):
                bucket = "expected" if status in _allowed(kind) else "unexpected"
                outcomes[bucket].append({"kind": kind, "status": status, "count": count})
    after = [s for s in samples if s["t_s"] >= warmup_s]
    depths = [s["queue_depth"] for s in after if s["queue_depth"] is not None]
    span = after[-1]["t_s"] - after[0]["t_s"] if len(after) > 1 else 0.0
    saturation = {
        "samples_after_warmup": len(after),
        "queue_nonempty_pct": round(100 * sum(d >= 1 for d in depths) / max(1, len(depths)), 1),
        "queue_depth_mean": round(float(np.mean(depths)), 2) if depths else None,
        "server_cores": round((after[-1]["cpu_s"] - after[0]["cpu_s"]) / span, 2) if span else None,
        "client_cores": measured["client_cores"],
    }
    if span:  # what everything else on the machine used meanwhile (a shared machine)
        busy = (after[-1]["machine_busy_s"] - after[0]["machine_busy_s"]) / span
        others = busy - saturation["server_cores"] - saturation["client_cores"]
        saturation["other_cores"] = round(max(0.0, others), 2)
    vmrss, unexpected = rss_growth(samples, warmup_s, "vmrss_bytes"), outcomes["unexpected"]
    growth, n_unexpected = vmrss["growth_pct"], sum(o["count"] for o in unexpected)
    silent = [k for k in GOOD_KINDS if kinds.get(k, {}).get("ok", 0) == 0]
    final, code, log_errors = measured["final_call"], measured["server_exit_code"], measured["log"]
    checks = [
        (f"RSS growth after warm-up < {args.rss_target_pct:g} %", growth,
         growth is not None and growth < args.rss_target_pct),
        ("unexpected outcomes == 0", n_unexpected, n_unexpected == 0),
        ("every good kind answered", silent or "all", not silent),
        ("a Segment call after the load answered", final, final == "OK"),
        ("server exit code on SIGINT == 0", code, code == 0),
        ("no ERROR or Traceback in the server log", len(log_errors), not log_errors),
    ]  # fmt: skip
    if measured.get("interrupted"):  # Ctrl-C: the figures cover only the part that ran
        checks.append(("the run went its full --minutes (not interrupted)",
                       f"interrupted after {load_s:g} s", False))  # fmt: skip
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    return {
        "settings": settings, "cpus": os.cpu_count(), "split": measured["split"],
        "frames": frames, "load_s": load_s, "saturation": saturation,
        "rss": {"vmrss": vmrss, "metrics": rss_growth(samples, warmup_s, "metrics_rss_bytes"),
                "table": rss_rows(samples, answers, load_s), "after_load": measured["after_load"]},
        "kinds": kinds, "outcomes": outcomes, "unexpected_total": n_unexpected,
        "expected_total": sum(o["count"] for o in outcomes["expected"]),
        "server_log_errors": log_errors,
        "checks": [{"check": c, "value": v, "pass": bool(p)} for c, v, p in checks],
        "verdict": "PASS" if all(p for _, _, p in checks) else "FAIL",
        "samples": samples,
    }  # fmt: skip


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_report(r: dict[str, Any]) -> str:
    """The report as text, one section per part, the verdict last."""
    a, f, sat, v, m = (
        r["settings"],
        r["frames"],
        r["saturation"],
        r["rss"]["vmrss"],
        r["rss"]["metrics"],
    )
    split = ", ".join(f"{k} {n}" for k, n in r["split"].items())
    lines = [
        f"soak: {a['model']}, {a['minutes']:g} min (warm-up {a['warmup_minutes']:g} min), "
        f"{r['cpus']} CPUs; closed-loop calls in flight {a['concurrency']} ({split}); 2 streams "
        f"(QUEUE, LATEST) at {a['stream_fps']:g} fps; bad {a['bad_rate']:g}/s; seed {a['seed']}",
        f"frames: {f['count']} from {f['folder']}, {f['size']} JPEG q{f['jpeg_quality']}, "
        f"{f['mean_bytes']} bytes on average",
        "",
        "RSS over time (server process)",
        "   time  VmRSS MiB  /metrics MiB  queue  in flight  server cores  good OK/s",
    ]
    for row in r["rss"]["table"]:
        t = round(row["t_s"])
        lines.append(
            f"  {t // 60:2d}:{t % 60:02d}  {_mib(row['vmrss_bytes']):>9}  "
            f"{_mib(row['metrics_rss_bytes']):>12}  {_num(row['queue_depth']):>5}  "
            f"{_num(row['inflight']):>9}  {row['server_cores']:12.2f}  {_num(row['good_ok_per_s']):>9}"
        )
    lines += [
        f"  after the load: VmRSS {_mib(r['rss']['after_load']['vmrss_bytes'])} MiB",
        "",
        f"RSS growth after warm-up: VmRSS {_mib(v['warm_bytes'])} -> {_mib(v['end_bytes'])} MiB "
        f"({_num(v['growth_pct'])} %), max {_mib(v['max_after_warmup_bytes'])} MiB, slope "
        f"{v['slope_mib_per_min']} MiB/min; /metrics {_mib(m['warm_bytes'])} -> "
        f"{_mib(m['end_bytes'])} MiB ({_num(m['growth_pct'])} %)",
        f"saturation after warm-up: queue non-empty in {sat['queue_nonempty_pct']} % of "
        f"{sat['samples_after_warmup']} samples (mean depth {sat['queue_depth_mean']}); server "
        f"{sat['server_cores']} cores, this client {sat['client_cores']}, everything else on "
        f"the machine {sat.get('other_cores')}",
        "",
        f"throughput and latency ({r['load_s']:.0f} s; good kinds: OK answers and their latency "
        "(streams: capture to answer); bad: every call)",
        f"  {'kind':<28} {'calls':>7} {'OK':>7} {'OK/s':>6} {'p50 ms':>8} {'p90 ms':>8} "
        f"{'p99 ms':>8} {'max ms':>8}",
    ]
    for kind, k in r["kinds"].items():
        lat = k["latency_ms"]
        lines.append(
            f"  {kind:<28} {k['calls']:7d} {k['ok']:7d} {k['ok_per_s']:6.2f} "
            + " ".join(f"{_num(lat[p]):>8}" for p in ("p50", "p90", "p99", "max"))
        )
    lines += ["", "errors by status (bad traffic: every outcome; good: every outcome but OK)"]
    for bucket in ("expected", "unexpected"):
        lines.append(f"  {bucket}: {sum(o['count'] for o in r['outcomes'][bucket])}")
        lines += [
            f"    {o['kind']:<28} {o['status']:<24} {o['count']:7d}" for o in r["outcomes"][bucket]
        ]
    lines += ["", "checks"]
    lines += [
        f"  {'pass' if c['pass'] else 'FAIL'}  {c['check']}: {c['value']}" for c in r["checks"]
    ]
    failed = [c["check"] for c in r["checks"] if not c["pass"]]
    return "\n".join(
        [*lines, "", f"result: {r['verdict']}" + (f" ({'; '.join(failed)})" if failed else "")]
    )


def write_json(report: dict[str, Any], path: Path) -> None:
    """The report (every sample included) as JSON at `path`, its folder made if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
