"""Security of every gRPC surface, over real TLS with certificates made here (tests/harness/certs):
TLS and mutual TLS on both ports, bearer tokens (none, wrong, right), per-model scopes (unary,
listings, streams, both ports), admin-only methods, health open or closed, rate limits, the
metrics port (its own interface, no request data), the client CLI with TLS and a token."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as kserve
from tritonclient.grpc import service_pb2_grpc as kserve_grpc

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_client import AsyncSegserveClient, FrameFailed, SegserveClient, TLSConfig, cli
from segserve_client.errors import SegserveError
from segserve_server.adapters.auth_grpc import peek_string
from segserve_server.auth import token_sha256
from segserve_server.server import Server
from segserve_server.settings import Settings
from tests.conftest import H, W, encode, make_settings, quadrant_image
from tests.harness.certs import Certificates, make_certificates
from tests.harness.synthetic_models import expected_colour_labels, write_entry
from tests.harness.tokens import ADMIN, FULL, LIMITED, SCOPED
from tests.harness.tokens import TOKENS as BASE_TOKENS

pytestmark = pytest.mark.timeout(60)

QUADRANT = quadrant_image()
PNG = encode(QUADRANT)
EXPECTED = expected_colour_labels(QUADRANT)
STREAM_LIMITED = "stream-limited-token-abcdefg"  # 4 requests: the stream and 3 frames
ENV_TOKEN = "env-token-abcdefghijklmnopq"
SCOPED_ADMIN = "colour-admin-token-01234567"  # admin, of the colour model only
TOKENS = (
    BASE_TOKENS
    + f"""
[[tokens]]
name = "colour-admin"
secret = "{SCOPED_ADMIN}"
models = ["colour"]
admin = true

[[tokens]]
name = "stream-limited"
secret = "{STREAM_LIMITED}"
rate_per_s = 0.0001
burst = 4
"""
)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def image_request(model: str, request_id: str = "") -> kserve.ModelInferRequest:
    """A KServe `<model>.image` request of the quadrant PNG."""
    request = kserve.ModelInferRequest(model_name=model, id=request_id or model)
    request.inputs.add(name="IMAGE_BYTES", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(len(PNG).to_bytes(4, "little") + PNG)
    return request


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def small_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("secure_repository")
    write_entry(root, "colour", H, W, max_batch_size=4)
    write_entry(root, "other", H, W, max_batch_size=4)
    return root


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.toml"
    path.write_text(TOKENS)
    return path


async def started(settings: Settings) -> Server:
    server = Server(settings)
    await server.start()
    return server


@pytest.fixture(scope="module")
async def tls_server(small_repository, certs, tokens_file) -> AsyncIterator[Server]:
    """TLS and tokens on both ports; health open (the default)."""
    server = await started(
        make_settings(
            small_repository,
            kserve_port=0,
            tls_cert_file=certs.server.cert,
            tls_key_file=certs.server.key,
            auth_tokens_file=tokens_file,
            auth_tokens=f"envtok={ENV_TOKEN}",
        )
    )
    yield server
    await server.stop(timeout_s=5)


def tls_channel(certs: Certificates, port: int, *, ca: Path | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials((ca or certs.ca.cert).read_bytes())
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


def client(certs: Certificates, server: Server, token: str | None) -> AsyncSegserveClient:
    return AsyncSegserveClient(
        f"127.0.0.1:{server.port}", tls=TLSConfig(ca_file=certs.ca.cert), token=token or ""
    )


async def expect_code(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    return err.value.details() or ""


async def test_tls_on_both_ports_with_the_segserve_client_and_tritonclient(tls_server, certs):
    async with client(certs, tls_server, FULL) as segserve:
        result = await segserve.segment(PNG, "colour")
        np.testing.assert_array_equal(result.labels, EXPECTED)

    def sync_calls() -> tuple[list[str], dict[str, object], bool]:
        with SegserveClient(
            f"localhost:{tls_server.port}", tls=TLSConfig(ca_file=certs.ca.cert), token=FULL
        ) as sync_client:
            names = [m.name for m in sync_client.list_models()]
        triton = tg.InferenceServerClient(
            f"localhost:{tls_server.kserve_port}", ssl=True, root_certificates=str(certs.ca.cert)
        )
        try:
            live = triton.is_server_live()  # health: open without a token
            metadata = triton.get_model_metadata(
                "colour.image", headers={"authorization": f"Bearer {FULL}"}, as_json=True
            )
        finally:
            triton.close()
        return names, metadata, live

    names, metadata, live = await asyncio.to_thread(sync_calls)
    assert names == ["colour", "other"] and live
    assert metadata["name"] == "colour.image"


async def test_plaintext_and_untrusting_clients_fail_on_tls_ports(tls_server, certs):
    for port in (tls_server.port, tls_server.kserve_port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            check = health_pb2_grpc.HealthStub(plain).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            await expect_code(check, grpc.StatusCode.UNAVAILABLE)
        async with tls_channel(certs, port, ca=certs.wrong_ca.cert) as untrusting:
            check = health_pb2_grpc.HealthStub(untrusting).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            await expect_code(check, grpc.StatusCode.UNAVAILABLE)
    async with AsyncSegserveClient(f"127.0.0.1:{tls_server.port}", token=FULL) as plain_client:
        with pytest.raises(SegserveError) as err:
            await plain_client.list_models(timeout_s=10)
        assert err.value.code is grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(small_repository, certs):
    server = await started(
        make_settings(
            small_repository,
            kserve_port=0,
            tls_cert_file=certs.server.cert,
            tls_key_file=certs.server.key,
            tls_client_ca_file=certs.ca.cert,
        )
    )
    try:
        for port in (server.port, server.kserve_port):
            target = f"127.0.0.1:{port}"
            good = TLSConfig(certs.ca.cert, certs.client.cert, certs.client.key)
            async with AsyncSegserveClient(target, tls=good, token="") as ok:
                if port == server.port:
                    assert [m.name for m in await ok.list_models()] == ["colour", "other"]
            for tls in (
                TLSConfig(certs.ca.cert),  # no client certificate
                TLSConfig(certs.ca.cert, certs.wrong_client.cert, certs.wrong_client.key),
            ):
                async with AsyncSegserveClient(target, tls=tls, token="") as refused:
                    with pytest.raises(SegserveError) as err:
                        await refused.list_models(timeout_s=10)
                    assert err.value.code is grpc.StatusCode.UNAVAILABLE
            credentials = grpc.ssl_channel_credentials(
                certs.ca.cert_pem, certs.client.key_pem, certs.client.cert_pem
            )
            async with grpc.aio.secure_channel(target, credentials) as channel:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest()
                )
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(timeout_s=5)


async def test_tokens_none_wrong_garbled_and_right_on_both_ports(tls_server, certs, caplog):
    wrong = "not-a-known-token-xyzzy-12345"
    async with (
        tls_channel(certs, tls_server.port) as channel,
        tls_channel(certs, tls_server.kserve_port) as kchannel,
    ):
        segserve = pb_grpc.SegmentationStub(channel)
        triton = kserve_grpc.GRPCInferenceServiceStub(kchannel)
        calls = {
            "segserve": lambda md: segserve.ListModels(pb.ListModelsRequest(), metadata=md),
            "kserve": lambda md: triton.ServerMetadata(kserve.ServerMetadataRequest(), metadata=md),
        }
        for call in calls.values():
            details = await expect_code(call(()), grpc.StatusCode.UNAUTHENTICATED)
            assert "missing credentials" in details and "Bearer" in details
            details = await expect_code(call(bearer(wrong)), grpc.StatusCode.UNAUTHENTICATED)
            assert "unknown bearer token" in details and wrong not in details
            garbled = (("authorization", wrong),)  # no scheme: the token alone
            details = await expect_code(call(garbled), grpc.StatusCode.UNAUTHENTICATED)
            assert wrong not in details and "Bearer <token>" in details
            await call(bearer(FULL))
            await call(bearer(ENV_TOKEN))
    assert wrong not in caplog.text
    assert "refused" in caplog.text


async def test_scopes_on_unary_calls_and_listings_of_both_ports(tls_server, certs):
    async with client(certs, tls_server, SCOPED) as scoped:
        assert [m.name for m in await scoped.list_models()] == ["colour"]
        assert (await scoped.get_model("colour")).name == "colour"
        for model in ("other", "no_such_model"):  # existence is not told
            with pytest.raises(SegserveError) as err:
                await scoped.get_model(model)
            assert err.value.code is grpc.StatusCode.PERMISSION_DENIED
            assert "'scoped'" in err.value.details and repr(model) in err.value.details
            with pytest.raises(SegserveError) as err:
                await scoped.segment(PNG, model)
            assert err.value.code is grpc.StatusCode.PERMISSION_DENIED
        np.testing.assert_array_equal((await scoped.segment(PNG, "colour")).labels, EXPECTED)
    async with tls_channel(certs, tls_server.kserve_port) as kchannel:
        triton = kserve_grpc.GRPCInferenceServiceStub(kchannel)
        md = bearer(SCOPED)
        for name in ("other", "other.image"):
            await expect_code(
                triton.ModelMetadata(kserve.ModelMetadataRequest(name=name), metadata=md),
                grpc.StatusCode.PERMISSION_DENIED,
            )
            await expect_code(
                triton.ModelReady(kserve.ModelReadyRequest(name=name), metadata=md),
                grpc.StatusCode.PERMISSION_DENIED,
            )
            await expect_code(
                triton.ModelInfer(kserve.ModelInferRequest(model_name=name), metadata=md),
                grpc.StatusCode.PERMISSION_DENIED,
            )
        assert (
            await triton.ModelReady(kserve.ModelReadyRequest(name="colour.image"), metadata=md)
        ).ready
        index = await triton.RepositoryIndex(kserve.RepositoryIndexRequest(), metadata=md)
        assert {m.name for m in index.models} == {"colour", "colour.image"}
        stats = await triton.ModelStatistics(kserve.ModelStatisticsRequest(), metadata=md)
        assert {s.name for s in stats.model_stats} <= {"colour", "colour.image"}
        everything = await triton.RepositoryIndex(
            kserve.RepositoryIndexRequest(), metadata=bearer(FULL)
        )
        assert {m.name for m in everything.models} >= {"colour", "other"}


async def test_a_repeated_name_field_cannot_smuggle_a_model_past_the_scope(tls_server, certs):
    """Protobuf keeps a field's last occurrence: so does the interceptor's reading of it."""
    data = (
        pb.GetModelRequest(name="colour").SerializeToString()
        + pb.GetModelRequest(name="other").SerializeToString()
    )
    assert pb.GetModelRequest.FromString(data).name == "other"
    assert peek_string(data, 1) == "other"
    async with tls_channel(certs, tls_server.port) as channel:
        get_model = channel.unary_unary(
            "/segserve.v1.Segmentation/GetModel", response_deserializer=pb.ModelInfo.FromString
        )
        await expect_code(
            get_model(data, metadata=bearer(SCOPED)), grpc.StatusCode.PERMISSION_DENIED
        )


async def test_scopes_in_streams_answer_the_frame_and_the_stream_goes_on(tls_server, certs):
    frames = [(1, PNG), (2, PNG), (3, PNG)]
    async with client(certs, tls_server, SCOPED) as scoped:
        answers = [a async for a in scoped.stream(iter(frames[:1]), "colour")]
        assert [f for f, _ in answers] == [1]
        answers = [a async for a in scoped.stream(iter(frames), "other")]
        assert [f for f, _ in answers] == [1, 2, 3]
        for _, answer in answers:
            assert isinstance(answer, FrameFailed)
            assert answer.code is grpc.StatusCode.PERMISSION_DENIED

    async with tls_channel(certs, tls_server.kserve_port) as kchannel:
        triton = kserve_grpc.GRPCInferenceServiceStub(kchannel)
        requests = [image_request(m) for m in ("colour.image", "other.image", "colour.image")]
        call = triton.ModelStreamInfer(iter(requests), metadata=bearer(SCOPED))
        replies = [reply async for reply in call]
        assert [a.error_message.split(":")[0] for a in replies] == ["", "PERMISSION_DENIED", ""]
        assert [a.infer_response.id for a in replies] == [
            "colour.image",
            "other.image",
            "colour.image",
        ]


async def test_admin_only_methods(tls_server, certs):
    async with tls_channel(certs, tls_server.kserve_port) as kchannel:
        triton = kserve_grpc.GRPCInferenceServiceStub(kchannel)
        load = kserve.RepositoryModelLoadRequest(model_name="no_such_model")
        for token in (FULL, SCOPED):
            details = await expect_code(
                triton.RepositoryModelLoad(load, metadata=bearer(token)),
                grpc.StatusCode.PERMISSION_DENIED,
            )
            assert "admin" in details
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await triton.RepositoryModelLoad(load, metadata=bearer(ADMIN))
        assert err.value.code() not in (
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAUTHENTICATED,
        )
    async with tls_channel(certs, tls_server.port) as channel:
        repository = channel.unary_unary("/segserve.v1.ModelRepository/AnyMethod")
        await expect_code(repository(b"", metadata=bearer(FULL)), grpc.StatusCode.PERMISSION_DENIED)
        await expect_code(repository(b"", metadata=()), grpc.StatusCode.UNAUTHENTICATED)
        await expect_code(repository(b"", metadata=bearer(ADMIN)), grpc.StatusCode.UNIMPLEMENTED)


async def test_segserve_v1_model_repository_keeps_to_the_admin_tokens_scope(tls_server, certs):
    """An admin of one model may not unload another over segserve.v1 (as over KServe), and its
    repository index lists only its models."""
    async with tls_channel(certs, tls_server.port) as channel:
        repository = pb_grpc.ModelRepositoryStub(channel)
        details = await expect_code(
            repository.UnloadModel(
                pb.UnloadModelRequest(name="other"), metadata=bearer(SCOPED_ADMIN)
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert "colour-admin" in details
        index = await repository.RepositoryIndex(
            pb.RepositoryIndexRequest(), metadata=bearer(SCOPED_ADMIN)
        )
        assert [m.name for m in index.models] == ["colour"]
        everything = await repository.RepositoryIndex(
            pb.RepositoryIndexRequest(), metadata=bearer(ADMIN)
        )
        assert {"colour", "other"} <= {m.name for m in everything.models}


async def test_health_and_reflection_are_open_by_default(tls_server, certs):
    for port in (tls_server.port, tls_server.kserve_port):
        async with tls_channel(certs, port) as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest()
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    async with tls_channel(certs, tls_server.kserve_port) as kchannel:
        triton = kserve_grpc.GRPCInferenceServiceStub(kchannel)
        assert (await triton.ServerReady(kserve.ServerReadyRequest())).ready


async def test_health_needs_a_token_when_configured(small_repository, tokens_file):
    server = await started(
        make_settings(
            small_repository, kserve_port=0, auth_tokens_file=tokens_file, health_requires_auth=True
        )
    )
    try:
        for port in (server.port, server.kserve_port):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                await expect_code(
                    health.Check(health_pb2.HealthCheckRequest()), grpc.StatusCode.UNAUTHENTICATED
                )
                answer = await health.Check(health_pb2.HealthCheckRequest(), metadata=bearer(FULL))
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.kserve_port}") as kchannel:
            triton = kserve_grpc.GRPCInferenceServiceStub(kchannel)
            await expect_code(
                triton.ServerLive(kserve.ServerLiveRequest()), grpc.StatusCode.UNAUTHENTICATED
            )
        # A token over plaintext works too (e.g. on loopback behind a TLS-terminating proxy).
        async with AsyncSegserveClient(f"127.0.0.1:{server.port}", token=FULL) as plain:
            np.testing.assert_array_equal((await plain.segment(PNG, "colour")).labels, EXPECTED)
    finally:
        await server.stop(timeout_s=5)


async def test_rate_limit_refuses_one_token_and_not_the_others(tls_server, certs):
    async with (
        client(certs, tls_server, LIMITED) as limited,
        client(certs, tls_server, FULL) as full,
    ):
        await limited.list_models()
        await limited.get_model("colour")
        with pytest.raises(SegserveError) as err:
            await limited.list_models()
        assert err.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (
            "'limited'" in err.value.details and "0.0001 requests/s (burst 2)" in err.value.details
        )
        for _ in range(5):
            await full.list_models()  # other tokens are unaffected
    async with client(certs, tls_server, STREAM_LIMITED) as stream_limited:
        # The stream takes one request, each frame one more: frames 1-3 run, 4 and 5 are refused.
        frames = [(i, PNG) for i in range(1, 6)]
        answers = [a async for a in stream_limited.stream(iter(frames), "colour")]
        codes = [getattr(answer, "code", grpc.StatusCode.OK) for _, answer in answers]
        assert codes == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2


async def test_the_server_stays_up_through_all_of_it(tls_server, certs):
    async with client(certs, tls_server, FULL) as full:
        np.testing.assert_array_equal((await full.segment(PNG, "other")).labels, EXPECTED)


async def test_metrics_bind_their_own_interface_and_carry_no_request_data(
    small_repository, tokens_file
):
    server = await started(
        make_settings(
            small_repository,
            kserve_port=0,
            metrics_host="127.0.0.2",
            auth_tokens_file=tokens_file,
        )
    )
    try:
        probe = "probe_model_5f1c"
        async with AsyncSegserveClient(f"127.0.0.1:{server.port}", token=FULL) as full:
            await full.segment(PNG, "colour")
            with pytest.raises(SegserveError):
                await full.segment(PNG, probe)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.kserve_port}") as kchannel:
            request = image_request("colour.image", "request-id-5f1c")
            await kserve_grpc.GRPCInferenceServiceStub(kchannel).ModelInfer(
                request, metadata=bearer(SCOPED)
            )
        url = f"http://127.0.0.2:{server.metrics_port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
        text = body.decode()
        assert 'model="colour"' in text  # the requests were counted: this is the real page
        for secret in (FULL, SCOPED, token_sha256(SCOPED), probe, "request-id-5f1c"):
            assert secret not in text
        assert '"full"' not in text and '"scoped"' not in text  # no token names as labels
        assert PNG[-64:] not in body
        with pytest.raises(OSError):
            await asyncio.to_thread(
                lambda: urllib.request.urlopen(
                    f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10
                )
            )
    finally:
        await server.stop(timeout_s=5)


def test_settings_check_tls_files_and_tokens_without_echoing_secrets(
    small_repository, certs, tmp_path
):
    def refused(**values: object) -> str:
        with pytest.raises(ValueError) as err:
            make_settings(small_repository, **values)
        return str(err.value)

    assert "give both or neither" in refused(tls_cert_file=certs.server.cert)
    assert "needs tls_cert_file" in refused(tls_client_ca_file=certs.ca.cert)
    assert "do not load" in refused(tls_cert_file=certs.server.cert, tls_key_file=certs.client.key)
    assert "is not a file" in refused(
        tls_cert_file=tmp_path / "absent.crt", tls_key_file=certs.server.key
    )
    short = "tiny-secret"
    message = refused(auth_tokens=f"someone={short}")
    assert "fewer than 16" in message and short not in message
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[[tokens]]\nname = "x"\nsecret = "{FULL}"\nmodels = "colour"\n')
    message = refused(auth_tokens_file=bad)
    assert "models is not a list" in message and FULL not in message
    doubled = tmp_path / "doubled.toml"
    doubled.write_text(TOKENS + f'[[tokens]]\nname = "full"\nsecret = "{ADMIN}x"\n')
    assert "not unique: full" in refused(auth_tokens_file=doubled)


async def test_client_cli_with_tls_and_a_token(tls_server, certs, tmp_path, capsys, monkeypatch):
    target = ["--server", f"localhost:{tls_server.port}", "--tls-ca", str(certs.ca.cert)]
    status = await asyncio.to_thread(cli.main, ["models", *target, "--token", FULL, "--json"])
    out = capsys.readouterr().out
    assert status == 0 and [m["name"] for m in json.loads(out)] == ["colour", "other"]
    monkeypatch.setenv("SEGSERVE_TOKEN", SCOPED)
    image, mask = tmp_path / "quadrant.png", tmp_path / "mask.png"
    image.write_bytes(PNG)
    status = await asyncio.to_thread(
        cli.main, ["segment", str(image), "--model", "colour", "-o", str(mask), *target]
    )
    assert status == 0 and mask.is_file()
    status = await asyncio.to_thread(cli.main, ["model", "other", *target])
    assert status == 1 and "PERMISSION_DENIED" in capsys.readouterr().err
    monkeypatch.delenv("SEGSERVE_TOKEN")
    status = await asyncio.to_thread(cli.main, ["models", *target])
    assert status == 1 and "UNAUTHENTICATED" in capsys.readouterr().err
