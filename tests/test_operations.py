"""What operators use: health, reflection, Prometheus metrics, and SIGTERM drain of `segserve serve`."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from tests.conftest import encode, quadrant_image, start_cli_server

PNG = encode(quadrant_image())
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_overall_and_per_model(channel):
    health = health_pb2_grpc.HealthStub(channel)

    async def status(service: str) -> int:
        return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

    assert await status("") == SERVING
    assert await status("liveness") == SERVING
    assert await status("segserve.v1.Segmentation") == SERVING
    assert await status("colour") == SERVING
    assert await status("broken_config") == NOT_SERVING
    assert await status("missing_file") == NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await status("no_such_model")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_describes_the_api(server):
    def describe() -> tuple[list[str], list[str]]:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = list(database.get_services())
            service = database.FindFileContainingSymbol("segserve.v1.Segmentation").service[0]
            return services, [m.name for m in service.method]

    services, methods = await asyncio.to_thread(describe)
    assert "segserve.v1.Segmentation" in services and "grpc.health.v1.Health" in services
    assert methods == ["Segment", "SegmentStream", "ListModels", "GetModel", "SegmentUpload"]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}\{{{re.escape(selector)}\}} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_metrics_count_requests_stages_and_batches(server, stub):
    before = await asyncio.to_thread(scrape, server.metrics_port)
    await stub.Segment(pb.SegmentRequest(model="colour", image=pb.Image(encoded=PNG)))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Segment(pb.SegmentRequest(model="colour", image=pb.Image(encoded=b"junk")))
    after = await asyncio.to_thread(scrape, server.metrics_port)

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("segserve_requests_total", model="colour", code="OK") == 1
    assert grew("segserve_requests_total", model="colour", code="INVALID_ARGUMENT") == 1
    assert grew("segserve_request_duration_seconds_count", model="colour") == 2
    for stage in ("decode", "preprocess", "queue", "infer", "postprocess", "encode"):
        assert grew("segserve_stage_duration_seconds_count", model="colour", stage=stage) == 1
    assert grew("segserve_batch_size_count", model="colour") == 1
    assert sample(after, "segserve_queue_depth", model="colour") == 0
    assert sample(after, "segserve_inflight_requests", model="colour") == 0
    assert sample(after, "segserve_model_ready", model="colour", version="1") == 1
    assert sample(after, "segserve_model_ready", model="missing_file", version="1") == 0


async def _until_accepted(metrics_port: int, model: str, count: int) -> None:
    """Waits until the server has accepted `count` requests of `model`: each one is counted in
    flight from the moment its handler takes it until it is answered, then by status code."""

    def accepted() -> float:
        seen = 0.0
        for family in text_string_to_metric_families(scrape(metrics_port)):
            for name, labels, value in (s[:3] for s in family.samples):
                if labels.get("model") == model and name in (
                    "segserve_requests_total",  # answered, any status code
                    "segserve_inflight_requests",
                ):
                    seen += value
        return seen

    limit = time.monotonic() + 30
    while (seen := await asyncio.to_thread(accepted)) < count:
        assert time.monotonic() < limit, f"the server accepted {seen} of {count} requests"
        await asyncio.sleep(0.01)


async def test_sigterm_drains_everything_accepted(repository):
    process, port, metrics_port = await start_cli_server(repository, drain_timeout_s=20)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SegmentationStub(channel)
            busy = pb.SegmentRequest(model="colour_busy", image=pb.Image(encoded=PNG))
            unary = [asyncio.ensure_future(stub.Segment(busy)) for _ in range(8)]
            stream = stub.SegmentStream()
            for frame_id in range(4):
                await stream.write(pb.SegmentStreamRequest(frame_id=frame_id, request=busy))
            first = await stream.read()
            assert first.frame_id == 0
            await _until_accepted(metrics_port, "colour_busy", len(unary) + 4)

            process.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*unary, return_exceptions=True)
            assert all(isinstance(a, pb.SegmentResponse) for a in answers), answers
            frames = [first]
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while (answer := await stream.read()) != grpc.aio.EOF:
                    frames.append(answer)
            # Every frame sent before the drain was answered; then the stream says why it ends.
            assert [f.frame_id for f in frames] == [0, 1, 2, 3]
            assert all(f.WhichOneof("result") == "response" for f in frames)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "draining" in ended.value.details()

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Segment(busy, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()


async def test_get_model_reports_the_batching_that_runs(repository):
    """With ONNX Runtime's CPU lanes (ort_intra_op_threads 0 on 2+ cores) each lane runs one
    image: GetModel says max_batch_size 1, not config.pbtxt's 8."""
    from segserve.v1 import segserve_pb2 as pb
    from segserve.v1 import segserve_pb2_grpc as pb_grpc
    from segserve_server.backends.onnxruntime import cpu_count
    from segserve_server.server import Server
    from tests.conftest import make_settings

    lanes = cpu_count() > 1
    server = Server(make_settings(repository, ort_intra_op_threads=0, metrics_port=None))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            info = await pb_grpc.SegmentationStub(channel).GetModel(
                pb.GetModelRequest(name="colour")
            )
    finally:
        await server.stop(timeout_s=5)
    assert info.batching.max_batch_size == (1 if lanes else 8)
