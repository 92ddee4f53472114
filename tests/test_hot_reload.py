"""Hot reload of the model repository: polling, explicit load/unload (KServe, tritonclient,
segserve.v1 ModelRepository), swaps under load with no failed request, broken versions and
configs that leave the old one serving and say why. Real servers on loopback, real ONNX models
written into a repository of the test's own."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as kserve
from tritonclient.grpc import service_pb2_grpc as kserve_grpc
from tritonclient.utils import InferenceServerException

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_server.adapters.repository_v1 import ADMIN_METHODS
from segserve_server.server import Server
from tests.conftest import H, W, encode, make_settings, quadrant_image
from tests.harness.synthetic_models import write_broken_version, write_entry, write_version

WAIT_S = 60.0  # a backstop only: every wait ends on the state it waits for
IMAGE = encode(quadrant_image())


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Polls check() (an RPC reading state) until it holds; fails after WAIT_S."""
    ends_s = time.monotonic() + WAIT_S
    while not await check():
        if time.monotonic() > ends_s:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.01)


class Client:
    """Stubs of one server: segserve.v1 (and its ModelRepository), KServe, health."""

    def __init__(self, server: Server, main: grpc.aio.Channel, kserve_ch: grpc.aio.Channel):
        self.server = server
        self.seg = pb_grpc.SegmentationStub(main)
        self.repo = pb_grpc.ModelRepositoryStub(main)
        self.kserve = kserve_grpc.GRPCInferenceServiceStub(kserve_ch)
        self.health = health_pb2_grpc.HealthStub(main)

    async def segment(self, model: str = "colour") -> pb.SegmentResponse:
        request = pb.SegmentRequest(model=model, image=pb.Image(encoded=IMAGE))
        return await self.seg.Segment(request, timeout=WAIT_S)

    async def summary(self, model: str = "colour") -> pb.ModelSummary | None:
        listed = await self.seg.ListModels(pb.ListModelsRequest())
        return next((m for m in listed.models if m.name == model), None)

    async def serving_version(self, model: str = "colour") -> int:
        summary = await self.summary(model)
        return summary.serving_version if summary else 0

    async def health_of(self, model: str) -> int:
        answer = await self.health.Check(health_pb2.HealthCheckRequest(service=model))
        status: int = answer.status
        return status

    def ready_gauge(self, model: str, version: int) -> float | None:
        return self.server.core.metrics.registry.get_sample_value(
            "segserve_model_ready", {"model": model, "version": str(version)}
        )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repository"
    write_entry(root, "colour", H, W, max_batch_size=4, max_queue_delay_us=1000)
    return root


async def _client(repo: Path, **settings: object) -> AsyncIterator[Client]:
    server = Server(make_settings(repo, **settings))
    await server.start()
    assert server.kserve_port is not None
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as main,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.kserve_port}") as kserve_ch,
        ):
            yield Client(server, main, kserve_ch)
    finally:
        await server.stop(timeout_s=10)


@pytest.fixture
async def polled(repo: Path) -> AsyncIterator[Client]:
    """A server polling `repo` every 20 ms."""
    async for client in _client(repo, repository_poll_interval_s=0.02):
        yield client


@pytest.fixture
async def explicit(repo: Path) -> AsyncIterator[Client]:
    """A server that reads `repo` at start and then only on explicit loads."""
    async for client in _client(repo):
        yield client


async def test_poll_swaps_in_a_new_version_under_load_with_no_failed_request(
    polled: Client, repo: Path
) -> None:
    workers = 24
    stop = asyncio.Event()
    seen: list[set[int]] = [set() for _ in range(workers)]
    first_answer = [asyncio.Event() for _ in range(workers)]
    failures: list[str] = []
    answered = 0

    async def work(index: int) -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                response = await polled.segment()
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")
                continue
            answered += 1
            seen[index].add(response.model_version)
            first_answer[index].set()

    tasks = [asyncio.create_task(work(i)) for i in range(workers)]
    try:
        for event in first_answer:
            await asyncio.wait_for(event.wait(), WAIT_S)
        assert all(s == {1} for s in seen)
        write_version(repo / "colour", 2, H, W)
        await until(lambda: _serves(polled, 2), "version 2 to serve")
        # Every worker must have got answers from the new version too: the swap happened
        # while all of them kept sending.
        await until(lambda: _all_saw(seen, 2), "every worker to be answered by version 2")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert failures == []
    assert answered > workers * 2
    # version_policy (latest 1): version 1 is retired and drained.
    index = await polled.repo.RepositoryIndex(pb.RepositoryIndexRequest())
    (model,) = index.models
    assert [(v.version, v.state) for v in model.versions] == [(2, pb.MODEL_STATE_READY)]
    await until(lambda: _no_retiring(polled), "version 1 to be drained and released")
    assert polled.ready_gauge("colour", 1) == 0
    assert polled.ready_gauge("colour", 2) == 1


async def _serves(client: Client, version: int) -> bool:
    return await client.serving_version() == version


async def _all_saw(seen: list[set[int]], version: int) -> bool:
    return all(version in s for s in seen)


async def _no_retiring(client: Client) -> bool:
    return not client.server.core.models._retiring


async def test_explicit_kserve_load_swaps_while_a_request_holds_the_old_version(
    explicit: Client, repo: Path
) -> None:
    models = explicit.server.core.models
    tensor = np.zeros((3, H, W), dtype=np.float32)
    with models.lease("colour") as old:
        assert old.version == 1
        write_version(repo / "colour", 2, H, W)
        assert (await explicit.segment()).model_version == 1  # not polled: nothing changed yet
        await explicit.kserve.RepositoryModelLoad(
            kserve.RepositoryModelLoadRequest(model_name="colour")
        )
        assert (await explicit.segment()).model_version == 2
        # The request that looked version 1 up before the swap still runs on it.
        outcome = await old.batcher.submit(tensor)
        assert outcome.output.shape == (H, W)
        assert not old.lease.closed
    await until(lambda: _no_retiring(explicit), "version 1 to drain once its lease is back")
    assert old.lease.closed
    index = await explicit.kserve.RepositoryIndex(kserve.RepositoryIndexRequest())
    assert [(m.name, m.version, m.state) for m in index.models if m.name == "colour"] == [
        ("colour", "2", "READY")
    ]
    # A changed config.pbtxt reloads the same version with the new config.
    config = repo / "colour" / "config.pbtxt"
    config.write_text(config.read_text().replace("Synthetic, untrained", "Reloaded"))
    await explicit.kserve.RepositoryModelLoad(
        kserve.RepositoryModelLoadRequest(model_name="colour")
    )
    info = await explicit.seg.GetModel(pb.GetModelRequest(name="colour"))
    assert info.description.startswith("Reloaded") and info.version == 2
    assert (await explicit.segment()).model_version == 2


async def test_broken_new_version_keeps_the_old_one_serving_and_says_why(
    polled: Client, repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="segserve_server.core.models")
    write_broken_version(repo / "colour", 2)
    await until(lambda: _reason_mentions(polled, "version 2 failed"), "the failure reported")
    summary = await polled.summary()
    assert summary is not None
    assert summary.state == pb.MODEL_STATE_READY and summary.serving_version == 1
    assert "still serving version 1" in summary.reason
    assert (await polled.segment()).model_version == 1
    failed = await polled.seg.GetModel(pb.GetModelRequest(name="colour", version=2))
    assert failed.state == pb.MODEL_STATE_FAILED and "onnxruntime cannot load" in failed.reason
    index = await polled.kserve.RepositoryIndex(kserve.RepositoryIndexRequest())
    states = {m.version: (m.state, m.reason) for m in index.models if m.name == "colour"}
    assert states["1"] == ("READY", "")
    assert states["2"][0] == "UNAVAILABLE" and "onnxruntime cannot load" in states["2"][1]
    assert "model colour version 2 failed to load" in caplog.text
    with pytest.raises(grpc.aio.AioRpcError) as load:
        await polled.kserve.RepositoryModelLoad(
            kserve.RepositoryModelLoadRequest(model_name="colour")
        )
    assert load.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "version 2" in (load.value.details() or "")

    # A config.pbtxt broken now: the old config keeps serving, the error is reported.
    config = repo / "colour" / "config.pbtxt"
    good = config.read_text()
    config.write_text('name: "colour" input [')
    await until(lambda: _reason_mentions(polled, "config.pbtxt failed"), "the config error")
    assert (await polled.segment()).model_version == 1
    info = await polled.seg.GetModel(pb.GetModelRequest(name="colour"))
    assert info.state == pb.MODEL_STATE_READY and "does not parse" in info.reason

    # Both fixed: version 2 serves and the reasons are gone.
    config.write_text(good)
    shutil.rmtree(repo / "colour" / "2")
    write_version(repo / "colour", 2, H, W)
    await until(lambda: _serves(polled, 2), "the fixed version 2 to serve")
    summary = await polled.summary()
    assert summary is not None and summary.reason == ""
    assert (await polled.segment()).model_version == 2


async def _reason_mentions(client: Client, text: str) -> bool:
    summary = await client.summary()
    return summary is not None and text in summary.reason


async def test_unload_answers_unavailable_and_load_serves_again(polled: Client) -> None:
    assert await polled.health_of("colour") == health_pb2.HealthCheckResponse.SERVING
    await polled.kserve.RepositoryModelUnload(
        kserve.RepositoryModelUnloadRequest(model_name="colour")
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await polled.segment()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "unloaded by request" in (refused.value.details() or "")
    await until(
        lambda: _health_is(polled, "colour", health_pb2.HealthCheckResponse.NOT_SERVING),
        "health NOT_SERVING",
    )
    assert polled.ready_gauge("colour", 1) == 0
    summary = await polled.summary()
    assert summary is not None and summary.state == pb.MODEL_STATE_UNLOADED
    # The poll leaves a model unloaded by request alone.
    polls = polled.server.core.models.polls
    await until(lambda: _polled_past(polled, polls + 3), "three more polls")
    with pytest.raises(grpc.aio.AioRpcError):
        await polled.segment()

    await polled.kserve.RepositoryModelLoad(kserve.RepositoryModelLoadRequest(model_name="colour"))
    assert (await polled.segment()).model_version == 1
    await until(
        lambda: _health_is(polled, "colour", health_pb2.HealthCheckResponse.SERVING),
        "health SERVING again",
    )
    assert polled.ready_gauge("colour", 1) == 1


async def _health_is(client: Client, model: str, status: int) -> bool:
    return await client.health_of(model) == status


async def _polled_past(client: Client, polls: int) -> bool:
    return client.server.core.models.polls >= polls


async def test_poll_adds_and_removes_models(polled: Client, repo: Path, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    write_entry(staging, "colour_new", H, W)
    (staging / "colour_new").rename(repo / "colour_new")
    await until(lambda: _serves_model(polled, "colour_new"), "colour_new to serve")
    assert (await polled.segment("colour_new")).model_version == 1
    await until(
        lambda: _health_is(polled, "colour_new", health_pb2.HealthCheckResponse.SERVING),
        "colour_new health SERVING",
    )
    (repo / "colour_new").rename(staging / "gone")
    await until(lambda: _listed(polled, "colour_new", False), "colour_new to be removed")
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await polled.segment("colour_new")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert polled.ready_gauge("colour_new", 1) == 0
    await until(
        lambda: _health_is(polled, "colour_new", health_pb2.HealthCheckResponse.NOT_SERVING),
        "colour_new health NOT_SERVING once removed",
    )
    assert (await polled.segment()).model_version == 1  # the others are untouched


async def _serves_model(client: Client, model: str) -> bool:
    return await client.serving_version(model) == 1


async def _listed(client: Client, model: str, present: bool) -> bool:
    return (await client.summary(model) is not None) == present


async def test_tritonclient_load_unload_and_repository_index(explicit: Client, repo: Path) -> None:
    def with_tritonclient() -> None:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{explicit.server.kserve_port}")
        index = client.get_model_repository_index(as_json=True)
        assert {"name": "colour", "version": "1", "state": "READY"} in index["models"]
        client.unload_model("colour")
        assert not client.is_model_ready("colour")
        index = client.get_model_repository_index(as_json=True)
        (entry,) = [m for m in index["models"] if m["name"] == "colour"]
        assert entry["state"] == "UNAVAILABLE" and "unloaded" in entry["reason"]
        client.load_model("colour")
        assert client.is_model_ready("colour")
        # The "config" override: Triton's model config as JSON, instead of config.pbtxt.
        config = client.get_model_config("colour", as_json=True)["config"]
        config["parameters"]["segserve.description"] = {"string_value": "overridden"}
        client.load_model("colour", config=json.dumps(config))
        assert client.is_model_ready("colour")
        with pytest.raises(InferenceServerException, match="file overrides"):
            client.load_model("colour", files={"file:1/model.onnx": b"x"})
        with pytest.raises(InferenceServerException, match="not a model config in JSON"):
            client.load_model("colour", config="{not json")
        with pytest.raises(InferenceServerException, match="not in the repository"):
            client.load_model("no_such_model")
        client.close()

    await asyncio.to_thread(with_tritonclient)
    info = await explicit.seg.GetModel(pb.GetModelRequest(name="colour"))
    assert info.description == "overridden"
    assert (await explicit.segment()).model_version == 1


async def test_segserve_v1_model_repository_admin_rpcs(explicit: Client, repo: Path) -> None:
    assert "/segserve.v1.ModelRepository/LoadModel" in ADMIN_METHODS
    assert "/inference.GRPCInferenceService/RepositoryModelUnload" in ADMIN_METHODS
    index = await explicit.repo.RepositoryIndex(pb.RepositoryIndexRequest())
    (model,) = index.models
    assert (model.name, model.state, model.serving_version) == ("colour", pb.MODEL_STATE_READY, 1)
    unloaded = await explicit.repo.UnloadModel(pb.UnloadModelRequest(name="colour"))
    assert unloaded.model.state == pb.MODEL_STATE_UNLOADED
    ready = await explicit.repo.RepositoryIndex(pb.RepositoryIndexRequest(ready_only=True))
    assert list(ready.models) == []
    write_version(repo / "colour", 2, H, W)
    loaded = await explicit.repo.LoadModel(pb.LoadModelRequest(name="colour"))
    assert (loaded.model.state, loaded.model.serving_version) == (pb.MODEL_STATE_READY, 2)
    assert [v.version for v in loaded.model.versions] == [2]
    assert (await explicit.segment()).model_version == 2
    write_broken_version(repo / "colour", 3)
    with pytest.raises(grpc.aio.AioRpcError) as broken:
        await explicit.repo.LoadModel(pb.LoadModelRequest(name="colour"))
    assert broken.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "version 3" in (broken.value.details() or "")
    assert (await explicit.segment()).model_version == 2
    for call, request in (
        (explicit.repo.LoadModel, pb.LoadModelRequest(name="nope")),
        (explicit.repo.UnloadModel, pb.UnloadModelRequest(name="nope")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await call(request)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'nope'" in (missing.value.details() or "")


async def test_a_load_whose_caller_goes_away_still_completes(explicit: Client, repo: Path) -> None:
    """An explicit load whose RPC is cancelled midway runs to its end: version 2 is swapped
    in (not left started and leaked, with the folder marked as seen)."""
    write_version(repo / "colour", 2, H, W)
    manager = explicit.server.core.models
    load = asyncio.ensure_future(manager.load("colour"))
    await asyncio.sleep(0)  # it has started
    load.cancel()
    with pytest.raises(asyncio.CancelledError):
        await load
    await until(lambda: _serves(explicit, 2), "version 2 to serve after the cancelled load")
    await until(lambda: _no_retiring(explicit), "version 1 to be retired")


async def test_poll_follows_a_symlinked_version_folder(
    polled: Client, repo: Path, tmp_path: Path
) -> None:
    """Version folders may be symlinks to builds elsewhere: a change inside the build is seen."""
    builds = tmp_path / "builds"
    builds.mkdir()
    build = write_version(builds, 2, H, W)
    (repo / "colour" / "2").symlink_to(build, target_is_directory=True)
    await until(lambda: _serves(polled, 2), "the symlinked version 2 to serve")
    (build / "model.onnx").write_bytes(b"this is not an ONNX model")  # a change inside the link
    await until(lambda: _reason_mentions(polled, "version 2"), "the changed build to be reloaded")
    assert (await polled.segment()).model_version == 2  # the version loaded before serves on
