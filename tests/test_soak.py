"""benchmarks/soak.py and its report (benchmarks/soak_report.py): the verdict on known figures
(quick), a 20-second soak of a real `segserve serve` with every kind of traffic, and one stopped
by Ctrl-C (SIGINT) midway (slow tier).

RSS growth is not asserted on the short run: 20 s is all warm-up for the server's allocator
(its RSS is still climbing), so the script's own RSS check may fail there; the 10-minute run's
figures are in docs/benchmarks.md. Everything else the script checks must hold.
"""

from __future__ import annotations

import importlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT

SECTIONS = (
    "RSS over time",
    "RSS growth after warm-up",
    "saturation after warm-up",
    "throughput and latency",
    "errors by status",
    "checks",
    "result: ",
)
FRAMES = {"count": 1, "folder": "-", "size": "480x360", "jpeg_quality": 90, "mean_bytes": 1}


@pytest.fixture(scope="module")
def benchmarks() -> Iterator[None]:
    """benchmarks/ on sys.path, as when its scripts run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def soak(benchmarks: None) -> ModuleType:
    """benchmarks/soak.py as a module."""
    return importlib.import_module("soak")


@pytest.fixture(scope="module")
def soak_report(benchmarks: None) -> ModuleType:
    """benchmarks/soak_report.py as a module."""
    return importlib.import_module("soak_report")


def measured(rss_mib: list[float], statuses: dict[str, dict[str, int]]) -> dict[str, object]:
    """What Soak.run and main hand to summarise: one sample every 10 s, one answer per OK."""
    samples = [
        {"t_s": 10.0 * i, "vmrss_bytes": mib * 2**20, "metrics_rss_bytes": mib * 2**20,
         "queue_depth": 3.0, "inflight": 5.0, "server_cores": 1.9, "cpu_s": 19.0 * i,
         "machine_busy_s": 20.0 * i}
        for i, mib in enumerate(rss_mib)
    ]  # fmt: skip
    answers = {k: [(5.0, 0.1)] * s.get("OK", 0) for k, s in statuses.items()}
    return {"split": {}, "load_s": 10.0 * (len(rss_mib) - 1), "client_cores": 0.1,
            "final_call": "OK", "samples": samples, "after_load": samples[-1],
            "statuses": statuses, "answers": answers, "server_exit_code": 0, "log": []}  # fmt: skip


def test_the_verdict_fails_on_rss_growth_or_one_unexpected_outcome(soak, soak_report):
    args = soak.parse_args(["--minutes", "1", "--warmup-minutes", "0.5"])
    good = {kind: {"OK": 10} for kind in soak_report.GOOD_KINDS}
    good["stream_latest"]["DROPPED"] = 4
    bad = {
        f"bad:{case}": {sorted(allowed)[0]: 2} for case, allowed in soak_report.BAD_CASES.items()
    }
    flat = [400.0, 500.0, 500.0, 500.0, 502.0, 501.0, 503.0]  # warm 500, end 502: +0.4 %

    def failed(result: dict) -> list[str]:
        return [c["check"].split(" <")[0] for c in result["checks"] if not c["pass"]]

    passing = soak_report.summarise(args, FRAMES, measured(flat, {**good, **bad}))
    assert passing["verdict"] == "PASS" and failed(passing) == []
    assert passing["rss"]["vmrss"]["growth_pct"] == 0.4
    assert passing["unexpected_total"] == 0 and passing["expected_total"] == 4 + 2 * len(bad)
    assert "result: PASS" in soak_report.format_report(passing)

    growing = [400.0, 500.0, 500.0, 500.0, 520.0, 530.0, 540.0]  # end 530: +6 %
    result = soak_report.summarise(args, FRAMES, measured(growing, {**good, **bad}))
    assert result["rss"]["vmrss"]["growth_pct"] == 6.0
    assert result["verdict"] == "FAIL" and failed(result) == ["RSS growth after warm-up"]

    wrong = {**good, **bad, "bad:unknown_model": {"NOT_FOUND": 1, "OK": 1}}
    wrong["unary"] = {"OK": 10, "RESOURCE_EXHAUSTED": 1}
    result = soak_report.summarise(args, FRAMES, measured(flat, wrong))
    assert result["verdict"] == "FAIL" and failed(result) == ["unexpected outcomes == 0"]
    assert result["outcomes"]["unexpected"] == [
        {"kind": "unary", "status": "RESOURCE_EXHAUSTED", "count": 1},
        {"kind": "bad:unknown_model", "status": "OK", "count": 1},
    ]
    assert "result: FAIL (unexpected outcomes == 0)" in soak_report.format_report(result)

    cut = {**measured(flat, {**good, **bad}), "interrupted": True}  # Ctrl-C: a partial report
    result = soak_report.summarise(args, FRAMES, cut)
    assert result["verdict"] == "FAIL" and failed(result) == [
        "the run went its full --minutes (not interrupted)"
    ]
    assert result["checks"][-1]["value"] == "interrupted after 60 s"


def test_a_stream_pace_ends_when_the_soak_is_stopped(soak):
    stop_at = [100.0]
    pace = soak.StoppablePace(10.0, 0.0, 2.0, 30.0, lambda: stop_at[0])
    assert pace.end == 40.0 and pace.due(3) == 11.5
    stop_at[0] = 12.0  # what Soak.interrupt does to stop_at
    assert pace.end == 12.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_short_soak_reports_every_section_with_no_unexpected_outcome(soak_report, tmp_path: Path):

    path = tmp_path / "soak.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", "0.3"]
    cmd += ["--warmup-minutes", "0.1", "--sample-s", "2", "--model", "synthetic_colour_classes"]
    done = subprocess.run(
        [*cmd, "--json", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=540
    )
    assert path.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(path.read_text())
    for section in SECTIONS:
        assert section in done.stdout, section
    assert f"result: {report['verdict']}" in done.stdout
    assert done.returncode == (0 if report["verdict"] == "PASS" else 1)
    others = [c for c in report["checks"] if not c["check"].startswith("RSS growth")]
    assert [c for c in others if not c["pass"]] == [], done.stdout
    assert report["unexpected_total"] == 0 and report["outcomes"]["unexpected"] == []
    bad_kinds = {f"bad:{case}" for case in soak_report.BAD_CASES}  # a shuffled cycle of 12
    assert set(report["kinds"]) == set(soak_report.GOOD_KINDS) | bad_kinds
    for kind in soak_report.GOOD_KINDS:
        figures = report["kinds"][kind]
        assert figures["ok"] > 0 and figures["ok_per_s"] > 0, kind
        latency = figures["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"], kind
    assert report["expected_total"] >= len(bad_kinds)
    samples = report["samples"]
    assert len(samples) >= 6 and len(report["rss"]["table"]) >= 3
    assert all(s["vmrss_bytes"] > 100 * 2**20 and s["metrics_rss_bytes"] > 0 for s in samples)
    assert report["rss"]["vmrss"]["growth_pct"] is not None
    assert report["saturation"]["queue_depth_mean"] is not None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_stops_the_traffic_and_the_server_and_prints_a_partial_report(tmp_path: Path):
    path, out = tmp_path / "soak.json", tmp_path / "soak.out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", "5"]
    cmd += ["--sample-s", "2", "--model", "synthetic_colour_classes", "--json", str(path)]
    with out.open("w") as sink:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while " against 127.0.0.1:" not in out.read_text() and time.monotonic() < deadline:
                assert process.poll() is None, out.read_text()[-3000:]
                time.sleep(0.2)
            time.sleep(6)  # into the load
            sent = time.monotonic()
            process.send_signal(signal.SIGINT)
            code = process.wait(60)
            took = time.monotonic() - sent
        finally:
            if process.poll() is None:
                process.kill()
    text = out.read_text()
    assert code == 130 and took < 15, (code, took, text[-3000:])
    report = json.loads(path.read_text())
    assert report["verdict"] == "FAIL" and report["load_s"] < 60
    failed = {c["check"] for c in report["checks"] if not c["pass"]}
    assert "the run went its full --minutes (not interrupted)" in failed
    assert not failed & {"server exit code on SIGINT == 0", "unexpected outcomes == 0"}, text
    assert "result: FAIL" in text
