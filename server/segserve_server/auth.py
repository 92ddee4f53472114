"""Who may call segserve: bearer tokens, their model scopes and admin right, and rate limits.

Independent of the transport, so that every surface (the gRPC ports through
`adapters.auth_grpc`, an HTTP port the same way) applies the same rules:

- `TokenTable.authenticate(header)` turns an `authorization: Bearer <token>` value into the
  token's `Principal`, or raises `Unauthenticated` (UNAUTHENTICATED; the message carries a
  `www-authenticate`-style hint and never the token). Tokens are compared by their SHA-256 in
  constant time, against every entry.
- `Principal.admit()` takes one request from the token's bucket (`RateLimit`: rate_per_s,
  burst), or raises `RateLimited` (RESOURCE_EXHAUSTED) naming the token and its limit.
- `Principal.check_model(name)` / `check_admin(what)` raise `PermissionDenied`
  (PERMISSION_DENIED) outside the token's `models` scope or without its `admin` right.
- The surface runs the call `acting_as(access)`; the core checks each model it is asked for
  with `authorize_model(name, required=...)` (stream frames included), where the name is known.

Tokens come from a TOML file (`load_tokens(file=...)`, the format in docs/security.md) or the
environment (`name=token` pairs, comma-separated: every model, no admin right, no limit).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import logging
import math
import re
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from segserve_server.errors import PermissionDenied, RateLimited, SegserveError, Unauthenticated

__all__ = [
    "AUTH_HINT",
    "MIN_SECRET_CHARS",
    "Access",
    "Principal",
    "RateLimit",
    "TokenTable",
    "acting_as",
    "authorize_model",
    "current_access",
    "load_tokens",
    "token_sha256",
]

log = logging.getLogger(__name__)

AUTH_HINT = (
    'send metadata "authorization: Bearer <token>" (www-authenticate: Bearer realm="segserve")'
)
MIN_SECRET_CHARS = 16
"""Shortest token accepted from the file's `secret` or the environment (guessable otherwise)."""
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_SECRET = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: what gRPC metadata and HTTP headers carry
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_KEYS = {"name", "secret", "sha256", "models", "admin", "rate_per_s", "burst"}


def token_sha256(token: str) -> str:
    """The hex SHA-256 of a token, as the file's `sha256` key holds it."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: `burst` requests at once, refilled at `rate_per_s`."""

    rate_per_s: float
    burst: int

    def __str__(self) -> str:
        return f"{self.rate_per_s:g} requests/s (burst {self.burst})"


class _Bucket:
    """Thread-safe token bucket on time.monotonic() (an HTTP port may run in another thread)."""

    def __init__(self, limit: RateLimit) -> None:
        self._limit = limit
        self._level = float(limit.burst)
        self._at_s = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0 if a request was taken, else the seconds until one is available."""
        with self._lock:
            now_s = time.monotonic()
            self._level = min(
                float(self._limit.burst),
                self._level + (now_s - self._at_s) * self._limit.rate_per_s,
            )
            self._at_s = now_s
            if self._level >= 1.0:
                self._level -= 1.0
                return 0.0
            return (1.0 - self._level) / self._limit.rate_per_s


@dataclass(eq=False)
class Principal:
    """A token's holder: its name (logged, never the token), the models it may use (None:
    every model), whether it may load and unload models, and its rate limit (None: none)."""

    name: str
    models: frozenset[str] | None = None
    admin: bool = False
    rate_limit: RateLimit | None = None
    _bucket: _Bucket | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.rate_limit is not None:
            self._bucket = _Bucket(self.rate_limit)

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def check_model(self, model: str) -> None:
        if not self.may_use(model):
            raise PermissionDenied(
                f"token {self.name!r} may not use model {model!r} (its models: "
                f"{', '.join(sorted(self.models or ())) or 'none'})"
            )

    def check_admin(self, what: str) -> None:
        if not self.admin:
            raise PermissionDenied(
                f"{what} needs a token with admin = true; token {self.name!r} has none"
            )

    def admit(self) -> None:
        """Takes one request from the token's bucket, or raises RateLimited."""
        if self._bucket is None:
            return
        wait_s = self._bucket.take()
        if wait_s > 0:
            raise RateLimited(
                f"token {self.name!r} is over its rate limit of {self.rate_limit}; "
                f"retry in {wait_s:.2g} s"
            )


class TokenTable:
    """Every token the server accepts, by SHA-256 (the tokens themselves are not kept)."""

    def __init__(self, entries: list[tuple[str, Principal]]) -> None:
        names = [p.name for _, p in entries]
        doubles = sorted({n for n in names if names.count(n) > 1})
        if doubles:
            raise ValueError(f"token names are not unique: {', '.join(doubles)}")
        digests = [d for d, _ in entries]
        if len(set(digests)) != len(digests):
            raise ValueError("two token entries have the same token")
        self._entries = [(bytes.fromhex(d), p) for d, p in entries]

    @property
    def principals(self) -> list[Principal]:
        return [p for _, p in self._entries]

    def authenticate(self, header: str | None) -> Principal:
        """The principal of an `authorization` value ("Bearer <token>"), or Unauthenticated."""
        if not header:
            raise Unauthenticated(f"missing credentials: {AUTH_HINT}")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(f"authorization is not 'Bearer <token>': {AUTH_HINT}")
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        found: Principal | None = None
        for known, principal in self._entries:  # every entry: the time does not tell which
            if hmac.compare_digest(known, digest):
                found = principal
        if found is None:
            raise Unauthenticated(f'unknown bearer token (error="invalid_token"): {AUTH_HINT}')
        return found


def load_tokens(*, file: Path | None = None, env: str | None = None) -> TokenTable | None:
    """The tokens of a TOML file and of the environment's `name=token,...`; None when neither
    is given (authentication off). Raises ValueError naming the entry (never its token)."""
    if file is None and not env:
        return None
    entries: list[tuple[str, Principal]] = []
    if file is not None:
        entries.extend(_file_entries(file))
    if env:
        entries.extend(_env_entries(env))
    if not entries:
        raise ValueError("authentication is on but no token is configured")
    return TokenTable(entries)


def _env_entries(env: str) -> list[tuple[str, Principal]]:
    entries = []
    for number, item in enumerate((i.strip() for i in env.split(",")), 1):
        if not item:
            continue
        name, sep, secret = item.partition("=")
        if not sep:
            raise ValueError(f"auth_tokens entry {number} is not name=token")
        entries.append((_checked_secret(secret, f"auth_tokens entry {name!r}"), _principal(name)))
    return entries


def _file_entries(path: Path) -> list[tuple[str, Principal]]:
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read auth_tokens_file {str(path)!r}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"auth_tokens_file {str(path)!r} is not TOML: {exc}") from exc
    tokens = document.get("tokens")
    if set(document) - {"tokens"} or not isinstance(tokens, list):
        raise ValueError(f"auth_tokens_file {str(path)!r} must hold [[tokens]] tables only")
    return [_file_entry(entry, number, path) for number, entry in enumerate(tokens, 1)]


def _file_entry(entry: object, number: int, path: Path) -> tuple[str, Principal]:
    where = f"auth_tokens_file {str(path)!r} entry {number}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is not a table")
    unknown = set(entry) - _KEYS
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)} (known: {sorted(_KEYS)})")
    name = entry.get("name")
    if not isinstance(name, str):
        raise ValueError(f"{where} has no name")
    where = f"{where} ({name!r})"
    if ("secret" in entry) == ("sha256" in entry):
        raise ValueError(f"{where} needs exactly one of secret and sha256")
    if "sha256" in entry:
        digest = entry["sha256"]
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ValueError(f"{where}: sha256 is not 64 hex digits")
        digest = digest.lower()
    else:
        digest = _checked_secret(entry["secret"], where)
    models = entry.get("models")
    if models is not None and (
        not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)
    ):
        raise ValueError(f"{where}: models is not a list of model names")
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise ValueError(f"{where}: admin {admin!r} is not true or false")
    return digest, _principal(name, models, admin, _rate_limit(entry, where))


def _rate_limit(entry: dict[str, object], where: str) -> RateLimit | None:
    rate = entry.get("rate_per_s")
    burst = entry.get("burst")
    if rate is None:
        if burst is not None:
            raise ValueError(f"{where}: burst needs rate_per_s")
        return None
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
        raise ValueError(f"{where}: rate_per_s {rate!r} is not a number > 0")
    if burst is None:
        burst = max(1, math.ceil(rate))
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"{where}: burst {burst!r} is not an integer >= 1")
    return RateLimit(float(rate), burst)


def _checked_secret(secret: object, where: str) -> str:
    if not isinstance(secret, str) or not _SECRET.match(secret):
        raise ValueError(f"{where}: the token is not visible ASCII without spaces")
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"{where}: the token has fewer than {MIN_SECRET_CHARS} characters")
    return token_sha256(secret)


def _principal(
    name: str,
    models: list[str] | None = None,
    admin: bool = False,
    rate_limit: RateLimit | None = None,
) -> Principal:
    if not _NAME.match(name):
        raise ValueError(f"token name {name[:80]!r} is not 1-64 of A-Z a-z 0-9 _ . @ -")
    scope = None if models is None else frozenset(models)
    return Principal(name, scope, admin, rate_limit)


@dataclass(frozen=True)
class Access:
    """Who a call acts for, and whether each request of it (a stream's frames) is metered."""

    principal: Principal
    per_request: bool = False


current_access: contextvars.ContextVar[Access | None] = contextvars.ContextVar(
    "segserve_access", default=None
)
"""The call's Access, set by the surface for the call (its task and the tasks it starts)."""


@contextlib.contextmanager
def acting_as(access: Access) -> Iterator[None]:
    """Runs the block as `access` (see current_access)."""
    token = current_access.set(access)
    try:
        yield
    finally:
        current_access.reset(token)


def authorize_model(model: str, *, required: bool) -> None:
    """The core's check of each model it is asked to run: within the current principal's scope
    (PermissionDenied), and for metered calls (streams) one request of its rate (RateLimited).
    Without a current principal: allowed when authentication is off (`required` False),
    Unauthenticated when it is on (a surface that forgot to authenticate fails closed)."""
    access = current_access.get()
    if access is None:
        if required:
            raise Unauthenticated(f"this call was not authenticated: {AUTH_HINT}")
        return
    try:
        access.principal.check_model(model)
        if access.per_request:
            access.principal.admit()
    except RateLimited as exc:
        log.info("refused a request of token %r: %s", access.principal.name, exc.message)
        raise
    except SegserveError as exc:
        log.warning("refused a request of token %r: %s", access.principal.name, exc.message)
        raise
