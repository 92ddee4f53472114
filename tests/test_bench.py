"""segserve-client bench, functionally: tiny loads against the real loopback server, its report
and chart. Nothing here asserts on timing: speed is measured by benchmarks/compare.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from segserve_client import bench
from segserve_client.cli import main as client_main
from tests.conftest import encode, quadrant_image

LATENCY_KEYS = {"p50", "p90", "p99", "max", "mean"}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bench-images")
    for i in range(3):
        image = np.roll(quadrant_image(), 7 * i, axis=1)
        (folder / f"frame_{i}.png").write_bytes(encode(image))
    (folder / "frame_3.jpg").write_bytes(encode(quadrant_image(), ".jpg"))
    (folder / "notes.txt").write_text("not an image")
    return folder


async def run_cli(*argv: str) -> int:
    # The bench runs its own event loop: give it a thread, as a shell would give it a process.
    return await asyncio.to_thread(client_main, list(argv))


def test_percentiles_on_known_inputs():
    summary = bench.percentiles_ms([i / 1e3 for i in range(1, 101)])  # 1..100 ms
    assert summary == {"p50": 50.5, "p90": 90.1, "p99": 99.01, "max": 100.0, "mean": 50.5}
    assert bench.percentiles_ms([0.004]) == dict.fromkeys(LATENCY_KEYS, 4.0)
    assert bench.percentiles_ms([]) == dict.fromkeys(LATENCY_KEYS)


def test_sizes_and_image_sets(images):
    assert bench.parse_size("original") is None
    assert bench.parse_size("1920x1080") == (1920, 1080)
    for bad in ("1920", "0x10", "axb"):
        with pytest.raises(ValueError):
            bench.parse_size(bad)
    as_they_are = bench.load_images(images)
    assert as_they_are.size == "original" and len(as_they_are.images) == 4
    resized = bench.load_images(images, "96x72", jpeg_quality=80, limit=2)
    assert resized.size == "96x72" and len(resized.images) == 2
    assert all(data[:3] == b"\xff\xd8\xff" for data in resized.images)
    assert resized.describe()["jpeg_quality"] == 80


async def test_closed_and_open_loop_unary_and_stream(server, images, tmp_path):
    report_path, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    status = await run_cli(
        "bench",
        "--server",
        f"127.0.0.1:{server.port}",
        "--model",
        "colour",
        "--images",
        str(images),
        "--size",
        "original,96x72",
        "--concurrency",
        "1,3",
        "--rate",
        "40",
        "--mode",
        "both",
        "--duration-s",
        "0.3",
        "--warmup-s",
        "0.1",
        "--output",
        str(report_path),
        "--plot",
        str(chart),
    )
    assert status == 0
    report = json.loads(report_path.read_text())
    assert report["model"] == "colour" and report["protocol"] == "segserve"
    points = report["points"]
    loads = {(p["images"]["size"], p["load"]["label"]) for p in points}
    assert len(points) == len(loads) == 2 * 2 * 3  # sizes x modes x (two closed, one open)
    for point in points:
        assert point["errors"] == {}
        assert point["ok"] == point["requests"] > 0
        assert point["throughput_rps"] > 0
        assert set(point["latency_ms"]) == LATENCY_KEYS
        latency = point["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
        assert set(point["server_ms"]) == set(bench.STAGES)
        assert point["batch_size_mean"] >= 1
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_errors_are_counted_by_status(server, images, tmp_path):
    report_path = tmp_path / "errors.json"
    status = await run_cli(
        "bench",
        "--server",
        f"127.0.0.1:{server.port}",
        "--model",
        "no_such_model",
        "--images",
        str(images),
        "--size",
        "original",
        "--concurrency",
        "2",
        "--mode",
        "both",
        "--duration-s",
        "0.2",
        "--warmup-s",
        "0",
        "--max-requests",
        "10",
        "--output",
        str(report_path),
    )
    assert status == 0  # a measurement, not a failure of the tool
    for point in json.loads(report_path.read_text())["points"]:
        assert point["ok"] == 0
        assert point["errors"] == {"NOT_FOUND": point["requests"]}
        assert 0 < point["requests"] <= 10  # bounded in count
        assert point["latency_ms"]["p50"] is None


async def test_json_to_stdout_and_usage_errors(server, images, capsys):
    status = await run_cli(
        "bench",
        "--server",
        f"127.0.0.1:{server.port}",
        "--model",
        "colour",
        "--images",
        str(images),
        "--size",
        "original",
        "--concurrency",
        "1",
        "--duration-s",
        "0.1",
        "--warmup-s",
        "0",
        "--json",
    )
    assert status == 0
    report = json.loads(capsys.readouterr().out)
    assert report["points"][0]["load"] == {
        "mode": "unary",
        "concurrency": 1,
        "rate_rps": None,
        "label": "unary closed x1",
    }
    assert await run_cli("bench", "--model", "colour", "--concurrency", "0") == 2
    missing = await run_cli("bench", "--model", "colour", "--images", "/nonexistent")
    assert missing == 1
    assert "does not exist" in capsys.readouterr().err


def test_chart_of_known_points(tmp_path):
    points = [
        {
            "images": {"size": "original"},
            "load": {"mode": "unary", "rate_rps": rate},
            "throughput_rps": rps,
            "latency_ms": {"p50": p50, "p99": p50 * 2},
        }
        for rate, rps, p50 in ((None, 10.0, 20.0), (None, 30.0, 80.0), (25.0, 24.0, 40.0))
    ]
    chart = tmp_path / "chart.png"
    bench.plot_latency_throughput(points, chart)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
