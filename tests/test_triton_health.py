"""Health follows the Triton backend, against real tritonserver processes: a model whose Triton
servers are all ejected turns NOT_SERVING (gRPC health over the real port), KServe ModelReady
answers false and ListModels / GetModel give the reason, while the other models stay SERVING;
once a server is readmitted the model is SERVING again.

Its own segserve server over the session's two Triton servers; server A is killed and started
again (same port) before the test ends, as the `triton_servers` fixture asks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import aio as ta

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_server.server import NOT_SERVING, SERVING, Server
from tests.conftest import H, W, make_settings
from tests.harness.synthetic_models import write_entry

pytestmark = [pytest.mark.triton, pytest.mark.timeout(180)]


def on_triton(remote: str, **more: str) -> str:
    values = {"segserve.backend": "triton", "segserve.triton_model": remote, **more}
    return " ".join(
        f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
        for key, value in values.items()
    )


@pytest.fixture(scope="module")
async def health_segserve(triton_servers, tmp_path_factory) -> AsyncIterator[Server]:
    server_a, _ = triton_servers
    root = tmp_path_factory.mktemp("segserve-triton-health")
    write_entry(root, "colour", H, W, max_batch_size=8)  # in-process
    write_entry(root, "colour_triton", H, W, max_batch_size=8, extra=on_triton("colour"))
    write_entry(
        root, "colour_only_a", H, W, max_batch_size=8,
        extra=on_triton("colour", **{"segserve.triton_urls": server_a.url}),
    )  # fmt: skip
    server = Server(
        make_settings(
            root,
            triton_urls=[t.url for t in triton_servers],
            triton_health_interval_s=0.2,
            triton_startup_timeout_s=5.0,
            triton_timeout_s=20.0,
        )
    )
    await server.start()
    yield server
    await server.stop(timeout_s=10)


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < timeout_s, f"{what} not within {timeout_s}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_health_follows_the_triton_servers(health_segserve, triton_servers):
    server_a, _ = triton_servers
    target = f"127.0.0.1:{health_segserve.port}"
    async with (
        grpc.aio.insecure_channel(target) as channel,
        ta.InferenceServerClient(f"127.0.0.1:{health_segserve.kserve_port}") as kserve,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.SegmentationStub(channel)

        async def status(service: str) -> int:
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            return int(answer.status)

        async def statuses() -> dict[str, int]:
            names = ("", "colour", "colour_triton", "colour_only_a")
            return dict(zip(names, await asyncio.gather(*map(status, names)), strict=True))

        everything_serving = dict.fromkeys(
            ("", "colour", "colour_triton", "colour_only_a"), SERVING
        )
        assert await statuses() == everything_serving
        assert await kserve.is_model_ready("colour_only_a")

        server_a.kill()
        try:

            async def only_a_down() -> bool:
                return await status("colour_only_a") == NOT_SERVING

            down_s = await until(only_a_down, 30, "colour_only_a NOT_SERVING")
            assert await statuses() == {**everything_serving, "colour_only_a": NOT_SERVING}
            assert not await kserve.is_model_ready("colour_only_a")
            assert await kserve.is_model_ready("colour_triton")  # B still serves it
            assert await kserve.is_server_ready()

            listed = {m.name: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
            only_a = listed["colour_only_a"]
            assert only_a.state == pb.MODEL_STATE_READY  # loaded; no server to run it now
            assert "no Triton server is available" in only_a.reason
            assert server_a.url in only_a.reason
            assert listed["colour_triton"].reason == "" and listed["colour"].reason == ""
            info = await stub.GetModel(pb.GetModelRequest(name="colour_only_a"))
            assert info.state == pb.MODEL_STATE_READY
            assert "no Triton server is available" in info.reason
        finally:
            if not server_a.running:
                server_a.start()
                await asyncio.to_thread(server_a.wait_ready, 90)

        async def only_a_up() -> bool:
            return await status("colour_only_a") == SERVING

        up_s = await until(only_a_up, 30, "colour_only_a SERVING again")
        assert await statuses() == everything_serving
        assert await kserve.is_model_ready("colour_only_a")
        info = await stub.GetModel(pb.GetModelRequest(name="colour_only_a"))
        assert info.state == pb.MODEL_STATE_READY and info.reason == ""
        print(
            f"\nhealth: colour_only_a NOT_SERVING {down_s:.2f}s after A was killed, "
            f"SERVING {up_s:.2f}s after A was ready again"
        )
