"""TLS, bearer tokens (scopes, admin, rate limits) and CORS on segserve's HTTP port, over real
HTTPS with generated certificates, with httpx and the stock tritonclient.http."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as th

from segserve_server.server import Server
from tests.conftest import H, W, encode, make_settings, quadrant_image
from tests.harness.certs import Certificates, make_certificates
from tests.harness.synthetic_models import write_entry
from tests.harness.tokens import ADMIN, FULL, LIMITED, SCOPED, TOKENS

pytestmark = pytest.mark.timeout(60)

PNG = encode(quadrant_image())
ORIGIN = "https://console.example"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("http-certs"))


@pytest.fixture(scope="module")
def small_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("http_secure_repository")
    write_entry(root, "colour", H, W, max_batch_size=4)
    write_entry(root, "other", H, W, max_batch_size=4)
    return root


@pytest.fixture(scope="module")
async def secure(small_repository, certs, tmp_path_factory) -> AsyncIterator[Server]:
    """TLS and tokens on every port, CORS for one origin."""
    tokens = tmp_path_factory.mktemp("http-tokens") / "tokens.toml"
    tokens.write_text(TOKENS)
    server = Server(
        make_settings(
            small_repository,
            tls_cert_file=certs.server.cert,
            tls_key_file=certs.server.key,
            auth_tokens_file=tokens,
            http_cors_origins=[ORIGIN],
        )
    )
    await server.start()
    yield server
    await server.stop(timeout_s=5)


def trusting(certs: Certificates, client: Certificates | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certs.ca.cert)
    if client is not None:
        context.load_cert_chain(client.client.cert, client.client.key)
    return context


@pytest.fixture
async def https(secure, certs) -> AsyncIterator[httpx.AsyncClient]:
    base = f"https://127.0.0.1:{secure.http_port}"
    async with httpx.AsyncClient(base_url=base, verify=trusting(certs), timeout=30) as client:
        yield client


def refused(response: httpx.Response, status: int, code: str, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body.get("code", code) == code and fragment in body["error"], body


async def test_tls_only_and_the_stock_client_over_https(secure, certs):
    plain = f"http://127.0.0.1:{secure.http_port}"
    async with httpx.AsyncClient(base_url=plain) as client:
        with pytest.raises(httpx.HTTPError):  # plaintext to a TLS port: no HTTP answer
            await client.get("/v2/health/live")
    base = f"https://127.0.0.1:{secure.http_port}"
    async with httpx.AsyncClient(base_url=base, verify=True) as untrusting:
        with pytest.raises(httpx.ConnectError):  # a CA the system does not know
            await untrusting.get("/v2/health/live")

    def calls() -> tuple[bool, np.ndarray]:
        with th.InferenceServerClient(
            f"127.0.0.1:{secure.http_port}",
            ssl=True,
            ssl_options={"ca_certs": str(certs.ca.cert)},
        ) as client:
            array = np.empty(1, dtype=np.object_)
            array[:] = [PNG]
            image = th.InferInput("IMAGE_BYTES", [1], "BYTES")
            image.set_data_from_numpy(array)
            result = client.infer("colour.image", [image], headers=bearer(SCOPED))
            return client.is_server_ready(), result.as_numpy("MASK_SHAPE")

    ready, shape = await asyncio.to_thread(calls)
    assert ready
    np.testing.assert_array_equal(shape, [[H, W]])


async def test_mutual_tls_needs_a_client_certificate_of_its_ca(small_repository, certs):
    server = Server(
        make_settings(
            small_repository,
            tls_cert_file=certs.server.cert,
            tls_key_file=certs.server.key,
            tls_client_ca_file=certs.ca.cert,
        )
    )
    await server.start()
    try:
        base = f"https://127.0.0.1:{server.http_port}"
        async with httpx.AsyncClient(base_url=base, verify=trusting(certs)) as anonymous:
            with pytest.raises(httpx.HTTPError):
                await anonymous.get("/v2/health/live")
        wrong = ssl.create_default_context(cafile=certs.ca.cert)
        wrong.load_cert_chain(certs.wrong_client.cert, certs.wrong_client.key)
        async with httpx.AsyncClient(base_url=base, verify=wrong) as stranger:
            with pytest.raises(httpx.HTTPError):
                await stranger.get("/v2/health/live")
        async with httpx.AsyncClient(base_url=base, verify=trusting(certs, certs)) as known:
            response = await known.post("/v1/models/colour/segment", content=PNG)
            assert response.status_code == 200, response.text
    finally:
        await server.stop(timeout_s=5)


async def test_tokens_none_wrong_garbled_and_right(https):
    for headers, fragment in [
        ({}, "missing credentials"),
        (bearer("not-a-token-of-this-server"), "unknown bearer token"),
        ({"Authorization": f"Basic {FULL}"}, "not 'Bearer <token>'"),
    ]:
        response = await https.post("/v1/models/colour/segment", content=PNG, headers=headers)
        refused(response, 401, "UNAUTHENTICATED", fragment)
        assert response.headers["www-authenticate"] == 'Bearer realm="segserve"'
        assert FULL not in response.text
    twice = await https.post(
        "/v1/models/colour/segment",
        content=PNG,
        headers=[("Authorization", f"Bearer {FULL}"), ("Authorization", f"Bearer {FULL}")],
    )
    refused(twice, 401, "UNAUTHENTICATED", "more than one Authorization header")
    kserve = await https.get("/v2/models/colour")
    refused(kserve, 401, "UNAUTHENTICATED", "missing credentials")
    assert set(kserve.json()) == {"error"}  # Triton's shape under /v2
    ok = await https.post("/v1/models/colour/segment", content=PNG, headers=bearer(FULL))
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"


async def test_health_and_console_are_open(https):
    assert (await https.get("/v2/health/live")).status_code == 200
    assert (await https.get("/v2/health/ready")).json() == {"ready": True}
    assert (await https.get("/")).status_code == 307
    assert (await https.get("/console/")).status_code != 401
    # Per-model readiness names a model: it needs a token, as gRPC ModelReady does.
    refused(await https.get("/v2/models/colour/ready"), 401, "UNAUTHENTICATED")


async def test_scopes_on_calls_and_listings(https):
    scoped = bearer(SCOPED)
    ok = await https.post("/v1/models/colour/segment", content=PNG, headers=scoped)
    assert ok.status_code == 200
    for response in [
        await https.post("/v1/models/other/segment", content=PNG, headers=scoped),
        await https.post("/v1/models/absent/segment", content=PNG, headers=scoped),
        await https.get("/v1/models/other", headers=scoped),
        await https.get("/v2/models/other.image", headers=scoped),
        await https.get("/v2/models/other/ready", headers=scoped),
        await https.post("/v2/models/other.image/infer", json={"inputs": []}, headers=scoped),
    ]:
        refused(response, 403, "PERMISSION_DENIED", "may not use model")
    listing = (await https.get("/v1/models", headers=scoped)).json()["models"]
    assert [m["name"] for m in listing] == ["colour"]
    everything = (await https.get("/v1/models", headers=bearer(FULL))).json()["models"]
    assert [m["name"] for m in everything] == ["colour", "other"]
    index = (await https.post("/v2/repository/index", headers=scoped)).json()
    assert {m["name"] for m in index} == {"colour", "colour.image"}
    stats = (await https.get("/v2/models/stats", headers=scoped)).json()["model_stats"]
    assert {s["name"] for s in stats} == {"colour", "colour.image"}
    assert set((await https.get("/v1/stats", headers=scoped)).json()["models"]) <= {"colour"}


async def test_repository_load_and_unload_need_admin(https):
    for token in (FULL, SCOPED):
        response = await https.post("/v2/repository/models/colour/load", headers=bearer(token))
        refused(response, 403, "PERMISSION_DENIED", "admin = true")
    unload = await https.post("/v2/repository/models/other/unload", headers=bearer(ADMIN))
    assert unload.status_code == 200, unload.text
    gone = await https.post("/v1/models/other/segment", content=PNG, headers=bearer(ADMIN))
    refused(gone, 503, "UNAVAILABLE")
    load = await https.post("/v2/repository/models/other/load", headers=bearer(ADMIN))
    assert load.status_code == 200, load.text
    back = await https.post("/v1/models/other/segment", content=PNG, headers=bearer(ADMIN))
    assert back.status_code == 200, back.text


async def test_rate_limit_refuses_one_token_and_not_the_others(https):
    limited = bearer(LIMITED)
    for _ in range(2):
        assert (await https.get("/v1/models", headers=limited)).status_code == 200
    response = await https.post("/v1/models/colour/segment", content=PNG, headers=limited)
    refused(response, 429, "RESOURCE_EXHAUSTED", "over its rate limit")
    assert (await https.get("/v1/models", headers=bearer(FULL))).status_code == 200

    kserve = await https.get("/v2/models/colour", headers=limited)
    assert kserve.status_code == 429 and set(kserve.json()) == {"error"}


async def test_cors_when_configured(https):
    preflight = await https.options(
        "/v1/models/colour/segment",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,segserve-timeout-s",
        },
    )
    assert preflight.status_code == 200, preflight.text  # no token needed for a preflight
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    simple = await https.get("/v1/models", headers={"Origin": ORIGIN, **bearer(FULL)})
    assert simple.headers["access-control-allow-origin"] == ORIGIN
    assert "segserve-model" in simple.headers["access-control-expose-headers"].lower()
    other = await https.options(
        "/v1/models",
        headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "GET"},
    )
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


async def test_cors_is_off_by_default(server):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}") as http:
        preflight = await http.options(
            "/v1/models", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}
        )
        assert "access-control-allow-origin" not in preflight.headers
        assert preflight.status_code == 405
        simple = await http.get("/v1/models", headers={"Origin": ORIGIN})
        assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers


def test_cors_origins_are_checked(small_repository, monkeypatch):
    monkeypatch.setenv("SEGSERVE_HTTP_CORS_ORIGINS", "https://a.example, http://localhost:3000")
    assert make_settings(small_repository).http_cors_origins == [
        "https://a.example",
        "http://localhost:3000",
    ]
    for bad in ("https://a.example/", "a.example", "https://a.example/path"):
        with pytest.raises(ValueError, match="is not scheme://host"):
            make_settings(small_repository, http_cors_origins=[bad])
