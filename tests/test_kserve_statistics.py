"""ModelStatistics on segserve's KServe port, as Triton fills it and Triton's tools read it.

Triton counts InferStatistics per request: every successful request adds 1 to success, queue,
compute_input, compute_infer and compute_output (perf_analyzer aborts with "Server side
statistics compute counts must be the same" otherwise), while inference_count counts batch
items. A failed request adds to `fail` only.
"""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.grpc import aio as ta
from tritonclient.utils import InferenceServerException

from segserve_server.server import Server
from tests.conftest import H, W, encode, quadrant_image

pytestmark = pytest.mark.timeout(60)

STAGES = ("success", "queue", "compute_input", "compute_infer", "compute_output")


@pytest.fixture
async def client(server: Server):
    assert server.kserve_port
    async with ta.InferenceServerClient(f"127.0.0.1:{server.kserve_port}") as aio_client:
        yield aio_client


def tensor_input(name: str, array: np.ndarray, datatype: str) -> tg.InferInput:
    tensor = tg.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def images_input(*images: bytes) -> tg.InferInput:
    array = np.empty(len(images), dtype=np.object_)
    array[:] = list(images)
    return tensor_input("IMAGE_BYTES", array, "BYTES")


def pixels(batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((batch, 3, H, W), dtype=np.float32)


async def snapshot(client: ta.InferenceServerClient, name: str) -> dict[str, tuple[int, int]]:
    """(count, ns) of every InferStatistics duration, plus inference_count as ("items", n)."""
    (entry,) = (await client.get_inference_statistics(name)).model_stats
    stats = entry.inference_stats
    values = {
        stage: (getattr(stats, stage).count, getattr(stats, stage).ns)
        for stage in (*STAGES, "fail")
    }
    values["items"] = (entry.inference_count, 0)
    return values


def deltas(before: dict, after: dict) -> dict[str, tuple[int, int]]:
    return {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}


async def test_tensor_route_fills_every_stage_per_request(client):
    before = await snapshot(client, "colour")
    batches = (1, 2, 1, 2, 2)
    for i, batch in enumerate(batches):
        await client.infer("colour", [tensor_input("image", pixels(batch, i), "FP32")])
    with pytest.raises(InferenceServerException):  # too big a batch: fails in the model route
        await client.infer("colour", [tensor_input("image", pixels(9), "FP32")])
    change = deltas(before, await snapshot(client, "colour"))
    for stage in STAGES:
        count, ns = change[stage]
        assert count == len(batches), (stage, change)
        assert ns > 0, (stage, change)
    assert change["items"][0] == sum(batches), change
    assert change["fail"][0] == 1, change


async def test_image_route_fills_every_stage_per_request(client):
    before = await snapshot(client, "colour.image")
    png = encode(quadrant_image())
    requests = ((png,), (png, png), (png, png, png))
    for images in requests:
        await client.infer("colour.image", [images_input(*images)])
    with pytest.raises(InferenceServerException):
        await client.infer("colour.image", [images_input(png, b"not an image")])
    change = deltas(before, await snapshot(client, "colour.image"))
    for stage in STAGES:
        count, ns = change[stage]
        assert count == len(requests), (stage, change)
        assert ns > 0, (stage, change)
    assert change["items"][0] == sum(len(r) for r in requests), change
    assert change["fail"][0] == 1, change


async def test_stages_fit_within_success(client):
    """A request's stages run one after another, so their durations add up to at most the
    request's (success) duration, as in Triton."""
    before = await snapshot(client, "colour")
    for i in range(3):
        await client.infer("colour", [tensor_input("image", pixels(2, i), "FP32")])
    change = deltas(before, await snapshot(client, "colour"))
    stages = sum(
        change[s][1] for s in ("queue", "compute_input", "compute_infer", "compute_output")
    )
    assert stages <= change["success"][1], change


async def test_counts_agree_while_requests_run(client):
    """perf_analyzer reads the statistics while its load runs, and aborts if the stage counts of
    the window differ: every snapshot taken under load must have them equal."""

    async def load(seed: int, route: str) -> None:
        for i in range(6):
            if route == "colour":
                await client.infer(route, [tensor_input("image", pixels(1 + i % 2, seed), "FP32")])
            else:
                await client.infer(route, [images_input(encode(quadrant_image()))])

    for route in ("colour", "colour.image"):
        tasks = [asyncio.create_task(load(seed, route)) for seed in range(6)]
        snapshots = []
        while not all(t.done() for t in tasks):
            snapshots.append(await snapshot(client, route))
        await asyncio.gather(*tasks)
        snapshots.append(await snapshot(client, route))
        assert len(snapshots) > 2
        for values in snapshots:
            counts = {stage: values[stage][0] for stage in STAGES}
            assert len(set(counts.values())) == 1, (route, counts)


PERF_ANALYZER = shutil.which("perf_analyzer")


@pytest.mark.slow
@pytest.mark.skipif(PERF_ANALYZER is None, reason="perf_analyzer is not installed here")
async def test_perf_analyzer_measures(server: Server):
    assert PERF_ANALYZER and server.kserve_port
    process = await asyncio.create_subprocess_exec(
        PERF_ANALYZER,
        "-m",
        "colour",
        "--measurement-interval",
        "500",
        "-p",
        "500",
        "--max-trials",
        "3",
        "-i",
        "grpc",
        "-u",
        f"127.0.0.1:{server.kserve_port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 50)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "compute counts must be the same" not in text, text
