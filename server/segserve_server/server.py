"""The segserve process: grpc.aio server with segserve.v1, health, reflection, metrics and drain,
a second grpc.aio server on `kserve_port` speaking the KServe v2 / Triton protocol, and the HTTP
port (`http_port`: KServe v2 REST, /v1 REST, the console; adapters.http_app) beside them.

Drain (SIGTERM/SIGINT or Server.stop): health turns NOT_SERVING, streams stop reading frames,
new calls are refused (the HTTP port stops accepting connections), every accepted request is answered (up to drain_timeout_s), then the
models are released and the process exits. If drain_timeout_s runs out first, the calls still
running are answered UNAVAILABLE by segserve ("drain timeout ... ran out") before gRPC cancels
them, and `serve` returns False (`segserve serve` exits 1).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from segserve.v1 import segserve_pb2 as pb
from segserve_server.adapters.auth_grpc import AuthInterceptor
from segserve_server.adapters.http_app import HttpServer, HttpState, build_app
from segserve_server.adapters.kserve_v2 import SERVICE_NAME as KSERVE_SERVICE
from segserve_server.adapters.kserve_v2 import KServeServicer, kserve_handler
from segserve_server.adapters.repository_v1 import REPOSITORY_SERVICE, repository_handler
from segserve_server.adapters.segserve_v1 import SegmentationServicer, segmentation_handler
from segserve_server.auth import load_tokens
from segserve_server.core.models import ModelState
from segserve_server.core.service import SegmentationCore
from segserve_server.core.tensors import TensorAPI
from segserve_server.settings import Settings

__all__ = [
    "ANSWER_GRACE_S",
    "LIVENESS_SERVICE",
    "NOT_SERVING",
    "SEGMENTATION_SERVICE",
    "SERVING",
    "Server",
    "serve",
    "server_credentials",
]

log = logging.getLogger(__name__)

SEGMENTATION_SERVICE = pb.DESCRIPTOR.services_by_name["Segmentation"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LIVENESS_SERVICE = "liveness"
"""A health service name that is SERVING for as long as the process runs and answers, drains
included: for liveness probes, which must not restart a replica whose models are merely
unavailable (its Triton servers ejected) or that is draining."""
ANSWER_GRACE_S = 1.0
"""After a drain's budget ran out: how long the calls segserve failed get to send that answer
before gRPC cancels every call still running."""


class Server:
    """One segserve server. `await start()`, then `port` / `kserve_port` / `metrics_port`;
    `await stop()`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.core = SegmentationCore(settings)
        self._credentials = server_credentials(settings)
        tokens = load_tokens(file=settings.auth_tokens_file, env=settings.auth_tokens)
        self._tokens = tokens
        # One Triton-protocol view for the KServe gRPC and HTTP ports: shared statistics.
        self.tensors = TensorAPI(
            self.core, max_images_per_request=settings.kserve_max_images_per_request
        )
        self._interceptors = (
            []
            if tokens is None
            else [AuthInterceptor(tokens, health_requires_auth=settings.health_requires_auth)]
        )
        self.port = 0
        self.kserve_port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._http: HttpServer | None = None
        self._metrics_server: WSGIServer | None = None
        self._kserve: grpc.aio.Server | None = None
        self.drain_timed_out = False
        """True once a drain's budget ran out with calls still running (see stop)."""
        self._health_lock = asyncio.Lock()  # one health update at a time, in order
        self._health_models: set[str] = set()  # every model name health was ever set for
        self._health_updates: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        s = self.settings
        self._draining = asyncio.Event()
        self._stopped = asyncio.Event()
        await self.core.start()
        options = [
            ("grpc.max_receive_message_length", s.max_receive_message_bytes),
            ("grpc.max_send_message_length", s.max_send_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self._grpc = grpc.aio.server(options=options, interceptors=self._interceptors)
        servicer = SegmentationServicer(self.core)
        servicer.draining = self._draining
        self._grpc.add_generic_rpc_handlers((segmentation_handler(servicer),))
        self._grpc.add_generic_rpc_handlers((repository_handler(self.core.models),))
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(
            (
                SEGMENTATION_SERVICE,
                REPOSITORY_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self._grpc,
        )
        self.port = _bind(self._grpc, s.host, s.port, self._credentials)
        if s.kserve_port is not None:
            self._kserve = self._kserve_server(options)
            self.kserve_port = _bind(self._kserve, s.host, s.kserve_port, self._credentials)
        await self._grpc.start()
        if self._kserve is not None:
            await self._kserve.start()
        if s.http_port is not None:
            state = HttpState(self.core, self.tensors, s, self._draining)
            self._http = HttpServer(build_app(state, self._tokens), s)
            self.http_port = await self._http.start(s.host, s.http_port)
        self.core.models.watch(self._availability_changed)
        await self._set_health()
        if s.metrics_port is not None:
            self._metrics_server = self.core.metrics.serve(s.metrics_host or s.host, s.metrics_port)
            self.metrics_port = self._metrics_server.server_port
        ready = [n for n, m in self.core.models.models.items() if m.state is ModelState.READY]
        log.info(
            "segserve listening on %s:%d (metrics on %s); models ready: %s",
            s.host,
            self.port,
            self.metrics_port,
            ", ".join(ready) or "none",
        )
        if self.kserve_port is not None:
            log.info("KServe v2 / Triton protocol on %s:%d", s.host, self.kserve_port)
        if self.http_port is not None:
            log.info(
                "HTTP (KServe v2 REST, /v1 REST, console) on %s://%s:%d",
                "https" if self._http is not None and self._http.tls else "http",
                s.host,
                self.http_port,
            )
        log.info(
            "gRPC ports: %s; %s",
            "TLS" + (" with client certificates" if s.tls_client_ca_file else "")
            if self._credentials
            else "plaintext",
            "bearer tokens required" if self._interceptors else "no authentication",
        )

    def _kserve_server(self, options: list[tuple[str, int]]) -> grpc.aio.Server:
        """inference.GRPCInferenceService, with health and reflection, as Triton's port has."""
        server = grpc.aio.server(options=options, interceptors=self._interceptors)
        servicer = KServeServicer(
            self.tensors,
            max_inflight_requests=self.settings.stream_max_inflight_frames,
            deadline_margin_s=self.settings.stream_deadline_margin_s,
        )
        servicer.draining = self._draining
        server.add_generic_rpc_handlers((kserve_handler(servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                KSERVE_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        return server

    def _availability_changed(self) -> None:
        """A model's backend turned available or unavailable (on the loop): update health."""
        task = asyncio.get_running_loop().create_task(self._set_health())
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def _set_health(self) -> None:
        """Per model: SERVING while it is READY and its backend can run batches (not every
        Triton server ejected) and no drain began; overall: SERVING while any model is."""
        async with self._health_lock:
            any_ready = False
            models = self.core.models.models
            for name, model in models.items():
                ready = model.available and not self._draining.is_set()
                any_ready |= ready
                await self._health.set(name, SERVING if ready else NOT_SERVING)
            for gone in self._health_models - models.keys():  # removed from the repository
                await self._health.set(gone, NOT_SERVING)
            self._health_models |= models.keys()
            await self._health.set(LIVENESS_SERVICE, SERVING)
            overall = SERVING if any_ready else NOT_SERVING
            await self._health.set("", overall)
            await self._health.set(SEGMENTATION_SERVICE, overall)
            if self._kserve is not None:
                await self._health.set(KSERVE_SERVICE, overall)

    async def stop(self, timeout_s: float | None = None) -> None:
        """Drains: refuse new work, answer all accepted work (up to timeout_s), release.

        One budget, timeout_s (default drain_timeout_s), for the whole drain. If it runs out
        with calls still running, segserve answers them itself: every request the models still
        hold (running or queued) fails UNAVAILABLE with a message that says so, and the calls
        get ANSWER_GRACE_S more to send that answer before gRPC cancels what is left
        (`drain_timed_out` then says so)."""
        if self._draining.is_set():
            await self._stopped.wait()
            return
        budget_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        started_s = time.monotonic()
        ends_s = started_s + budget_s
        log.info("draining (up to %.1fs)", budget_s)
        self._draining.set()
        try:
            await self._set_health()
            servers = [self._grpc] if self._kserve is None else [self._grpc, self._kserve]
            # gRPC cancels every call still running when its grace ends: give it a little
            # more than the budget, so that at the budget's end segserve answers them first.
            stops = [server.stop(budget_s + ANSWER_GRACE_S) for server in servers]
            if self._http is not None:  # stops accepting now, answers what it accepted
                stops.append(self._http.stop(budget_s + ANSWER_GRACE_S))
            rpcs = asyncio.ensure_future(asyncio.gather(*stops))
            done, _ = await asyncio.wait({rpcs}, timeout=max(0.0, ends_s - time.monotonic()))
            if not done:
                self.drain_timed_out = True
                waited_s = time.monotonic() - started_s
                failed = self.core.abandon(
                    f"server stopped before answering: drain timeout of {budget_s:g} s ran out; "
                    "retry on another replica",
                    waited_s=waited_s,
                )
                log.warning(
                    "drain timeout: calls still running after %.1fs; %d request(s) held by "
                    "the models failed UNAVAILABLE; %.1fs more to send the answers, then gRPC "
                    "cancels what is left",
                    waited_s,
                    failed,
                    ANSWER_GRACE_S,
                )
            await rpcs
            # The models get what the RPCs left of the budget.
            if await self.core.stop(timeout_s=max(0.0, ends_s - time.monotonic())):
                self.drain_timed_out = True
        finally:
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            self._stopped.set()
            log.info("stopped")

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials of the gRPC ports (None: plaintext); with tls_client_ca_file, client
    certificates signed by that CA are required (mutual TLS)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    client_ca = settings.tls_client_ca_file
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca is not None else None,
        require_client_auth=client_ca is not None,
    )


def _bind(
    server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None
) -> int:
    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    try:
        if credentials is None:
            bound: int = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise OSError(f"cannot bind gRPC port {address}: {exc} (is it in use?)") from exc
    return bound


async def serve(settings: Settings) -> bool:
    """Runs a server until SIGTERM or SIGINT, then drains and returns. True when every call
    accepted was answered within drain_timeout_s; False when the drain timed out."""
    server = Server(settings)
    await server.start()
    loop = asyncio.get_running_loop()
    drains: set[asyncio.Task[None]] = set()  # a reference, so the drain is not collected midway

    def drain() -> None:
        task = asyncio.ensure_future(server.stop())
        drains.add(task)
        task.add_done_callback(drains.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, drain)
    await server.wait_for_termination()
    return not server.drain_timed_out
