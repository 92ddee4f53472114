"""The Triton backend against real tritonserver processes on loopback (two of them, serving the
same ONNX models through the Python backend): identical masks, balancing, failover with no
request lost, readmission, and UNAVAILABLE only when no server is left.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypedDict

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.grpc import aio as ta

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_server.backends.factory import backend_name, create_backend
from segserve_server.backends.triton.backend import TritonBackend
from segserve_server.backends.triton.pool import EndpointPool, EndpointState
from segserve_server.core.models import ModelState
from segserve_server.errors import DeadlineExceeded, InferenceFailed, ModelConfigError
from segserve_server.model_repository import scan_repository
from segserve_server.server import Server
from segserve_server.settings import load_settings
from tests.conftest import (
    CAMVID,
    ROOT,
    TRITON_SLOW_S,
    H,
    W,
    encode,
    make_settings,
    quadrant_image,
)
from tests.harness.synthetic_models import expected_colour_labels, write_entry
from tests.harness.triton_local import free_port

pytestmark = [pytest.mark.triton, pytest.mark.timeout(180)]

BUNDLED = "synthetic_colour_classes"


def parameters(**values: str) -> str:
    return " ".join(
        f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
        for key, value in values.items()
    )


def on_triton(remote: str, **more: str) -> str:
    return parameters(**{"segserve.backend": "triton", "segserve.triton_model": remote, **more})


class Batching(TypedDict):
    max_batch_size: int
    max_queue_delay_us: int


def build_segserve_repository(root: Path, server_a: str) -> Path:
    """Each in-process model beside its twin on Triton (the same ONNX there)."""
    batching = Batching(max_batch_size=8, max_queue_delay_us=2000)
    write_entry(root, "colour", H, W, **batching)
    write_entry(root, "colour_triton", H, W, **batching, extra=on_triton("colour"))
    write_entry(root, "colour_logits", H, W, output="logits", max_batch_size=8)
    write_entry(
        root, "colour_logits_triton", H, W, output="logits", max_batch_size=8,
        extra=on_triton("colour_logits"),
    )  # fmt: skip
    write_entry(
        root, "colour_busy_triton", 256, 256, max_batch_size=2, max_queue_delay_us=1000,
        extra=on_triton("colour_busy"),
    )  # fmt: skip
    # Takes TRITON_SLOW_S per batch on Triton: past the deadline tests' deadlines.
    write_entry(root, "colour_slow_triton", H, W, **batching, extra=on_triton("colour_slow"))
    # Only server A: UNAVAILABLE while it is down.
    write_entry(
        root, "colour_only_a", H, W, **batching,
        extra=on_triton("colour", **{"segserve.triton_urls": server_a}),
    )  # fmt: skip
    # Config and remote model disagree (48x64 here, 256x256 there): FAILED with the reason.
    write_entry(root, "mismatch_triton", H, W, extra=on_triton("colour_busy"))
    # No server listens there: FAILED after triton_startup_timeout_s.
    write_entry(
        root, "no_server_triton", H, W,
        extra=on_triton("colour", **{"segserve.triton_urls": f"127.0.0.1:{free_port()}"}),
    )  # fmt: skip
    shutil.copytree(ROOT / "model_repository" / BUNDLED, root / BUNDLED)
    twin = root / f"{BUNDLED}_triton"
    shutil.copytree(ROOT / "model_repository" / BUNDLED, twin)
    text = (twin / "config.pbtxt").read_text().replace(f'"{BUNDLED}"', f'"{BUNDLED}_triton"')
    (twin / "config.pbtxt").write_text(text + on_triton(BUNDLED) + "\n")
    return root


@pytest.fixture(scope="module")
async def triton_segserve(triton_servers, tmp_path_factory) -> AsyncIterator[Server]:
    repository = build_segserve_repository(
        tmp_path_factory.mktemp("segserve-on-triton"), triton_servers[0].url
    )
    server = Server(
        make_settings(
            repository,
            triton_urls=[t.url for t in triton_servers],
            triton_health_interval_s=0.2,
            triton_startup_timeout_s=1.0,
            triton_timeout_s=20.0,
        )
    )
    await server.start()
    yield server
    await server.stop(timeout_s=10)


@pytest.fixture(scope="module")
async def triton_stub(triton_segserve) -> AsyncIterator[pb_grpc.SegmentationStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{triton_segserve.port}") as channel:
        yield pb_grpc.SegmentationStub(channel)


def requests_counted(server: Server, model: str, code: str) -> float:
    value = server.core.metrics.registry.get_sample_value(
        "segserve_requests_total", {"model": model, "code": code}
    )
    return value or 0.0


def backend_of(server: Server, model: str) -> TritonBackend:
    backend = server.core.models.get(model).backend
    assert isinstance(backend, TritonBackend)
    return backend


async def raw_mask(stub, model: str, image: bytes) -> tuple[int, int, bytes]:
    response = await stub.Segment(
        pb.SegmentRequest(
            model=model, image=pb.Image(encoded=image), encodings=[pb.MASK_ENCODING_RAW]
        )
    )
    return response.height, response.width, response.masks[0].data


async def test_models_load_on_triton_or_fail_with_the_reason(triton_segserve, triton_servers):
    models = triton_segserve.core.models.models
    for name in ("colour_triton", "colour_logits_triton", "colour_busy_triton", "colour_only_a"):
        assert models[name].state is ModelState.READY, models[name].reason
    description = backend_of(triton_segserve, "colour_triton").description
    assert description.startswith("triton:colour:1@")
    assert all(f"{t.url}(live)" in description for t in triton_servers)
    assert models["mismatch_triton"].state is ModelState.FAILED
    assert "FP32[-1, 3, 256, 256]" in models["mismatch_triton"].reason
    assert "FP32[-1, 3, 48, 64]" in models["mismatch_triton"].reason
    no_server = models["no_server_triton"]
    assert no_server.state is ModelState.FAILED
    assert "no Triton server is available" in no_server.reason and "127.0.0.1:" in no_server.reason


async def test_masks_identical_to_the_in_process_backend(triton_stub):
    rng = np.random.default_rng(7)
    images = [encode(quadrant_image())]
    for height, width in ((48, 64), (37, 53), (120, 90), (360, 480), (1, 1)):
        images.append(encode(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
    images.append(encode(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8), ".jpg"))
    camvid = sorted((CAMVID / "val").glob("*.png"))[:2]
    images += [path.read_bytes() for path in camvid]
    compared = 0
    for local, remote in (
        ("colour", "colour_triton"),
        ("colour_logits", "colour_logits_triton"),
        (BUNDLED, f"{BUNDLED}_triton"),
    ):
        answers = await asyncio.gather(
            *(raw_mask(triton_stub, model, image) for image in images for model in (local, remote))
        )
        for here, there in zip(answers[::2], answers[1::2], strict=True):
            assert here == there  # same size, byte-identical label map
            compared += 1
    assert compared == 3 * len(images)
    print(f"\n{compared} masks identical (in-process vs Triton), {len(camvid)} CamVid frames each")


async def test_kserve_raw_tensors_on_the_triton_backend(triton_segserve):
    x = np.random.default_rng(3).random((5, 3, H, W), dtype=np.float32)
    tensor = tg.InferInput("image", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    async with ta.InferenceServerClient(f"127.0.0.1:{triton_segserve.kserve_port}") as client:
        local = (await client.infer("colour", [tensor])).as_numpy("labels")
        remote = (await client.infer("colour_triton", [tensor])).as_numpy("labels")
    np.testing.assert_array_equal(local, remote)


async def test_least_outstanding_balancing_uses_both_servers(triton_segserve, triton_stub):
    pool = backend_of(triton_segserve, "colour_triton").pool
    before = [e.calls for e in pool.endpoints]
    png = encode(quadrant_image())
    await asyncio.gather(*(raw_mask(triton_stub, "colour_triton", png) for _ in range(40)))
    calls = [e.calls - b for e, b in zip(pool.endpoints, before, strict=True)]
    assert all(c > 0 for c in calls), calls  # both servers served; no ratio is asserted


async def until(condition, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what} not within {timeout_s}s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_failover_loses_no_request_and_the_server_is_readmitted(
    triton_segserve, triton_stub, triton_servers
):
    """Kill server A (SIGKILL) while batches are in flight on it: every request is answered,
    correctly, by B. A model only on A answers UNAVAILABLE meanwhile. A restarted A is
    readmitted by the health checks and takes traffic again."""
    server_a, _ = triton_servers
    pool = backend_of(triton_segserve, "colour_busy_triton").pool
    endpoint_a = next(e for e in pool.endpoints if e.url == server_a.url)
    image = quadrant_image(256, 256)
    expected = expected_colour_labels(image).tobytes()
    png = encode(image)
    total, concurrency = 80, 8
    slots = asyncio.Semaphore(concurrency)
    done: list[bytes] = []

    async def one() -> bytes:
        async with slots:
            _, _, mask = await raw_mask(triton_stub, "colour_busy_triton", png)
            done.append(mask)
            return mask

    retries_before = pool.stats().retries
    load = asyncio.gather(*(one() for _ in range(total)), return_exceptions=True)
    try:
        await until(lambda: len(done) >= 10 and endpoint_a.outstanding > 0, 60, "load on A")
        in_flight_on_a = endpoint_a.outstanding
        server_a.kill()  # no await between the check and the kill
        answers = await load
        errors = [a for a in answers if not isinstance(a, bytes)]
        assert not errors, errors[:3]
        assert len(answers) == total and all(a == expected for a in answers)
        assert endpoint_a.state is EndpointState.EJECTED
        retried = pool.stats().retries - retries_before
        assert retried >= 1

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw_mask(triton_stub, "colour_only_a", encode(quadrant_image()))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server_a.url in err.value.details()
    finally:
        if not server_a.running:
            server_a.start()
            ready_s = await asyncio.to_thread(server_a.wait_ready, 90)

    # pool.live: the narrowing of endpoint_a.state by the assert above does not hold past awaits.
    readmit_s = await until(lambda: endpoint_a in pool.live, 30, "readmission")
    only_a = backend_of(triton_segserve, "colour_only_a").pool
    await until(lambda: bool(only_a.live), 30, "readmission of colour_only_a")
    print(
        f"\nfailover: {total} requests, {in_flight_on_a} batches in flight on A at the kill, "
        f"{retried} retried on B, 0 lost; A restarted after the load, ready in {ready_s:.1f}s; "
        f"readmitted {readmit_s:.2f}s after ready (ejection lasted {endpoint_a.readmitted_after_s:.1f}s)"
    )
    calls_before = endpoint_a.calls
    await asyncio.gather(*(raw_mask(triton_stub, "colour_busy_triton", png) for _ in range(8)))
    assert endpoint_a.calls > calls_before
    *_, mask = await raw_mask(triton_stub, "colour_only_a", encode(quadrant_image()))
    assert mask == expected_colour_labels(quadrant_image()).tobytes()


async def test_a_bad_request_does_not_eject_a_server(triton_servers):
    """Triton refusing a batch (INVALID_ARGUMENT) is the request's fault: no server ejected."""
    pool = EndpointPool(
        [t.url for t in triton_servers], "colour", "1", timeout_s=10.0, health_interval_s=0.2
    )
    await pool.start(ready_timeout_s=10)
    try:
        assert len(pool.live) == 2

        async def wrong_shape(client: ta.InferenceServerClient, timeout_s: float) -> None:
            tensor = tg.InferInput("image", [1, 3, 5, 5], "FP32")
            tensor.set_data_from_numpy(np.zeros((1, 3, 5, 5), np.float32))
            await client.infer("colour", [tensor], model_version="1", client_timeout=timeout_s)

        with pytest.raises(InferenceFailed, match="INVALID_ARGUMENT"):
            await pool.call(wrong_shape, None)
        assert len(pool.live) == 2 and pool.stats().ejections == 0
    finally:
        await pool.close()


@pytest.mark.parametrize(
    ("extra", "urls", "message"),
    [
        (parameters(**{"segserve.backend": "tensorrt"}), [], "not one of"),
        (parameters(**{"segserve.backend": "triton"}), [], "names no server"),
        (parameters(**{"segserve.triton_urls": "http://a:1"}), [], "no scheme"),
        (
            parameters(**{"segserve.triton_model_version": "newest"}),
            ["127.0.0.1:1"],
            "'newest'",
        ),
    ],
)
def test_backend_configuration_errors(tmp_path, extra, urls, message):
    model_dir = write_entry(tmp_path, "m", H, W, extra=extra)
    (entry,) = scan_repository(tmp_path)
    assert entry.config is not None
    settings = make_settings(tmp_path, triton_urls=urls, default_backend="triton")
    with pytest.raises(ModelConfigError, match=message):
        create_backend(entry.config, model_dir / "1", settings)


def test_triton_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGSERVE_TRITON_URLS", "triton-0:8001, [::1]:8001")
    assert load_settings(model_repository=tmp_path).triton_urls == ["triton-0:8001", "[::1]:8001"]
    flags = load_settings(model_repository=tmp_path, triton_urls=["a:1", "b:2"])
    assert flags.triton_urls == ["a:1", "b:2"]
    with pytest.raises(ValueError, match="no scheme"):
        load_settings(model_repository=tmp_path, triton_urls=["grpc://a:1"])
    monkeypatch.delenv("SEGSERVE_TRITON_URLS")
    # A model on the default backend follows default_backend; one that says so stays local.
    write_entry(tmp_path, "local", H, W, extra=parameters(**{"segserve.backend": "onnxruntime"}))
    write_entry(tmp_path, "plain", H, W)
    entries = {e.name: e.config for e in scan_repository(tmp_path)}
    local, plain = entries["local"], entries["plain"]
    assert local is not None and plain is not None
    settings = make_settings(tmp_path, default_backend="triton", triton_urls=["a:1"])
    assert backend_name(local, settings) == "onnxruntime"
    assert backend_name(plain, settings) == "triton"


async def test_a_batch_is_sent_with_the_time_its_requests_still_have(triton_segserve):
    """The Triton backend asks Triton with the batch's remaining time: past it the call ends with
    DeadlineExceeded, no server is ejected and the batch is not retried elsewhere; the same
    batch without a deadline waits for Triton's answer (colour_slow takes TRITON_SLOW_S there,
    triton_timeout_s is 20 s)."""
    backend = backend_of(triton_segserve, "colour_slow_triton")
    before = backend.pool.stats()
    batch = np.zeros((1, 3, H, W), np.float32)
    with pytest.raises(DeadlineExceeded, match="deadline passed while Triton server"):
        await backend.infer(batch, time.monotonic() + TRITON_SLOW_S / 6)
    after = backend.pool.stats()
    assert after.deadline_expiries == before.deadline_expiries + 1
    assert after.calls == before.calls + 1  # sent once: not retried on the other server
    assert after.ejections == before.ejections and after.retries == before.retries
    assert len(backend.pool.live) == 2
    with pytest.raises(DeadlineExceeded, match=r"before model .* batch was sent"):
        await backend.infer(batch, time.monotonic() - 1)  # nobody waits: never sent
    assert backend.pool.stats().calls == after.calls
    output = await backend.infer(batch, None)
    assert output.shape == (1, H, W)


async def test_an_expired_request_is_no_server_fault(triton_segserve, triton_stub):
    """End to end: a Segment whose deadline passes while Triton runs its batch answers
    DEADLINE_EXCEEDED, is counted so by the server, and leaves every server live."""
    model = "colour_slow_triton"
    backend = backend_of(triton_segserve, model)
    before = backend.pool.stats()
    counted = requests_counted(triton_segserve, model, "DEADLINE_EXCEEDED")
    request = pb.SegmentRequest(model=model, image=pb.Image(encoded=encode(quadrant_image())))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await triton_stub.Segment(request, timeout=TRITON_SLOW_S / 6)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 30
    while requests_counted(triton_segserve, model, "DEADLINE_EXCEEDED") == counted:
        assert time.monotonic() < deadline, "the server never counted the expired request"
        await asyncio.sleep(0.01)
    after = backend.pool.stats()
    assert after.ejections == before.ejections and after.retries == before.retries
    assert len(backend.pool.live) == 2
    answer = await triton_stub.Segment(request, timeout=60)  # the servers still serve
    assert answer.width == quadrant_image().shape[1]
