"""Ops basics: JSON logs by setting, and the process's own metrics (RSS, CPU, fds) on /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_server.logs import JsonFormatter
from tests.conftest import encode, quadrant_image, start_cli_server


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_json_logs_and_process_metrics_of_segserve_serve(repository):
    process, port, metrics_port = await start_cli_server(
        repository, drain_timeout_s=10, extra_args=["--log-format", "json"]
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SegmentationStub(channel)
            request = pb.SegmentRequest(
                model="colour", image=pb.Image(encoded=encode(quadrant_image()))
            )
            await stub.Segment(request, timeout=30)

        samples = await asyncio.to_thread(scrape, metrics_port)
        assert samples["process_resident_memory_bytes"] > 10 * 1024 * 1024
        assert samples["process_open_fds"] > 3
        assert samples["process_max_fds"] >= samples["process_open_fds"]
        assert samples["process_cpu_seconds_total"] > 0
        assert samples["python_info"] == 1

        process.send_signal(signal.SIGTERM)
        assert process.stderr is not None
        _, rest = await asyncio.to_thread(process.communicate, timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    lines = [line for line in (rest or "").splitlines() if line.strip()]
    assert lines, "nothing was logged after the start"
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
    messages = [entry["message"] for entry in entries]
    assert any(m.startswith("draining") for m in messages), messages
    assert messages[-1] == "stopped"


def test_json_formatter_keeps_extra_fields_and_the_traceback():
    try:
        raise ValueError("bad value 42")
    except ValueError:
        record = logging.getLogger("segserve.test").makeRecord(
            "segserve.test",
            logging.ERROR,
            __file__,
            1,
            "model %s failed",
            ("unet",),
            sys.exc_info(),
            extra={"model": "unet", "version": 3},
        )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "ERROR" and entry["logger"] == "segserve.test"
    assert entry["message"] == "model unet failed"
    assert entry["model"] == "unet" and entry["version"] == 3
    assert "ValueError: bad value 42" in entry["exception"]
    assert entry["time"].endswith("+00:00")
