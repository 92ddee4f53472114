"""The HTTP port: one Starlette app, served by uvicorn in the server's own event loop.

It mounts the KServe v2 REST routes (`kserve_http`), the plain /v1 routes (`rest_v1`) and the
browser console's static files (`console/`, at /console/; / redirects there). What every route
shares lives here, once:

- errors: `error_response` is the one place a SegserveError (or anything else, logged, as
  INTERNAL) becomes an HTTP answer: the status of `HTTP_STATUSES` (from the gRPC code; 413 for
  a body over max_receive_message_bytes) and `{"error": message, "code": "NOT_FOUND"}`, or
  Triton's `{"error": message}` under /v2;
- auth (`AuthMiddleware`): segserve_server.auth's rules, as on the gRPC ports: health (/v2/health/*)
  and the console's files are open unless health_requires_auth; every other request needs
  `Authorization: Bearer <token>` (401), takes one request of the token's rate (429), and runs
  `auth.acting_as` its principal, so the core checks each model it runs; routes check the model
  a request names (`check_model`, 403), repository load/unload need admin (403), listings keep
  the models in scope (`may_use`);
- deadlines: the `Segserve-Timeout-S` (or `Request-Timeout`) header, in seconds (`deadline_of`);
- bodies: read up to max_receive_message_bytes (`read_body`, 413 past it);
- CORS: off unless http_cors_origins lists origins (Starlette's CORSMiddleware);
- compression: answers of http_gzip_min_bytes or more are gzipped for clients that accept it
  (Starlette's GZipMiddleware, outermost, so errors and auth answers too), except images, event
  streams (already compressed, or streamed) and KServe's /v2 routes (`GzipOutsideKServe`).

`HttpServer` runs uvicorn without its signal handling (segserve's own drain stops it): `stop`
closes the listening socket and idle connections at once and lets accepted requests finish
within the drain's budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import DEFAULT_EXCLUDED_CONTENT_TYPES, GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from segserve_server.adapters.grpc_helpers import as_segserve_error
from segserve_server.auth import (
    Access,
    Principal,
    TokenTable,
    acting_as,
)
from segserve_server.core.service import SegmentationCore
from segserve_server.core.tensor_types import IMAGE_SUFFIX
from segserve_server.core.tensors import TensorAPI
from segserve_server.errors import (
    BodyTooLarge,
    ClientGone,
    InvalidArgument,
    RateLimited,
    SegserveError,
    Unauthenticated,
)
from segserve_server.settings import Settings

T = TypeVar("T")

__all__ = [
    "CONSOLE_DIR",
    "EXPOSED_HEADERS",
    "GZIP_EXCLUDED",
    "HTTP_STATUSES",
    "OPEN_PREFIXES",
    "TIMEOUT_HEADERS",
    "AuthMiddleware",
    "GzipOutsideKServe",
    "HttpServer",
    "HttpState",
    "build_app",
    "check_admin",
    "check_model",
    "deadline_of",
    "endpoint",
    "error_response",
    "http_status",
    "may_use",
    "principal_of",
    "read_body",
    "state_of",
    "unless_disconnected",
]

GZIP_EXCLUDED = (*DEFAULT_EXCLUDED_CONTENT_TYPES, "image/png", "image/jpeg", "image/webp")
"""Answers never gzipped: compressed images (masks, overlays) gain nothing; streams would stall."""

log = logging.getLogger(__name__)

CONSOLE_DIR = Path(__file__).with_name("console")
HTTP_STATUSES: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
"""HTTP status of each gRPC code (Google's mapping; CANCELLED is nginx's 499)."""
_CODES_OF_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
}
TIMEOUT_HEADERS = ("segserve-timeout-s", "request-timeout")
"""Request headers that carry the deadline, in seconds from arrival (the first one set)."""
OPEN_PREFIXES = ("/v2/health/", "/console", "/favicon.ico")
"""Paths open without a token unless health_requires_auth (and / itself: a redirect)."""
EXPOSED_HEADERS = (
    "Inference-Header-Content-Length",
    "Server-Timing",
    "Segserve-Model",
    "Segserve-Model-Version",
    "Segserve-Classes-Present",
)
"""Response headers a browser script may read across origins (with CORS on)."""
_ADMIN_SUFFIXES = ("/load", "/unload")  # under /v2/repository/models/


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs `work` (a core call) until it ends, or until the client disconnects first: then the
    work is cancelled, as a gRPC call whose client goes away (its requests leave the queue, the
    core counts them CANCELLED), and ClientGone is raised. Call it once the body is read."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, SegserveError):
            await task
        raise ClientGone("the client closed the connection before the answer")
    return task.result()


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (after the body, the server's receive says only
    that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class HttpState:
    """What the routes serve from: the core, the Triton-protocol view, the settings."""

    core: SegmentationCore
    tensors: TensorAPI
    settings: Settings
    draining: asyncio.Event
    started_s: float = field(default_factory=time.monotonic)
    """time.monotonic() when the server started (/v1/stats' uptime)."""


def http_status(error: SegserveError) -> int:
    if isinstance(error, BodyTooLarge):
        return 413
    return HTTP_STATUSES.get(error.code, 500)


def error_response(path: str, error: SegserveError) -> JSONResponse:
    """The one conversion of an error to an HTTP answer (see the module docstring)."""
    status = http_status(error)
    body: dict[str, str] = {"error": error.message}
    if not path.startswith("/v2"):
        body["code"] = error.code.name
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="segserve"'
    return JSONResponse(body, status_code=status, headers=headers)


Handler = Callable[[Request], Awaitable[Response]]


def endpoint(handler: Handler) -> Handler:
    """A route handler whose failures become error_response answers (unexpected exceptions
    are logged and answered INTERNAL)."""

    async def handle(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:
            where = f"{request.method} {request.url.path}"
            return error_response(request.url.path, as_segserve_error(exc, where))

    handle.__name__ = handler.__name__
    handle.__doc__ = handler.__doc__
    return handle


def state_of(request: Request) -> HttpState:
    state: HttpState = request.app.state.segserve
    return state


def principal_of(request: Request) -> Principal | None:
    principal: Principal | None = request.scope.get("segserve.principal")
    return principal


def _model_of(name: str, kserve_names: bool) -> str:
    return name.removesuffix(IMAGE_SUFFIX) if kserve_names else name


def may_use(request: Request, name: str, *, kserve_names: bool = False) -> bool:
    """Whether the request's token covers model `name` (always, with authentication off)."""
    principal = principal_of(request)
    return principal is None or principal.may_use(_model_of(name, kserve_names))


def check_model(request: Request, name: str, *, kserve_names: bool = False) -> None:
    """PermissionDenied unless the request's token covers model `name` (KServe names:
    `<model>.image` is `<model>`), whether the model exists or not."""
    principal = principal_of(request)
    if principal is not None:
        principal.check_model(_model_of(name, kserve_names))


def check_admin(request: Request, what: str) -> None:
    principal = principal_of(request)
    if principal is not None:
        principal.check_admin(what)


def deadline_of(request: Request) -> float | None:
    """The request's deadline on time.monotonic() from its timeout header, or None."""
    for header in TIMEOUT_HEADERS:
        text = request.headers.get(header)
        if text is None:
            continue
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise InvalidArgument(f"header {header}: {text[:80]!r} is not a number of seconds > 0")
        return time.monotonic() + seconds
    return None


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The whole body, or BodyTooLarge as soon as it passes limit_bytes."""
    declared = request.headers.get("content-length")
    too_large = BodyTooLarge(
        f"request body is larger than max_receive_message_bytes ({limit_bytes} bytes)"
    )
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


class AuthMiddleware:
    """Authenticates every HTTP request but the open paths (see the module docstring)."""

    def __init__(self, app: ASGIApp, tokens: TokenTable, *, health_requires_auth: bool) -> None:
        self._app = app
        self._tokens = tokens
        self._open = () if health_requires_auth else OPEN_PREFIXES

    def _is_open(self, path: str) -> bool:
        return bool(self._open) and (path == "/" or path.startswith(self._open))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_open(scope["path"]):
            await self._app(scope, receive, send)
            return
        path: str = scope["path"]
        request = Request(scope)
        principal: Principal | None = None
        try:
            principal = self._tokens.authenticate(_authorization(request))
            principal.admit()
            if path.startswith("/v2/repository/models/") and path.endswith(_ADMIN_SUFFIXES):
                principal.check_admin(f"{request.method} {path}")
        except SegserveError as error:
            level = logging.INFO if isinstance(error, RateLimited) else logging.WARNING
            who = f"token {principal.name!r}" if principal else "a caller"
            log.log(level, "refused %s %s to %s: %s", request.method, path, who, error.message)
            await error_response(path, error)(scope, receive, send)
            return
        scope["segserve.principal"] = principal
        with acting_as(Access(principal)):
            await self._app(scope, receive, send)


def _authorization(request: Request) -> str | None:
    values = request.headers.getlist("authorization")
    if len(values) > 1:
        raise Unauthenticated("more than one Authorization header: send one 'Bearer <token>'")
    return values[0] if values else None


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such path, wrong method) in the same JSON shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    error = SegserveError(f"{request.method} {request.url.path}: {detail}")
    error.code = _CODES_OF_STATUS.get(status, grpc.StatusCode.INTERNAL)
    response = error_response(request.url.path, error)
    response.status_code = status
    return response


async def _to_console(request: Request) -> Response:
    return RedirectResponse("/console/")


class GzipOutsideKServe:
    """Starlette's GZipMiddleware for every route but KServe's /v2: stock tritonclient's aio
    client asks for gzip (aiohttp's default header) yet does not gunzip, so /v2 answers as
    Triton's own HTTP port does unasked."""

    def __init__(self, app: ASGIApp, minimum_size: int) -> None:
        self._app = app
        self._gzip = GZipMiddleware(  # level 6: most of level 9's gain at a fraction of its CPU
            app, minimum_size=minimum_size, compresslevel=6, exclude_content_types=GZIP_EXCLUDED
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] == "http" and path != "/v2" and not path.startswith("/v2/"):
            await self._gzip(scope, receive, send)
        else:
            await self._app(scope, receive, send)


def build_app(state: HttpState, tokens: TokenTable | None) -> Starlette:
    """The HTTP port's app: every route, auth (with tokens), CORS (with origins)."""
    from segserve_server.adapters import kserve_http, rest_v1

    routes: list[BaseRoute] = [
        *kserve_http.routes(state),
        *rest_v1.routes(state),
        Route("/", _to_console, methods=["GET"]),
        Mount("/console", StaticFiles(directory=CONSOLE_DIR, html=True, check_dir=False)),
    ]
    middleware: list[Middleware] = []
    if state.settings.http_gzip_min_bytes > 0:
        middleware.append(
            Middleware(GzipOutsideKServe, minimum_size=state.settings.http_gzip_min_bytes)
        )
    origins = state.settings.http_cors_origins
    if origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=[
                    "Authorization",
                    "Content-Type",
                    "Inference-Header-Content-Length",
                    "Segserve-Timeout-S",
                    "Request-Timeout",
                ],
                expose_headers=list(EXPOSED_HEADERS),
                max_age=600,
            )
        )
    if tokens is not None:
        middleware.append(
            Middleware(
                AuthMiddleware,
                tokens=tokens,
                health_requires_auth=state.settings.health_requires_auth,
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error},
    )
    app.state.segserve = state
    return app


class HttpServer:
    """uvicorn serving an ASGI app on one port, started and drained by segserve.Server."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        s = settings
        client_ca = s.tls_client_ca_file
        self._config = uvicorn.Config(
            app,
            lifespan="off",
            ws="none",
            log_config=None,
            access_log=False,
            server_header=False,
            ssl_certfile=s.tls_cert_file,
            ssl_keyfile=s.tls_key_file,
            ssl_ca_certs=client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca is not None else ssl.CERT_NONE,
        )
        self._server = uvicorn.Server(self._config)
        self._sockets: list[socket.socket] = []
        self._ticks: asyncio.Task[None] | None = None
        self.tls = s.tls_cert_file is not None

    async def start(self, host: str, port: int) -> int:
        """Binds host:port (0: a free port) and serves; returns the port bound."""
        self._config.load()
        self._sockets = [_bind(host, port)]
        server = self._server
        server.lifespan = self._config.lifespan_class(self._config)
        await server.startup(sockets=self._sockets)
        self._ticks = asyncio.create_task(server.main_loop())  # the Date header, each second
        bound: int = self._sockets[0].getsockname()[1]
        return bound

    async def stop(self, grace_s: float) -> None:
        """Stops accepting (listening socket and idle connections closed now); accepted
        requests get grace_s to be answered, then uvicorn cancels what is left."""
        server = self._server
        server.should_exit = True
        if self._ticks is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticks
        self._config.timeout_graceful_shutdown = max(1, math.ceil(grace_s))
        await server.shutdown(sockets=self._sockets)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        raise OSError(f"cannot bind HTTP port {host}:{port}: {exc} (is it in use?)") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
