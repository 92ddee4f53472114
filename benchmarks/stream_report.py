"""Figures, targets and the Markdown report of benchmarks/stream_bench.py.

`summarise_point` turns the streams of one point into its figures: frames offered and sent
(and late-sent), answers by status, OK answers per second within the window, capture-to-answer
percentiles of OK answers, and the accounting check (every stream: as many answers as frames
sent, every frame_id answered exactly once, in the order sent, the capture time echoed, the
stream ended OK). `summarise_bulk` does the same for the bulk-queue scenario, with the stream
frames' queue wait against their batch's duration. `targets` and `markdown` make the verdicts
and the report (one table of points, then the bulk scenario and the targets as lists).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from stream_load import BulkCall, StreamResult

STATUSES = ("OK", "DROPPED", "EXPIRED", "ERROR")
LABELS = {
    "queue": "segserve QUEUE",
    "latest": "segserve LATEST",
    "latest_max_age": "segserve LATEST + max age",
    "triton": "Triton ModelStreamInfer",
}
LATEST_P99_FACTOR = 2.5
BULK_RATIO_TARGET = 1.1


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def accounting(result: StreamResult) -> list[str]:
    """What is wrong with one stream's answers (empty: exact)."""
    problems: list[str] = []
    ids = [a.frame_id for a in result.answers]
    if len(ids) != len(result.sent_ids):
        problems.append(f"{len(ids)} answers to {len(result.sent_ids)} frames")
    known = [i for i in ids if i is not None]
    if len(set(known)) != len(known):
        problems.append(f"{len(known) - len(set(known))} frame_ids answered more than once")
    missing = set(result.sent_ids) - set(known)
    if missing and len(known) == len(ids):
        problems.append(f"{len(missing)} frames never answered (first {min(missing)})")
    unknown = set(known) - set(result.sent_ids)
    if unknown:
        problems.append(f"{len(unknown)} answers for frame_ids never sent")
    if known != [i for i in result.sent_ids if i in set(known)]:
        problems.append("answers out of frame order")
    if result.echo_mismatches:
        problems.append(f"{result.echo_mismatches} answers with a wrong capture_time_us")
    if result.drain_timed_out:
        problems.append("not every answer came before the drain timeout")
    if result.end != "OK":
        problems.append(f"stream ended {result.end} {result.end_details[:120]}".strip())
    return problems


def summarise_point(
    results: list[StreamResult], *, offered: int, duration_s: float, start_s: float
) -> dict[str, Any]:
    """The figures of one point, over all its streams."""
    answers = [a for r in results for a in r.answers]
    ok = [a for a in answers if a.status == "OK"]
    latencies = [a.latency_ms for a in ok]
    by_status = {s: sum(1 for a in answers if a.status == s) for s in STATUSES}
    other = len(answers) - sum(by_status.values())
    if other:
        by_status["UNSPECIFIED"] = other
    problems = {i: p for i, r in enumerate(results) if (p := accounting(r))}
    in_window = sum(1 for a in ok if a.received_s <= start_s + duration_s)
    lateness = [x for r in results for x in r.lateness_s]
    errors = sorted({a.error for a in answers if a.error})
    return {
        "offered": offered,
        "sent": sum(len(r.sent_ids) for r in results),
        "late_sent": sum(r.late_sent for r in results),
        "send_lateness_p99_ms": _pct([x * 1e3 for x in lateness], 99),
        "answers": len(answers),
        "status": by_status,
        "ok_per_s": round(in_window / duration_s, 2),
        "ok_total": len(ok),
        "p50_ms": _pct(latencies, 50),
        "p99_ms": _pct(latencies, 99),
        "max_ms": _pct(latencies, 100),
        "queue_ms_p50": _pct([a.queue_us / 1e3 for a in ok if a.queue_us], 50),
        "infer_ms_p50": _pct([a.infer_us / 1e3 for a in ok if a.infer_us], 50),
        "mean_batch": round(float(np.mean([a.batch_size for a in ok])), 2) if ok else None,
        "drain_s": round(max((r.last_answer_s for r in results), default=0) - start_s, 2),
        "accounting_exact": not problems,
        "accounting_problems": {str(k): v for k, v in problems.items()},
        "stream_ends": sorted({r.end for r in results}),
        "errors": errors[:5],
    }


def summarise_bulk(
    stream: StreamResult,
    bulk: list[BulkCall],
    *,
    window: tuple[float, float],
    streak_limit: int,
    offered: int,
) -> dict[str, Any]:
    """The bulk-queue scenario: the stream frames' queue wait against their batch's duration."""
    point = summarise_point(
        [stream], offered=offered, duration_s=window[1] - window[0], start_s=window[0]
    )
    ok = [a for a in stream.answers if a.status == "OK" and a.infer_us > 0]
    ratios = [a.queue_us / a.infer_us for a in ok]
    in_window = [c for c in bulk if window[0] <= c.done_s <= window[1]]
    bulk_ok = [c for c in in_window if c.ok]
    return {
        "stream": point,
        "frames_timed": len(ok),
        "ratio_p50": _pct(ratios, 50),
        "ratio_p99": _pct(ratios, 99),
        "ratio_max": _pct(ratios, 100),
        "over_one_batch": sum(1 for x in ratios if x > 1.0),
        "over_1_1_batches": sum(1 for x in ratios if x > BULK_RATIO_TARGET),
        "over_two_batches": sum(1 for x in ratios if x > 2.0),
        "stream_queue_ms_p50": _pct([a.queue_us / 1e3 for a in ok], 50),
        "stream_queue_ms_p99": _pct([a.queue_us / 1e3 for a in ok], 99),
        "stream_infer_ms_p50": _pct([a.infer_us / 1e3 for a in ok], 50),
        "stream_queue_p99_over_bulk_batch_p50": round(
            float(np.percentile([a.queue_us for a in ok], 99))
            / float(np.median([c.infer_us for c in bulk_ok])),
            2,
        )
        if ok and bulk_ok
        else None,
        "stream_mean_batch": round(float(np.mean([a.batch_size for a in ok])), 2) if ok else None,
        "bulk_per_s": round(len(bulk_ok) / (window[1] - window[0]), 2),
        "bulk_errors": sum(1 for c in in_window if not c.ok),
        "bulk_error_codes": sorted({c.error for c in bulk if not c.ok}),
        "bulk_queue_ms_p50": _pct([c.queue_us / 1e3 for c in bulk_ok], 50),
        "bulk_infer_ms_p50": _pct([c.infer_us / 1e3 for c in bulk_ok], 50),
        "bulk_mean_batch": round(float(np.mean([c.batch_size for c in bulk_ok])), 2)
        if bulk_ok
        else None,
        "streak_limit": streak_limit,
    }


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with what was measured and whether it was met."""
    unloaded = result["unloaded"]["p50_ms"]
    bound = round(LATEST_P99_FACTOR * unloaded, 1) if unloaded else None
    out = []
    for contender in ("latest", "latest_max_age"):
        points = [p for p in result["points"] if p["contender"] == contender and p["rate_x"] >= 1]
        if not points:
            continue
        worst = max(points, key=lambda p: p["p99_ms"] if p["p99_ms"] is not None else float("inf"))
        p99 = worst["p99_ms"]
        out.append(
            {
                "target": f"{LABELS[contender]}: p99 capture-to-answer at 1x, 2x, 3x C "
                f"<= {LATEST_P99_FACTOR} x unloaded p50 ({bound} ms)",
                "measured": f"worst {p99} ms ({worst['streams']} streams at "
                f"{worst['rate_x']}x), {p99 / unloaded:.2f} x unloaded p50"
                if p99 is not None and unloaded
                else "no OK answers",
                "met": p99 is not None and bound is not None and p99 <= bound,
            }
        )
    segserve = [p for p in result["points"] if p["contender"] != "triton"]
    inexact = [p for p in segserve if not p["accounting_exact"]]
    bulk = result.get("bulk")
    if bulk:
        inexact += [] if bulk["stream"]["accounting_exact"] else [{"label": "bulk scenario"}]
    out.append(
        {
            "target": "segserve: accounting exact at every point (answers == frames sent, each "
            "frame_id once, in order)",
            "measured": f"{len(segserve) + bool(bulk) - len(inexact)} of "
            f"{len(segserve) + bool(bulk)} streams' points exact",
            "met": not inexact,
        }
    )
    if bulk:
        ratio = bulk["ratio_p99"]
        out.append(
            {
                "target": "real-time behind a full bulk queue: queue wait / batch duration, p99 "
                f"<= {BULK_RATIO_TARGET}",
                "measured": f"p99 {ratio}, max {bulk['ratio_max']}; "
                f"{bulk['over_one_batch']} of {bulk['frames_timed']} frames waited > 1 batch",
                "met": ratio is not None and ratio <= BULK_RATIO_TARGET,
            }
        )
    triton = [p for p in result["points"] if p["contender"] == "triton"]
    if triton:
        exact = sum(p["accounting_exact"] for p in triton)
        out.append(
            {
                "target": "(baseline, no target) Triton accounting exact",
                "measured": f"{exact} of {len(triton)} points",
                "met": None,
            }
        )
    return out


def _f(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def markdown(result: dict[str, Any]) -> str:
    c, unloaded = result["capacity"], result["unloaded"]
    n_tries = len(c.get("tries", []))
    tries = f", best of {n_tries} tries while other load was high" if n_tries > 1 else ""
    lines = [
        f"{result['frames']['count']} CamVid val frames at {result['frames']['size']} (JPEG "
        f"q{result['frames']['jpeg_quality']}, mean {result['frames']['mean_bytes']:,} bytes), "
        f"model {result['model']}, {result['cpus']} CPUs, {result['duration_s']:g} s per point; "
        "capture-to-answer measured on the client (receive - send time), OK answers only.",
        "",
        f"Capacity C (one QUEUE stream, closed loop, {c['window']} frames unanswered, "
        f"{c['seconds']:g} s{tries}): **{c['fps']:.2f} frames/s** (p50 {_f(c['p50_ms'])} ms, mean batch "
        f"{_f(c['mean_batch'])}). Unloaded (one QUEUE stream at {unloaded['rate_fps']:.1f} "
        f"frames/s = {result['unloaded_x']:g} C): p50 **{_f(unloaded['p50_ms'])} ms**, p99 "
        f"{_f(unloaded['p99_ms'])} ms.",
        "",
        "| contender | streams | offered x C (fps) | sent (late) | OK / DROPPED / EXPIRED / "
        "ERROR | OK/s | p50 / p99 ms | accounting | other load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for p in result["points"]:
        s = p["status"]
        exact = (
            "exact"
            if p["accounting_exact"]
            else "NOT exact: "
            + "; ".join(sorted({x for v in p["accounting_problems"].values() for x in v}))
        )
        lines.append(
            f"| {LABELS[p['contender']]} | {p['streams']} | {p['rate_x']:g}x "
            f"({p['rate_fps']:.1f}) | {p['sent']} ({p['late_sent']}) | {s['OK']} / "
            f"{s['DROPPED']} / {s['EXPIRED']} / {s['ERROR']} | {p['ok_per_s']:.1f} | "
            f"{_f(p['p50_ms'])} / {_f(p['p99_ms'])} | {exact} | {p['cores']['other']:.2f} |"
        )
    bulk = result.get("bulk")
    if bulk:
        st = bulk["stream"]
        lines += [
            "",
            f"Real-time behind a full bulk queue ({result['bulk_callers']} closed-loop Segment "
            f"callers at the default level 2, one QUEUE stream at level 1 at "
            f"{result['bulk_x']:g} C = {result['bulk_rate_fps']:.1f} frames/s, "
            f"{result['bulk_duration_s']:g} s):",
            f"- stream frame queue wait / its batch's duration (timings.queue_us / infer_us), "
            f"{bulk['frames_timed']} frames: p50 {_f(bulk['ratio_p50'])}, p99 "
            f"{_f(bulk['ratio_p99'])}, max {_f(bulk['ratio_max'])}; waited more than one batch: "
            f"{bulk['over_one_batch']} (> 1.1: {bulk['over_1_1_batches']}, > 2: "
            f"{bulk['over_two_batches']}; streak_limit {bulk['streak_limit']}: the bulk turn "
            f"comes once in every {bulk['streak_limit'] + 1} batches of a higher-level streak).",
            f"- stream: queue p50 / p99 {_f(bulk['stream_queue_ms_p50'])} / "
            f"{_f(bulk['stream_queue_ms_p99'])} ms, batch {_f(bulk['stream_infer_ms_p50'])} ms "
            f"(mean size {_f(bulk['stream_mean_batch'])}); queue p99 / bulk batch p50 "
            f"{_f(bulk['stream_queue_p99_over_bulk_batch_p50'])}; capture-to-answer p50 / p99 "
            f"{_f(st['p50_ms'])} / {_f(st['p99_ms'])} ms; statuses {st['status']}; accounting "
            + ("exact" if st["accounting_exact"] else f"NOT exact {st['accounting_problems']}")
            + ".",
            f"- bulk: {bulk['bulk_per_s']:.1f} answers/s ({bulk['bulk_per_s'] / c['fps']:.2f} C), "
            f"queue p50 {_f(bulk['bulk_queue_ms_p50'])} ms, batch {_f(bulk['bulk_infer_ms_p50'])} "
            f"ms (mean size {_f(bulk['bulk_mean_batch'])}), errors {bulk['bulk_errors']}"
            + (f" {bulk['bulk_error_codes']}" if bulk["bulk_error_codes"] else "")
            + ".",
        ]
    others = [p["cores"]["other"] for p in result["points"] if "cores" in p]
    if others:
        lines += [
            "",
            f"Other load on the machine during the points: median {np.median(others):.2f} "
            f"cores, max {max(others):.2f} (during capacity: {c['cores']['other']:.2f}); "
            f"segserve used {_f(c['cores'].get('segserve'))} cores at capacity.",
        ]
    lines += ["", "Targets:"]
    for t in result["targets"]:
        met = "n/a" if t["met"] is None else "met" if t["met"] else "NOT met"
        lines.append(f"- {t['target']}: {t['measured']} — **{met}**")
    if result.get("skipped"):
        lines += ["", f"Skipped: {result['skipped']}"]
    lines += [
        "",
        "Notes: sent (late) = frames sent, and of them those the sender was free to send only "
        "more than 2 ms after they were due, the transport having held the previous frame back "
        "(frames due after the window ended are not sent). OK/s counts OK answers received within the "
        "window. Other load: cores busy with anything but the servers and this client during "
        "the point (0 on a quiet machine). Machines vary 2x: read the ratios.",
    ]
    return "\n".join(lines) + "\n"
