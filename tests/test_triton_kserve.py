"""segserve's KServe v2 / Triton port, driven by stock tritonclient (sync, asyncio, streaming).

Every repository model answers raw tensors exactly as Triton would, and `<model>.image` answers
encoded images with encoded masks; both go through the model's dynamic batcher.
"""

from __future__ import annotations

import asyncio
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.grpc import aio as ta
from tritonclient.grpc import service_pb2 as kserve
from tritonclient.grpc import service_pb2_grpc as kserve_grpc
from tritonclient.utils import InferenceServerException

from segserve_client import masks
from segserve_server.adapters.kserve_v2 import KServeServicer, kserve_handler
from segserve_server.core.tensors import InferRequest, InferResult, TensorAPI
from segserve_server.errors import InferenceFailed
from segserve_server.server import Server
from tests.conftest import H, W, encode, make_settings, quadrant_image
from tests.harness.synthetic_models import expected_colour_labels

pytestmark = pytest.mark.timeout(60)

QUADRANT = quadrant_image()
EXPECTED = expected_colour_labels(QUADRANT)


def as_tensor(rgb: np.ndarray) -> np.ndarray:
    """The colour models' input for an RGB image at their size: NCHW float32 on 0..1."""
    return (rgb.astype(np.float32) / 255.0).transpose(2, 0, 1)


def noise(seed: int, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def tensor_input(name: str, array: np.ndarray, datatype: str) -> tg.InferInput:
    tensor = tg.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


async def until(condition, timeout_s: float = 30.0) -> None:
    """Waits for `condition()` to hold (polled), failing the test after timeout_s."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def images_input(*images: bytes) -> tg.InferInput:
    array = np.empty(len(images), dtype=np.object_)
    array[:] = list(images)
    return tensor_input("IMAGE_BYTES", array, "BYTES")


@pytest.fixture(scope="session")
def kserve_url(server: Server) -> str:
    assert server.kserve_port
    return f"127.0.0.1:{server.kserve_port}"


@pytest.fixture
async def client(kserve_url):
    async with ta.InferenceServerClient(kserve_url) as aio_client:
        yield aio_client


async def expect_error(call, code: str, *fragments: str) -> str:
    with pytest.raises(InferenceServerException) as err:
        await call
    assert err.value.status() == f"StatusCode.{code}", str(err.value)
    for fragment in fragments:
        assert fragment in err.value.message(), err.value.message()
    return err.value.message()


async def test_server_and_model_discovery(client):
    assert await client.is_server_live() and await client.is_server_ready()
    metadata = await client.get_server_metadata()
    assert metadata.name == "segserve" and "segserve_image" in metadata.extensions
    for name in ("colour", "colour.image", "colour_logits.image"):
        assert await client.is_model_ready(name), name
    for name in ("broken_config", "missing_file", "missing_file.image", "no_such_model"):
        assert not await client.is_model_ready(name), name
    assert not await client.is_model_ready("colour_logits", "3")  # not loaded by version_policy

    index = await client.get_model_repository_index()
    states = {(m.name, m.version): (m.state, m.reason) for m in index.models}
    assert states[("colour", "1")] == ("READY", "")
    assert states[("colour.image", "1")] == ("READY", "")
    assert states[("colour_logits", "2")][0] == "READY"
    assert states[("missing_file", "1")][0] == "UNAVAILABLE"
    assert "missing" in states[("missing_file", "1")][1]
    assert states[("broken_config", "")][0] == "UNAVAILABLE"
    assert ("broken_config.image", "") not in states  # no config: not known to be segmentation


async def test_repository_index_of_ready_models(kserve_url):
    async with grpc.aio.insecure_channel(kserve_url) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        index = await stub.RepositoryIndex(kserve.RepositoryIndexRequest(ready=True))
    names = {m.name for m in index.models}
    assert {"colour", "colour.image", "colour_busy.image"} <= names
    assert not names & {"broken_config", "missing_file", "missing_file.image"}
    assert all(m.state == "READY" for m in index.models)


async def test_raw_model_metadata_and_config_are_tritons(client):
    metadata = await client.get_model_metadata("colour")
    assert metadata.platform == "onnxruntime_onnx" and list(metadata.versions) == ["1"]
    (model_input,) = metadata.inputs
    (model_output,) = metadata.outputs
    assert (model_input.name, model_input.datatype, list(model_input.shape)) == (
        "image",
        "FP32",
        [-1, 3, H, W],
    )
    assert (model_output.name, model_output.datatype, list(model_output.shape)) == (
        "labels",
        "UINT8",
        [-1, H, W],
    )
    config = (await client.get_model_config("colour")).config
    assert config.name == "colour" and config.max_batch_size == 8
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(config.input[0].dims) == [3, H, W]
    logits = await client.get_model_metadata("colour_logits")
    assert sorted(logits.versions) == ["1", "2"]
    assert list(logits.outputs[0].shape) == [-1, 5, H, W]


async def test_image_model_metadata_and_config(client):
    metadata = await client.get_model_metadata("colour.image")
    assert metadata.platform == "segserve_image"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("IMAGE_BYTES", "BYTES", [-1])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("MASK_BYTES", "BYTES", [-1]),
        ("MASK_SHAPE", "INT32", [-1, 2]),
        ("CLASS_PIXEL_COUNTS", "INT64", [-1, 5]),
    ]
    config = (await client.get_model_config("colour.image")).config
    assert config.parameters["segserve.model"].string_value == "colour"
    assert '"dark", "red"' in config.parameters["segserve.class_names"].string_value
    assert config.parameters["segserve.input_size"].string_value == f"{W}x{H}"


async def test_unknown_and_failed_models(client):
    await expect_error(client.get_model_metadata("no_such_model"), "NOT_FOUND", "no_such_model")
    await expect_error(client.get_model_metadata("missing_file"), "UNAVAILABLE", "missing")
    await expect_error(client.get_model_config("broken_config"), "UNAVAILABLE", "parse")
    await expect_error(
        client.get_model_metadata("colour_logits", "3"), "NOT_FOUND", "version_policy"
    )
    x = as_tensor(QUADRANT)[np.newaxis]
    await expect_error(
        client.infer("missing_file", [tensor_input("image", x, "FP32")]), "UNAVAILABLE"
    )


async def test_raw_tensors_sync_client(kserve_url):
    """A batch of 3 raw tensors through the stock sync client: Triton's answer, to the pixel."""
    images = [QUADRANT, noise(1), noise(2)]
    batch = np.stack([as_tensor(i) for i in images])

    def call() -> tg.InferResult:
        with tg.InferenceServerClient(kserve_url) as sync_client:
            return sync_client.infer(
                "colour",
                [tensor_input("image", batch, "FP32")],
                outputs=[tg.InferRequestedOutput("labels")],
                request_id="req-7",
            )

    result = await asyncio.to_thread(call)
    labels = result.as_numpy("labels")
    assert labels.dtype == np.uint8 and labels.shape == (3, H, W)
    for got, image in zip(labels, images, strict=True):
        np.testing.assert_array_equal(got, expected_colour_labels(image))
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("colour", "1", "req-7")


async def test_raw_scores_and_versions(client):
    x = as_tensor(noise(3))[np.newaxis]
    for version in ("1", "2", ""):
        result = await client.infer(
            "colour_logits", [tensor_input("image", x, "FP32")], model_version=version
        )
        scores = result.as_numpy("logits")
        assert scores.dtype == np.float32 and scores.shape == (1, 5, H, W)
        np.testing.assert_array_equal(scores[0].argmax(axis=0), expected_colour_labels(noise(3)))
        assert result.get_response().model_version == (version or "2")


async def test_typed_contents_are_accepted(kserve_url):
    """Tensors in InferTensorContents (not raw) work too, as Triton accepts them."""
    x = as_tensor(QUADRANT)[np.newaxis]
    request = kserve.ModelInferRequest(model_name="colour")
    request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    request.inputs[0].contents.fp32_contents.extend(x.reshape(-1).tolist())
    async with grpc.aio.insecure_channel(kserve_url) as channel:
        response = await kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    labels = np.frombuffer(response.raw_output_contents[0], np.uint8).reshape(
        response.outputs[0].shape
    )
    np.testing.assert_array_equal(labels[0], EXPECTED)


@pytest.mark.parametrize(
    ("shape", "datatype", "code", "fragments"),
    [
        ((9, 3, H, W), "FP32", "INVALID_ARGUMENT", ("batch size 9", "max_batch_size 8")),
        (
            (1, 3, H, W + 1),
            "FP32",
            "INVALID_ARGUMENT",
            (f"[1, 3, {H}, {W + 1}]", f"[-1, 3, {H}, {W}]"),
        ),
        ((1, 3, H, W), "FP64", "INVALID_ARGUMENT", ("datatype FP64", "FP32")),
        ((3, H, W), "FP32", "INVALID_ARGUMENT", (f"[3, {H}, {W}]",)),
    ],
)
async def test_raw_tensors_are_validated(client, shape, datatype, code, fragments):
    array = np.zeros(shape, dtype=np.float64 if datatype == "FP64" else np.float32)
    await expect_error(
        client.infer("colour", [tensor_input("image", array, datatype)]), code, *fragments
    )


async def test_malformed_requests_name_the_problem(kserve_url, client):
    x = as_tensor(QUADRANT)[np.newaxis]
    await expect_error(
        client.infer("colour", [tensor_input("pixels", x, "FP32")]),
        "INVALID_ARGUMENT",
        "'pixels'",
        "['image']",
    )
    await expect_error(
        client.infer(
            "colour",
            [tensor_input("image", x, "FP32")],
            outputs=[tg.InferRequestedOutput("masks")],
        ),
        "INVALID_ARGUMENT",
        "'masks'",
    )
    request = kserve.ModelInferRequest(model_name="colour")
    request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes()[:-4])
    async with grpc.aio.insecure_channel(kserve_url) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            f"{x.nbytes - 4} bytes" in err.value.details() and str(x.nbytes) in err.value.details()
        )
        garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await garbage(b"\xff\xff\xff")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await expect_error(client.get_trace_settings(), "UNIMPLEMENTED", "TraceSetting")


async def test_image_route_asyncio(client):
    png, jpeg = encode(QUADRANT), encode(noise(4, 90, 120), ".jpg")
    result = await client.infer("colour.image", [images_input(png, jpeg)])
    shapes = result.as_numpy("MASK_SHAPE")
    np.testing.assert_array_equal(shapes, [[H, W], [90, 120]])
    mask_bytes = result.as_numpy("MASK_BYTES")
    quadrant_mask = masks.decode_srle(mask_bytes[0])
    np.testing.assert_array_equal(quadrant_mask, EXPECTED)
    assert masks.decode_srle(mask_bytes[1]).shape == (90, 120)
    counts = result.as_numpy("CLASS_PIXEL_COUNTS")
    np.testing.assert_array_equal(counts[0], np.bincount(EXPECTED.ravel(), minlength=5))
    assert counts[1].sum() == 90 * 120


@pytest.mark.parametrize("encoding", ["png", "raw"])
async def test_image_route_encodings_and_sizes(client, encoding):
    big = np.repeat(np.repeat(QUADRANT, 3, axis=0), 3, axis=1)  # 144 x 192
    result = await client.infer(
        "colour.image",
        [images_input(encode(big))],
        outputs=[tg.InferRequestedOutput("MASK_BYTES"), tg.InferRequestedOutput("MASK_SHAPE")],
        parameters={"mask_encoding": encoding, "output_size": "model", "embed_palette": True},
    )
    assert result.as_numpy("CLASS_PIXEL_COUNTS") is None  # not asked for
    (height, width), data = result.as_numpy("MASK_SHAPE")[0], result.as_numpy("MASK_BYTES")[0]
    assert (height, width) == (H, W)
    if encoding == "png":
        labels, palette = masks.decode_png(data)
        assert palette is not None and palette[1] == (220, 40, 40)
    else:
        labels = np.frombuffer(data, np.uint8).reshape(height, width)
    np.testing.assert_array_equal(labels, EXPECTED)


async def test_image_route_errors(client):
    await expect_error(
        client.infer("colour.image", [images_input(encode(QUADRANT), b"not an image")]),
        "INVALID_ARGUMENT",
        "IMAGE_BYTES[1]",
    )
    for parameters, fragment in (
        ({"mask_encoding": "jpeg"}, "mask_encoding = 'jpeg'"),
        ({"output_size": "huge"}, "output_size"),
        ({"mask_encodin": "png"}, "'mask_encodin'"),
    ):
        await expect_error(
            client.infer("colour.image", [images_input(encode(QUADRANT))], parameters=parameters),
            "INVALID_ARGUMENT",
            fragment,
        )
    too_many = [encode(QUADRANT)] * 65
    await expect_error(
        client.infer("colour.image", [images_input(*too_many)]), "INVALID_ARGUMENT", "at most 64"
    )


async def test_raw_requests_share_the_dynamic_batcher(client, server):
    """colour_batch4 runs only full batches of 4: a request of batch 4 is one batch of 4 items,
    and two requests of batch 2 join into one."""
    version = server.core.models.get("colour_batch4")
    before = version.batch_stats.by_size.get(4, (0, 0.0))[0]
    x = np.stack([as_tensor(noise(i)) for i in range(4)])
    result = await client.infer("colour_batch4", [tensor_input("image", x, "FP32")])
    assert result.as_numpy("labels").shape == (4, H, W)
    halves = await asyncio.gather(
        *(
            client.infer("colour_batch4", [tensor_input("image", x[i : i + 2], "FP32")])
            for i in (0, 2)
        )
    )
    np.testing.assert_array_equal(
        np.concatenate([h.as_numpy("labels") for h in halves]), result.as_numpy("labels")
    )
    assert version.batch_stats.by_size[4][0] == before + 2
    stats = await client.get_inference_statistics("colour_batch4")
    (entry,) = stats.model_stats
    assert entry.execution_count >= 2 and any(b.batch_size == 4 for b in entry.batch_stats)


async def test_queue_limit_and_deadline_apply(client, server):
    """colour_queue2 queues at most 2 (and waits 30 s for 8): a batch of 3 is refused whole
    and leaves nothing queued; a deadline that passes in the queue is DEADLINE_EXCEEDED."""
    x = np.stack([as_tensor(QUADRANT)] * 3)
    await expect_error(
        client.infer("colour_queue2", [tensor_input("image", x, "FP32")]),
        "RESOURCE_EXHAUSTED",
        "limit 2",
    )
    batcher = server.core.models.get("colour_queue2").batcher
    await until(lambda: batcher.queue_depth == 0)

    def expired() -> float:
        value = server.core.metrics.registry.get_sample_value(
            "segserve_requests_total", {"model": "colour_queue2", "code": "DEADLINE_EXCEEDED"}
        )
        return value or 0.0

    def batches() -> float:
        value = server.core.metrics.registry.get_sample_value(
            "segserve_batch_size_count", {"model": "colour_queue2"}
        )
        return value or 0.0

    counted, ran = expired(), batches()
    # The call's own deadline: the server drops the request from its queue and counts it.
    await expect_error(
        client.infer("colour_queue2", [tensor_input("image", x[:1], "FP32")], client_timeout=0.5),
        "DEADLINE_EXCEEDED",
    )
    await until(lambda: expired() == counted + 1)
    # The `timeout` parameter (microseconds) is a queue timeout the model's queue policy lets
    # requests set (allow_timeout_override): the server's alone, its message segserve's.
    await expect_error(
        client.infer("colour_queue2", [tensor_input("image", x[:1], "FP32")], timeout=300_000),
        "DEADLINE_EXCEEDED",
        "queue timeout passed in colour_queue2",
    )
    await until(lambda: expired() == counted + 2 and batcher.queue_depth == 0)
    assert batches() == ran  # neither request ever ran


async def test_streaming_sync_client(kserve_url):
    """The sync client's stream: one answer per request, in order; a bad request gets its
    error in the stream and the stream goes on."""
    answers: queue.Queue = queue.Queue()
    good = images_input(encode(QUADRANT))
    bad = images_input(b"\x89PNG broken")

    def run() -> list:
        with tg.InferenceServerClient(kserve_url) as sync_client:
            sync_client.start_stream(callback=lambda result, error: answers.put((result, error)))
            for i, request in enumerate([good, bad, good, good]):
                sync_client.async_stream_infer("colour.image", [request], request_id=str(i))
            raw = as_tensor(QUADRANT)[np.newaxis]
            sync_client.async_stream_infer(
                "colour", [tensor_input("image", raw, "FP32")], request_id="4"
            )
            sync_client.stop_stream()
        return [answers.get(timeout=10) for _ in range(5)]

    got = await asyncio.to_thread(run)
    ids = []
    for index, (result, error) in enumerate(got):
        if index == 1:
            assert result is None and "INVALID_ARGUMENT" in str(error)
            continue
        assert error is None, error
        ids.append(result.get_response().id)
        if index < 4:
            np.testing.assert_array_equal(
                masks.decode_srle(result.as_numpy("MASK_BYTES")[0]), EXPECTED
            )
        else:
            np.testing.assert_array_equal(result.as_numpy("labels")[0], EXPECTED)
    assert ids == ["0", "2", "3", "4"]


async def test_streaming_asyncio_client(client):
    images = [noise(10 + i, 40 + i, 50 + i) for i in range(6)]

    async def requests():
        for i, image in enumerate(images):
            yield {
                "model_name": "colour.image",
                "inputs": [images_input(encode(image))],
                "request_id": f"f{i}",
            }
        yield {"model_name": "no_such_model", "inputs": [images_input(b"x")], "request_id": "bad"}

    answers = [answer async for answer in client.stream_infer(requests())]
    assert len(answers) == 7
    for i, (result, error) in enumerate(answers[:6]):
        assert error is None, error
        assert result.get_response().id == f"f{i}"
        labels = masks.decode_srle(result.as_numpy("MASK_BYTES")[0])
        assert labels.shape == images[i].shape[:2]
    result, error = answers[6]
    assert result is None and str(error).startswith("NOT_FOUND: ")


async def test_statistics_count_requests(client):
    before = {s.name: s for s in (await client.get_inference_statistics()).model_stats}
    await client.infer("colour.image", [images_input(encode(QUADRANT), encode(QUADRANT))])
    with pytest.raises(InferenceServerException):
        await client.infer("colour.image", [images_input(b"junk")])
    (after,) = (await client.get_inference_statistics("colour.image")).model_stats
    previous = before.get("colour.image")
    old_count = previous.inference_count if previous else 0
    old_success = previous.inference_stats.success.count if previous else 0
    old_fail = previous.inference_stats.fail.count if previous else 0
    assert after.inference_count == old_count + 2
    assert after.inference_stats.success.count == old_success + 1
    assert after.inference_stats.fail.count == old_fail + 1
    assert after.inference_stats.compute_input.ns > 0 and after.last_inference > 0
    await expect_error(client.get_inference_statistics("nope"), "NOT_FOUND")


async def test_health_and_reflection_on_the_kserve_port(kserve_url):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    async with grpc.aio.insecure_channel(kserve_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

    def services() -> list[str]:
        with grpc.insecure_channel(kserve_url) as channel:
            return list(ProtoReflectionDescriptorDatabase(channel).get_services())

    assert "inference.GRPCInferenceService" in await asyncio.to_thread(services)


async def test_stream_drains_on_stop(repository):
    """Stopping the server answers every request a KServe stream has sent, then ends it with
    UNAVAILABLE; ServerReady turns false while it drains."""
    server = Server(make_settings(repository))
    await server.start()
    url = f"127.0.0.1:{server.kserve_port}"
    busy = encode(noise(5, 256, 256))
    sent = asyncio.Event()

    async def requests():
        for i in range(4):
            yield {
                "model_name": "colour_busy.image",
                "inputs": [images_input(busy)],
                "request_id": str(i),
            }
        sent.set()
        await asyncio.sleep(30)  # the client keeps the stream open; the server ends it

    async with ta.InferenceServerClient(url) as aio_client:
        answers = aio_client.stream_infer(requests())
        first = await anext(answers)
        await sent.wait()

        def reached_the_core() -> float:  # in flight, or answered, on this fresh server
            registry = server.core.metrics.registry
            inflight = registry.get_sample_value(
                "segserve_inflight_requests", {"model": "colour_busy"}
            )
            answered = registry.get_sample_value(
                "segserve_requests_total", {"model": "colour_busy", "code": "OK"}
            )
            return (inflight or 0.0) + (answered or 0.0)

        await until(lambda: reached_the_core() == 4)  # the server read all four
        stopping = asyncio.create_task(server.stop(timeout_s=20))
        got = [first]
        with pytest.raises(Exception) as ended:
            async for answer in answers:
                got.append(answer)
        assert [r.get_response().id for r, e in got if e is None] == ["0", "1", "2", "3"]
        assert "draining" in str(ended.value)
        await stopping


async def test_kserve_port_can_be_disabled(repository):
    server = Server(make_settings(repository, kserve_port=None))
    await server.start()
    try:
        assert server.kserve_port is None and server.port
    finally:
        await server.stop(timeout_s=5)


def raw_colour_request(request_id: str) -> kserve.ModelInferRequest:
    """A ModelInferRequest for the raw `colour` model, one image of QUADRANT."""
    x = as_tensor(QUADRANT)[np.newaxis]
    request = kserve.ModelInferRequest(model_name="colour", id=request_id)
    request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


class CountingAPI(TensorAPI):
    """A TensorAPI that counts the requests it starts and finishes, and fails request "boom"
    with an unexpected (non-SegserveError) exception."""

    def __init__(self, server: Server) -> None:
        super().__init__(server.core, max_images_per_request=4)
        self.started = 0
        self.finished = 0
        self.changed = asyncio.Event()

    async def infer(self, request: InferRequest, deadline_s: float | None) -> InferResult:
        self.started += 1
        try:
            if request.parameters.get("boom"):
                raise RuntimeError("kaboom")
            return await super().infer(request, deadline_s)
        finally:
            self.finished += 1
            self.changed.set()

    async def wait_finished(self, count: int) -> None:
        while self.finished < count:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 30)


class FakeContext:
    def time_remaining(self) -> None:
        return None


async def test_stream_reads_no_further_than_unsent_answers_allow(server):
    """A client that stops reading answers stops the server: at most max_inflight_requests
    requests are run (and answered) ahead of what the client has read."""
    limit, total = 2, 6
    api = CountingAPI(server)
    servicer = KServeServicer(api, max_inflight_requests=limit)
    pulled = 0
    pulled_past_limit = asyncio.Event()

    async def frames():
        nonlocal pulled
        for i in range(total):
            pulled += 1
            if pulled > limit:
                pulled_past_limit.set()
            yield raw_colour_request(str(i))

    answers = servicer.ModelStreamInfer(frames(), FakeContext())
    first = await anext(answers)  # then hold: the answer stream is not read further
    assert first.error_message == "" and first.infer_response.id == "0"
    await api.wait_finished(limit)
    await asyncio.wait_for(pulled_past_limit.wait(), 30)
    for _ in range(50):  # let the event loop run whatever is ready: nothing more may start
        await asyncio.sleep(0)
    assert api.started == limit
    assert pulled == limit + 1  # the reader waits for a slot with one request in hand

    rest = [answer async for answer in answers]
    assert [a.infer_response.id for a in rest] == [str(i) for i in range(1, total)]
    assert all(a.error_message == "" for a in rest)
    assert api.started == api.finished == total


async def test_unexpected_errors_are_internal_and_the_stream_goes_on(server):
    api = CountingAPI(server)
    grpc_server = grpc.aio.server()
    grpc_server.add_generic_rpc_handlers(
        (kserve_handler(KServeServicer(api, max_inflight_requests=4)),)
    )
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    boom = raw_colour_request("boom")
    boom.parameters["boom"].bool_param = True
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kserve_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ModelInfer(boom)
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "kaboom" in (err.value.details() or "")

            requests = [raw_colour_request("a"), boom, raw_colour_request("b")]
            answers = [answer async for answer in stub.ModelStreamInfer(iter(requests))]
    finally:
        await grpc_server.stop(None)
    assert [a.infer_response.id for a in answers] == ["a", "boom", "b"]
    assert answers[0].error_message == answers[2].error_message == ""
    assert (
        answers[1].error_message.startswith("INTERNAL: ") and "kaboom" in answers[1].error_message
    )


async def test_tensor_api_turns_unexpected_errors_into_inference_failed(server, monkeypatch):
    api = TensorAPI(server.core, max_images_per_request=4)

    async def broken(*args, **kwargs):
        raise RuntimeError("backend exploded")

    monkeypatch.setattr(api, "_infer_tensors", broken)
    x = as_tensor(QUADRANT)[np.newaxis]
    with pytest.raises(InferenceFailed, match="backend exploded"):
        await api.infer(InferRequest(route="colour", version=0, inputs={"image": x}), None)
    assert api.version_stats(api.route("colour"), 1).fail.count == 1


async def test_malformed_stream_request_is_answered_in_its_place(kserve_url):
    """The rule of both stream APIs: a request that does not parse gets INVALID_ARGUMENT in its
    place, in order, and the stream goes on."""
    frames = [
        raw_colour_request("a").SerializeToString(),
        b"\xff\xff\xff not a request",
        raw_colour_request("c").SerializeToString(),
    ]
    async with grpc.aio.insecure_channel(kserve_url) as channel:
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")(
            iter(frames)
        )
        answers = [kserve.ModelStreamInferResponse.FromString(a) async for a in call]
        assert await call.code() == grpc.StatusCode.OK
    assert [a.infer_response.id for a in answers] == ["a", "", "c"]
    assert answers[0].error_message == answers[2].error_message == ""
    assert answers[1].error_message.startswith("INVALID_ARGUMENT: ")
    assert "not a valid inference.ModelInferRequest" in answers[1].error_message


async def test_tensor_requests_are_counted_and_timed_like_images(client, server):
    """The raw-tensor route runs through the core: the same request counter, end-to-end latency
    and stage histograms as the image route."""
    registry = server.core.metrics.registry

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {"model": "colour", **labels}) or 0.0

    before = (
        value("segserve_requests_total", code="OK"),
        value("segserve_request_duration_seconds_count"),
        value("segserve_stage_duration_seconds_count", stage="infer"),
        value("segserve_stage_duration_seconds_count", stage="queue"),
    )
    x = np.stack([as_tensor(QUADRANT)] * 2)
    result = await client.infer("colour", [tensor_input("image", x, "FP32")])
    assert result.as_numpy("labels").shape == (2, H, W)
    after = (
        value("segserve_requests_total", code="OK"),
        value("segserve_request_duration_seconds_count"),
        value("segserve_stage_duration_seconds_count", stage="infer"),
        value("segserve_stage_duration_seconds_count", stage="queue"),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1]
