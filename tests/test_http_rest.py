"""The plain REST endpoints on segserve's HTTP port, called as curl would (httpx over real
HTTP): /v1/models, POST /v1/models/{name}/segment (raw body and multipart; PNG by default, JSON
with every encoding), its options, limits, deadline header and errors, and /v1/stats."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest

from segserve_client import masks
from segserve_server.server import Server
from segserve_server.settings import MIB
from tests.conftest import H, W, encode, make_settings, quadrant_image
from tests.harness.synthetic_models import COLOUR_CLASSES, COLOUR_PALETTE, expected_colour_labels

pytestmark = pytest.mark.timeout(60)

QUADRANT = quadrant_image()
PNG = encode(QUADRANT)
EXPECTED = expected_colour_labels(QUADRANT)
COUNTS = np.bincount(EXPECTED.ravel(), minlength=len(COLOUR_CLASSES)).tolist()


@pytest.fixture
async def http(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    assert server.http_port
    base = f"http://127.0.0.1:{server.http_port}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        yield client


def requests_counted(server: Server, model: str, code: str) -> float:
    value = server.core.metrics.registry.get_sample_value(
        "segserve_requests_total", {"model": model, "code": code}
    )
    return value or 0.0


def error_of(response: httpx.Response, status: int, code: str, *fragments: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    for fragment in fragments:
        assert fragment in body["error"], body
    return str(body["error"])


async def test_models_are_listed_as_the_console_needs_them(http):
    listing = (await http.get("/v1/models")).json()["models"]
    by_name = {m["name"]: m for m in listing}
    colour = by_name["colour"]
    assert colour["state"] == "READY" and colour["serving_version"] == 1
    assert colour["versions"] == [1]
    assert colour["classes"] == list(COLOUR_CLASSES)
    assert colour["colors"] == [list(c) for c in COLOUR_PALETTE]
    assert (colour["input_width"], colour["input_height"]) == (W, H)
    assert colour["has_confidence"] is False and colour["pipeline"] == "host"
    assert colour["backend"]
    assert by_name["colour_logits"]["has_confidence"] is True
    broken = by_name["broken_config"]
    assert broken["state"] == "FAILED" and broken["reason"] and broken["serving_version"] is None
    one = await http.get("/v1/models/colour_logits")
    assert one.json()["versions"] == [1, 2, 3] and one.json()["serving_version"] == 2
    error_of(await http.get("/v1/models/nope"), 404, "NOT_FOUND", "'nope'")


async def test_segment_answers_the_png_mask_by_default(http):
    response = await http.post(
        "/v1/models/colour/segment", content=PNG, headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    labels, palette = masks.decode_png(response.content)
    np.testing.assert_array_equal(labels, EXPECTED)
    assert palette is not None and palette[1] == COLOUR_PALETTE[1]  # viewable as it is
    assert response.headers["segserve-model"] == "colour"
    assert response.headers["segserve-model-version"] == "1"
    assert response.headers["segserve-classes-present"] == "1,2,3,4"
    assert "infer;dur=" in response.headers["server-timing"]
    plain = await http.post("/v1/models/colour/segment?embed_palette=false", content=PNG)
    assert masks.decode_png(plain.content)[1] is None


async def test_segment_takes_multipart_uploads(http):
    jpeg = encode(QUADRANT, ".jpg")
    response = await http.post(
        "/v1/models/colour/segment?format=json",
        files={"image": ("street.jpg", jpeg, "image/jpeg")},
        data={"note": "ignored"},
    )
    assert response.status_code == 200, response.text
    assert (response.json()["width"], response.json()["height"]) == (W, H)
    missing = await http.post("/v1/models/colour/segment", files={"picture": ("a.png", PNG)})
    error_of(missing, 400, "INVALID_ARGUMENT", "no file field 'image'", "picture")


async def test_segment_json_with_every_encoding(http):
    response = await http.post(
        "/v1/models/colour/segment",
        params={"format": "json", "encodings": "png,srle,raw"},
        content=PNG,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["model_version"], body["width"], body["height"]) == (
        "colour",
        1,
        W,
        H,
    )
    assert body["classes"] == list(COLOUR_CLASSES)
    assert body["colors"] == [list(c) for c in COLOUR_PALETTE]
    assert body["classes_present"] == [1, 2, 3, 4]
    assert body["pixel_counts"] == COUNTS
    assert body["confidence"] is None
    decoded = {m["encoding"]: base64.b64decode(m["data_base64"]) for m in body["masks"]}
    assert list(decoded) == ["png", "srle", "raw"]
    np.testing.assert_array_equal(masks.decode_png(decoded["png"])[0], EXPECTED)
    np.testing.assert_array_equal(masks.decode_srle(decoded["srle"]), EXPECTED)
    np.testing.assert_array_equal(np.frombuffer(decoded["raw"], np.uint8).reshape(H, W), EXPECTED)
    timings = body["timings_ms"]
    assert set(timings) == {
        "decode",
        "preprocess",
        "queue",
        "infer",
        "postprocess",
        "encode",
        "total",
    }
    assert timings["total"] >= timings["infer"] > 0


async def test_segment_options(http):
    big = encode(np.repeat(np.repeat(QUADRANT, 2, axis=0), 2, axis=1))  # 96 x 128
    small = await http.post(
        "/v1/models/colour/segment",
        params={"format": "json", "output_model_size": "true", "pixel_counts": "false"},
        content=big,
    )
    assert (small.json()["width"], small.json()["height"], small.json()["pixel_counts"]) == (
        W,
        H,
        None,
    )
    confident = await http.post(
        "/v1/models/colour_logits/segment",
        params={"format": "json", "confidence": "1", "confidence_threshold": "0.3", "version": 1},
        content=PNG,
    )
    body = confident.json()
    assert confident.status_code == 200 and body["model_version"] == 1, body
    confidence = body["confidence"]
    assert 0 < confidence["mean"] <= 1 and confidence["threshold"] == 0.3
    confidence_map, _ = masks.decode_png(base64.b64decode(confidence["png_base64"]))
    assert confidence_map.shape == (H, W)
    assert {c["class_id"] for c in confidence["class_confidence"]} >= {1, 2, 3, 4}
    polygons = await http.post(
        "/v1/models/colour/segment",
        params={"format": "json", "annotations": "polygons,coco_rle", "priority": "1"},
        content=PNG,
    )
    annotations = {a["class_id"]: a for a in polygons.json()["annotations"]}
    assert annotations[1]["bbox"] == [0, 0, W // 2, H // 2]
    assert annotations[1]["polygons"] and annotations[1]["coco_rle_counts"]


@pytest.mark.parametrize(
    ("query", "status", "code", "fragment"),
    [
        ("colors=1", 400, "INVALID_ARGUMENT", "['colors']"),
        ("format=gif", 400, "INVALID_ARGUMENT", "format='gif'"),
        ("encodings=jpeg&format=json", 400, "INVALID_ARGUMENT", "'jpeg'"),
        ("encodings=srle", 400, "INVALID_ARGUMENT", "needs format=json"),
        ("confidence=maybe&format=json", 400, "INVALID_ARGUMENT", "confidence='maybe'"),
        ("version=-1", 400, "INVALID_ARGUMENT", "version='-1'"),
        ("version=7", 404, "NOT_FOUND", "version 7"),
        ("confidence=true&format=json", 400, "FAILED_PRECONDITION", "labels only"),
        ("confidence_threshold=x", 400, "INVALID_ARGUMENT", "confidence_threshold='x'"),
    ],
)
async def test_segment_refuses_bad_options(http, query, status, code, fragment):
    response = await http.post(f"/v1/models/colour/segment?{query}", content=PNG)
    error_of(response, status, code, fragment)


async def test_segment_errors_and_their_statuses(http, server):
    unknown_before = requests_counted(server, "_unknown", "NOT_FOUND")
    error_of(await http.post("/v1/models/nope/segment", content=PNG), 404, "NOT_FOUND", "'nope'")
    assert requests_counted(server, "_unknown", "NOT_FOUND") == unknown_before + 1
    error_of(
        await http.post("/v1/models/colour/segment", content=b"GIF89a not really"),
        400,
        "INVALID_ARGUMENT",
        "unrecognised image format",
    )
    error_of(await http.post("/v1/models/colour/segment"), 400, "INVALID_ARGUMENT", "no image")
    error_of(await http.post("/v1/models/broken_config/segment", content=PNG), 503, "UNAVAILABLE")
    error_of(await http.get("/v1/models/colour/segment"), 405, "UNIMPLEMENTED")


async def test_timeout_header_is_the_deadline(http, server):
    """colour_batch4 waits 30 s for a batch of 4: a 0.2 s deadline passes in its queue."""
    before = requests_counted(server, "colour_batch4", "DEADLINE_EXCEEDED")
    response = await http.post(
        "/v1/models/colour_batch4/segment", content=PNG, headers={"Segserve-Timeout-S": "0.2"}
    )
    error_of(response, 504, "DEADLINE_EXCEEDED", "deadline")
    assert requests_counted(server, "colour_batch4", "DEADLINE_EXCEEDED") == before + 1
    for bad in ("0", "-1", "nan", "soon"):
        response = await http.post(
            "/v1/models/colour/segment", content=PNG, headers={"Request-Timeout": bad}
        )
        error_of(response, 400, "INVALID_ARGUMENT", "request-timeout")


async def test_a_client_that_disconnects_cancels_its_request(server):
    """colour_batch4 holds a lone request 30 s for a batch of 4: the client gives up after
    0.3 s, and the server drops the request at once (counted CANCELLED), as for gRPC."""
    before = requests_counted(server, "colour_batch4", "CANCELLED")
    base = f"http://127.0.0.1:{server.http_port}"
    async with httpx.AsyncClient(base_url=base, timeout=0.3) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            await impatient.post("/v1/models/colour_batch4/segment", content=PNG)
    limit = asyncio.get_running_loop().time() + 10  # far below the model's 30 s wait
    while requests_counted(server, "colour_batch4", "CANCELLED") < before + 1:
        assert asyncio.get_running_loop().time() < limit, "the request was not cancelled"
        await asyncio.sleep(0.02)
    assert server.core.models.get("colour_batch4").batcher.queue_depth == 0


async def test_stats_and_metrics_count_http_requests(http, server):
    before = (await http.get("/v1/stats")).json()
    ok_before = requests_counted(server, "colour", "OK")
    for _ in range(3):
        assert (await http.post("/v1/models/colour/segment", content=PNG)).status_code == 200
    await http.post("/v1/models/colour/segment", content=b"junk")
    after = (await http.get("/v1/stats")).json()
    assert after["uptime_s"] > before["uptime_s"] > 0
    old = before["models"].get("colour", {"requests": {}, "latency_s": {"count": 0}})
    new = after["models"]["colour"]
    assert new["requests"]["OK"] == old["requests"].get("OK", 0) + 3
    assert new["requests"]["INVALID_ARGUMENT"] == old["requests"].get("INVALID_ARGUMENT", 0) + 1
    assert new["latency_s"]["count"] == old["latency_s"]["count"] + 4
    buckets = new["latency_s"]["buckets"]
    assert [le for le, _ in buckets] == sorted(le for le, _ in buckets)
    assert buckets[-1][1] <= new["latency_s"]["count"]
    # The same registry that /metrics serves, counted as the gRPC Segment counts.
    assert requests_counted(server, "colour", "OK") == ok_before + 3


async def test_answers_are_gzipped_for_clients_that_accept_it(http, repository):
    """JSON (and KServe) answers over http_gzip_min_bytes are gzipped when the client accepts
    gzip, and decode to the same body; PNG masks never are; 0 turns compression off."""
    url, params = "/v1/models/colour/segment", {"format": "json", "encodings": "raw,srle"}
    plain = await http.post(
        url, params=params, content=PNG, headers={"Accept-Encoding": "identity"}
    )
    zipped = await http.post(url, params=params, content=PNG, headers={"Accept-Encoding": "gzip"})
    assert plain.status_code == zipped.status_code == 200
    assert "content-encoding" not in plain.headers
    assert zipped.headers["content-encoding"] == "gzip"
    assert int(zipped.headers["content-length"]) < len(plain.content) / 2  # bytes on the wire
    assert zipped.json()["masks"] == plain.json()["masks"]  # httpx gunzips
    png = await http.post(url, content=PNG, headers={"Accept-Encoding": "gzip"})
    assert png.headers["content-type"] == "image/png" and "content-encoding" not in png.headers
    small = await http.get("/v1/models/colour/none", headers={"Accept-Encoding": "gzip"})
    assert small.status_code == 404 and "content-encoding" not in small.headers  # < 1024 bytes
    kserve = await http.get("/v2/models/colour/config", headers={"Accept-Encoding": "gzip"})
    assert kserve.status_code == 200 and len(kserve.content) > 1024
    assert "content-encoding" not in kserve.headers  # /v2 answers as Triton's port does
    server = Server(make_settings(repository, http_gzip_min_bytes=0))
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.http_port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as other:
            off = await other.post(
                url, params=params, content=PNG, headers={"Accept-Encoding": "gzip"}
            )
            assert off.status_code == 200 and "content-encoding" not in off.headers
    finally:
        await server.stop(timeout_s=5)


async def test_bodies_past_the_limit_are_413(repository):
    server = Server(make_settings(repository, max_receive_message_bytes=MIB))
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}") as http:
            response = await http.post("/v1/models/colour/segment", content=b"x" * (MIB + 1))
            error_of(response, 413, "RESOURCE_EXHAUSTED", "max_receive_message_bytes")

            async def chunked() -> AsyncIterator[bytes]:  # no Content-Length to go by
                for _ in range(5):
                    yield b"x" * (MIB // 4)

            response = await http.post("/v1/models/colour/segment", content=chunked())
            error_of(response, 413, "RESOURCE_EXHAUSTED", f"({MIB} bytes)")
            kserve = await http.post("/v2/models/colour/infer", content=b"x" * (MIB + 1))
            assert kserve.status_code == 413 and set(kserve.json()) == {"error"}
            ok = await http.post("/v1/models/colour/segment", content=PNG)
            assert ok.status_code == 200
    finally:
        await server.stop(timeout_s=5)


async def test_http_port_can_be_disabled_and_drains(repository):
    """http_port off: no HTTP server. On: a drain answers a request it accepted, then refuses."""
    off = Server(make_settings(repository, http_port=None, metrics_port=None))
    await off.start()
    assert off.http_port is None
    await off.stop(timeout_s=5)
    server = Server(make_settings(repository))
    await server.start()
    base = f"http://127.0.0.1:{server.http_port}"
    inflight = server.core.metrics.inflight.labels("colour_busy")
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        big = encode(np.zeros((256, 256, 3), np.uint8))
        call = asyncio.create_task(http.post("/v1/models/colour_busy/segment", content=big))
        async with asyncio.timeout(10):
            while inflight._value.get() < 1:  # accepted: the core holds it
                await asyncio.sleep(0.001)
        await server.stop(timeout_s=30)
        response = await call
        assert response.status_code == 200 and not server.drain_timed_out
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(base_url=base) as late:
            await late.get("/v2/health/live")


async def test_a_drain_that_runs_out_answers_503(repository):
    """colour_batch4 waits 30 s for a batch of 4: a queued request outlives a 0.3 s drain and
    is answered 503 with segserve's message, not dropped."""
    server = Server(make_settings(repository, metrics_port=None))
    await server.start()
    batcher = server.core.models.get("colour_batch4").batcher
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{server.http_port}", timeout=30
    ) as http:
        call = asyncio.create_task(http.post("/v1/models/colour_batch4/segment", content=PNG))
        async with asyncio.timeout(10):
            while batcher.queue_depth < 1:
                await asyncio.sleep(0.001)
        await server.stop(timeout_s=0.3)
        response = await call
    assert server.drain_timed_out
    error_of(response, 503, "UNAVAILABLE", "drain timeout of 0.3 s ran out")
