"""The KServe v2 REST protocol on segserve's HTTP port, driven by stock tritonclient.http (sync
and asyncio) over real HTTP: JSON and binary tensors, raw and `.image` models, metadata, config,
index, statistics, health, and errors with their HTTP statuses."""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as th
import tritonclient.http.aio as tha
from tritonclient.utils import InferenceServerException

from segserve_client import masks
from segserve_server.server import Server
from tests.conftest import H, W, encode, quadrant_image
from tests.harness.synthetic_models import expected_colour_labels

pytestmark = pytest.mark.timeout(60)

QUADRANT = quadrant_image()
EXPECTED = expected_colour_labels(QUADRANT)


def as_tensor(rgb: np.ndarray) -> np.ndarray:
    """The colour models' input for an RGB image at their size: NCHW float32 on 0..1."""
    return (rgb.astype(np.float32) / 255.0).transpose(2, 0, 1)


def noise(seed: int, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def tensor(name: str, array: np.ndarray, datatype: str, *, binary: bool = True) -> th.InferInput:
    value = th.InferInput(name, list(array.shape), datatype)
    value.set_data_from_numpy(array, binary_data=binary)
    return value


def images(*encoded: bytes) -> th.InferInput:
    array = np.empty(len(encoded), dtype=np.object_)
    array[:] = list(encoded)
    return tensor("IMAGE_BYTES", array, "BYTES")


@pytest.fixture(scope="session")
def http_url(server: Server) -> str:
    assert server.http_port
    return f"127.0.0.1:{server.http_port}"


@pytest.fixture
async def client(http_url):
    aio_client = tha.InferenceServerClient(http_url)
    try:
        yield aio_client
    finally:
        await aio_client.close()


async def expect_error(call, status: int, *fragments: str) -> str:
    with pytest.raises(InferenceServerException) as err:
        await call
    assert err.value.status() == str(status), str(err.value)
    for fragment in fragments:
        assert fragment in err.value.message(), err.value.message()
    return err.value.message()


async def test_health_metadata_config_sync_client(http_url):
    """The stock sync client (geventhttpclient) on every discovery call."""

    def calls() -> dict:
        with th.InferenceServerClient(http_url) as c:
            return {
                "live": c.is_server_live(),
                "ready": c.is_server_ready(),
                "server": c.get_server_metadata(),
                "model_ready": c.is_model_ready("colour"),
                "image_ready": c.is_model_ready("colour.image"),
                "v2_ready": c.is_model_ready("colour_logits", "2"),
                "v3_ready": c.is_model_ready("colour_logits", "3"),  # not in its version policy
                "failed_ready": c.is_model_ready("broken_config"),
                "unknown_ready": c.is_model_ready("no_such_model"),
                "metadata": c.get_model_metadata("colour"),
                "v2_metadata": c.get_model_metadata("colour_logits", "2"),
                "config": c.get_model_config("colour"),
                "image_config": c.get_model_config("colour.image"),
                "index": c.get_model_repository_index(),
            }

    got = await asyncio.to_thread(calls)
    assert got["live"] and got["ready"] and got["model_ready"] and got["image_ready"]
    assert got["v2_ready"] and not got["v3_ready"]
    assert not got["failed_ready"] and not got["unknown_ready"]
    assert got["server"]["name"] == "segserve" and "statistics" in got["server"]["extensions"]
    assert got["metadata"] == {
        "name": "colour",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, H, W]}],
        "outputs": [{"name": "labels", "datatype": "UINT8", "shape": [-1, H, W]}],
    }
    assert got["v2_metadata"]["versions"] == ["1", "2"]
    config = got["config"]
    assert config["name"] == "colour" and config["max_batch_size"] == 8
    assert config["input"][0]["dims"] == [3, H, W]  # numbers, as Triton prints them
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    image_config = got["image_config"]
    assert image_config["input"][0]["name"] == "IMAGE_BYTES"
    assert json.loads(image_config["parameters"]["segserve.class_names"]["string_value"]) == [
        "dark",
        "red",
        "green",
        "blue",
        "bright",
    ]
    index = {(m["name"], m.get("version", "")): m["state"] for m in got["index"]}
    assert index[("colour", "1")] == "READY" and index[("colour.image", "1")] == "READY"
    assert index[("broken_config", "")] == "UNAVAILABLE"


async def test_raw_tensors_binary_sync_client(http_url):
    """A batch of 3 raw tensors, binary both ways, through the sync client: to the pixel."""
    pictures = [QUADRANT, noise(1), noise(2)]
    batch = np.stack([as_tensor(p) for p in pictures])

    def call() -> th.InferResult:
        with th.InferenceServerClient(http_url) as c:
            return c.infer(
                "colour",
                [tensor("image", batch, "FP32")],
                outputs=[th.InferRequestedOutput("labels", binary_data=True)],
                request_id="req-7",
            )

    result = await asyncio.to_thread(call)
    labels = result.as_numpy("labels")
    assert labels.dtype == np.uint8 and labels.shape == (3, H, W)
    for got, picture in zip(labels, pictures, strict=True):
        np.testing.assert_array_equal(got, expected_colour_labels(picture))
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (
        "colour",
        "1",
        "req-7",
    )
    assert response["outputs"][0]["parameters"]["binary_data_size"] == 3 * H * W


@pytest.mark.parametrize("binary_in", [False, True])
async def test_raw_tensors_json_asyncio(client, binary_in):
    """JSON input or binary input, JSON output (binary_data=False): the same answer."""
    x = np.stack([as_tensor(QUADRANT), as_tensor(noise(3))])
    result = await client.infer(
        "colour_logits",
        [tensor("image", x, "FP32", binary=binary_in)],
        outputs=[tha.InferRequestedOutput("logits", binary_data=False)],
        model_version="2",
    )
    response = result.get_response()
    assert response["model_version"] == "2"
    assert "data" in response["outputs"][0]  # JSON, not binary
    logits = result.as_numpy("logits")
    assert logits.shape == (2, 5, H, W)
    np.testing.assert_array_equal(logits[0].argmax(axis=0), EXPECTED)
    np.testing.assert_array_equal(logits[1].argmax(axis=0), expected_colour_labels(noise(3)))


async def test_image_route_binary_asyncio(client):
    png, jpeg = encode(QUADRANT), encode(noise(4, 90, 120), ".jpg")
    result = await client.infer(
        "colour.image", [images(png, jpeg)], parameters={"mask_encoding": "png"}
    )
    np.testing.assert_array_equal(result.as_numpy("MASK_SHAPE"), [[H, W], [90, 120]])
    mask_bytes = result.as_numpy("MASK_BYTES")
    np.testing.assert_array_equal(masks.decode_png(mask_bytes[0])[0], EXPECTED)
    assert masks.decode_png(mask_bytes[1])[0].shape == (90, 120)
    counts = result.as_numpy("CLASS_PIXEL_COUNTS")
    np.testing.assert_array_equal(counts[0], np.bincount(EXPECTED.ravel(), minlength=5))
    assert counts[1].sum() == 90 * 120


async def test_image_route_sync_client_with_gzip(http_url):
    """The sync client compressing its request (Content-Encoding: gzip)."""

    def call() -> th.InferResult:
        with th.InferenceServerClient(http_url) as c:
            return c.infer(
                "colour.image",
                [images(encode(QUADRANT))],
                outputs=[th.InferRequestedOutput("MASK_BYTES")],
                request_compression_algorithm="gzip",
            )

    result = await asyncio.to_thread(call)
    assert result.as_numpy("MASK_SHAPE") is None  # only what was asked for
    np.testing.assert_array_equal(masks.decode_srle(result.as_numpy("MASK_BYTES")[0]), EXPECTED)


async def test_statistics_count_requests(client, http_url):
    before = await client.get_inference_statistics("colour", "1")
    x = as_tensor(QUADRANT)[None]
    for _ in range(2):
        await client.infer("colour", [tensor("image", x, "FP32")])
    after = await client.get_inference_statistics("colour", "1")
    (old,), (new,) = before["model_stats"], after["model_stats"]
    assert new["inference_count"] == old["inference_count"] + 2
    success = new["inference_stats"]["success"]
    assert success["count"] == old["inference_stats"]["success"]["count"] + 2
    assert isinstance(success["ns"], int) and success["ns"] > 0
    every = await client.get_inference_statistics()
    names = {s["name"] for s in every["model_stats"]}
    assert {"colour", "colour.image", "colour_logits"} <= names


async def test_errors_have_tritons_shape_and_http_statuses(client, http_url):
    x = as_tensor(QUADRANT)[None]
    await expect_error(
        client.infer("no_such_model", [tensor("image", x, "FP32")]), 404, "no_such_model"
    )
    await expect_error(
        client.infer("colour", [tensor("image", x[:, :2], "FP32")]), 400, "shape [1, 2, 48, 64]"
    )
    await expect_error(
        client.infer("colour", [tensor("image", x.astype(np.float64), "FP64")]),
        400,
        "datatype FP64",
    )
    await expect_error(client.infer("broken_config", [tensor("image", x, "FP32")]), 503)
    await expect_error(client.get_model_metadata("colour", "9"), 404, "version 9")
    await expect_error(
        client.infer("colour.image", [images(b"not an image")]), 400, "IMAGE_BYTES[0]"
    )
    async with httpx.AsyncClient(base_url=f"http://{http_url}") as raw:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"content": b"{not json"}, "not JSON"),
            ({"json": {"inputs": []}}, "no inputs"),
            (
                {
                    "content": b'{"inputs": []}',
                    "headers": {"Inference-Header-Content-Length": "99"},
                },
                "Inference-Header-Content-Length '99'",
            ),
            (
                {
                    "json": {
                        "inputs": [
                            {
                                "name": "image",
                                "datatype": "FP32",
                                "shape": [1, 3, H, W],
                                "parameters": {"binary_data_size": 8},
                            }
                        ]
                    }
                },
                "0 bytes of binary data remain",
            ),
            (
                {"content": gzip.compress(b"x")[:5], "headers": {"Content-Encoding": "gzip"}},
                "not valid gzip",
            ),
        ]

        def typed(data: object, datatype: str = "FP32", shape: tuple = (1, 3, H, W)) -> dict:
            tensor = {"name": "image", "datatype": datatype, "shape": list(shape), "data": data}
            return {"json": {"inputs": [tensor]}}

        cases += [
            (typed([[0.5, 0.5], [0.5]]), "not a regular nested list"),
            (typed(["a", "b"]), "does not hold only FP32 values"),
            (typed([0.5] * 7), "28 bytes of raw contents"),
            (typed([0.5], "BF16"), "datatype 'BF16' is not known"),
        ]
        for kwargs, fragment in cases:
            response = await raw.post("/v2/models/colour/infer", **kwargs)
            assert response.status_code == 400, response.text
            body = response.json()
            assert set(body) == {"error"} and fragment in body["error"], body
        strings = {"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [1], "data": ["abc"]}
        response = await raw.post("/v2/models/colour.image/infer", json={"inputs": [strings]})
        assert response.status_code == 400 and "unrecognised image format" in response.text
        response = await raw.get("/v2/models/colour/nothing")
        assert response.status_code == 404 and set(response.json()) == {"error"}


async def test_timeout_header_is_the_deadline(http_url, server):
    """colour_batch4 waits 30 s for a batch of 4: a 0.2 s deadline passes in its queue."""
    body = {
        "inputs": [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": [1, 3, H, W],
                "data": as_tensor(QUADRANT).ravel().tolist(),
            }
        ]
    }
    async with httpx.AsyncClient(base_url=f"http://{http_url}") as raw:
        response = await raw.post(
            "/v2/models/colour_batch4/infer",
            json=body,
            headers={"Segserve-Timeout-S": "0.2"},
            timeout=30,
        )
        assert response.status_code == 504, response.text
        assert "deadline" in response.json()["error"]
        bad = await raw.post(
            "/v2/models/colour/infer", json=body, headers={"Request-Timeout": "soon"}
        )
        assert bad.status_code == 400 and "request-timeout" in bad.json()["error"]
    batcher = server.core.models.get("colour_batch4").batcher
    async with asyncio.timeout(10):
        while batcher.queue_depth:
            await asyncio.sleep(0.01)
