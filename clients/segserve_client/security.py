"""Channels to a segserve server: TLS (a CA file or the system roots, a client certificate for
mutual TLS, a server name override) and a bearer token, for both clients and every CLI.

    client = SegserveClient("seg.example:50051", tls=TLSConfig(ca_file=Path("ca.pem")),
                            token="...")  # or SEGSERVE_TOKEN in the environment

The token goes with every call as `authorization: Bearer <token>` metadata (a channel
interceptor, so calls added later carry it too). Over plaintext it travels in the clear: give
a token without TLS only on loopback or behind a TLS-terminating proxy you trust.
"""

from __future__ import annotations

import argparse
import collections
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

__all__ = [
    "TLS_ENV",
    "TOKEN_ENV",
    "TLSConfig",
    "add_security_arguments",
    "aio_channel",
    "resolve_token",
    "security_of",
    "sync_channel",
]

TOKEN_ENV = "SEGSERVE_TOKEN"
Options = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class TLSConfig:
    """TLS to the server. `ca_file`: PEM roots that signed the server's certificate (None: the
    system's); `cert_file` and `key_file`: this client's certificate for mutual TLS (both or
    neither); `server_name`: the name to check the certificate against, when not the target's
    host (an IP address, a tunnel)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials; raises OSError naming a file that cannot be read."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.key_file),
            certificate_chain=_read(self.cert_file),
        )

    def options(self) -> list[tuple[str, Any]]:
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read TLS file {str(path)!r}: {exc.strerror or exc}") from exc


def resolve_token(token: str | None) -> str | None:
    """The token given, else $SEGSERVE_TOKEN; '' means none (the environment ignored)."""
    if token is None:
        token = os.environ.get(TOKEN_ENV, "")
    token = token.strip()
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError("the token has spaces or control characters (check $SEGSERVE_TOKEN)")
    return token or None


def _channel_credentials(
    tls: TLSConfig | None, credentials: grpc.ChannelCredentials | None
) -> grpc.ChannelCredentials | None:
    if tls is not None and credentials is not None:
        raise ValueError("give tls or credentials, not both")
    return tls.credentials() if tls is not None else credentials


def sync_channel(
    target: str,
    options: Options,
    *,
    tls: TLSConfig | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
) -> grpc.Channel:
    """A blocking channel: TLS with `tls` (or ready-made `credentials`), else plaintext; with
    the token (resolve_token) on every call."""
    creds = _channel_credentials(tls, credentials)
    options = [*options, *(tls.options() if tls else [])]
    if creds is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, creds, options=options)
    bearer = resolve_token(token)
    if bearer is None:
        return channel
    return grpc.intercept_channel(channel, _SyncToken(bearer))


def aio_channel(
    target: str,
    options: Options,
    *,
    tls: TLSConfig | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
) -> grpc.aio.Channel:
    """The asyncio channel of sync_channel's arguments."""
    creds = _channel_credentials(tls, credentials)
    options = [*options, *(tls.options() if tls else [])]
    bearer = resolve_token(token)
    interceptors = None if bearer is None else _aio_interceptors(bearer)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)


class _SyncDetails(
    collections.namedtuple(
        "_SyncDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    pass


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds the bearer token to every call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> _SyncDetails:
        return _SyncDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._entry],
            details.credentials,
            details.wait_for_ready,
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return continuation(self._details(details), requests)


def _aio_details(details: Any, entry: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(*entry)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, entry: tuple[str, str]) -> None:
        self._entry = entry

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._entry), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, entry: tuple[str, str]) -> None:
        self._entry = entry

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._entry), request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, entry: tuple[str, str]) -> None:
        self._entry = entry

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_aio_details(details, self._entry), requests)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, entry: tuple[str, str]) -> None:
        self._entry = entry

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_aio_details(details, self._entry), requests)


def _aio_interceptors(token: str) -> list[Any]:
    """One interceptor per call kind: grpc.aio picks them by class."""
    entry = ("authorization", f"Bearer {token}")
    return [
        _AioUnaryUnary(entry),
        _AioUnaryStream(entry),
        _AioStreamUnary(entry),
        _AioStreamStream(entry),
    ]


TLS_ENV = {
    "tls_ca": "SEGSERVE_TLS_CA",
    "tls_cert": "SEGSERVE_TLS_CERT",
    "tls_key": "SEGSERVE_TLS_KEY",
}
"""Environment defaults of the CLI's TLS flags."""


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """The CLI flags of TLS and the token (every subcommand that talks to a server)."""
    parser.add_argument(
        "--tls", action="store_true", help="TLS, trusting the system's roots (implied by --tls-ca)"
    )
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=_env_path("tls_ca"),
        metavar="PEM",
        help=f"CA certificates that signed the server's (default: ${TLS_ENV['tls_ca']})",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        default=_env_path("tls_cert"),
        metavar="PEM",
        help=f"client certificate, for mutual TLS (default: ${TLS_ENV['tls_cert']})",
    )
    parser.add_argument(
        "--tls-key",
        type=Path,
        default=_env_path("tls_key"),
        metavar="PEM",
        help=f"the client certificate's key (default: ${TLS_ENV['tls_key']})",
    )
    parser.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="name the server's certificate must carry, when not the --server host",
    )
    parser.add_argument(
        "--token",
        help=f"bearer token (default: ${TOKEN_ENV}; prefer the variable: `ps` shows flags)",
    )


def _env_path(key: str) -> Path | None:
    value = os.environ.get(TLS_ENV[key])
    return Path(value) if value else None


def security_of(args: argparse.Namespace) -> tuple[TLSConfig | None, str | None]:
    """The TLSConfig (None: plaintext) and token (None: $SEGSERVE_TOKEN) of the parsed flags."""
    flags = {
        name: getattr(args, name, None)
        for name in ("tls_ca", "tls_cert", "tls_key", "tls_server_name")
    }
    tls = None
    if getattr(args, "tls", False) or any(value is not None for value in flags.values()):
        tls = TLSConfig(
            flags["tls_ca"], flags["tls_cert"], flags["tls_key"], flags["tls_server_name"]
        )
    return tls, getattr(args, "token", None)
