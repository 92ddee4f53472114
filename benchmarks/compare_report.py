"""Rounds to figures: medians over rounds, and the report as Markdown tables and verdicts.

`summarise_limit` and `summarise` turn the per-round measurements of the limit and of every
server at every concurrency into medians (so one disturbed round does not move the result);
`report` writes the results table (with ratios to the limit), the table of targets met or not,
and the notes below them. Used by benchmarks/compare.py for benchmarks/results/compare.md and
compare.json.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from compare_limit import limit_of

from segserve_client import bench

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
