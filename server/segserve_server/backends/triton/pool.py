"""A pool of Triton servers serving one model: least-outstanding-requests balancing, ejection of
a server that fails, readmission once its health checks pass.

`EndpointPool.call(fn, deadline_s)` runs `fn(client, timeout_s)` on the live server with the
fewest calls outstanding (ties go round-robin). When the call fails because of the server (it is
unreachable, went away mid-call, timed out, lost the model, or its model failed and its health
check then fails too), the server is ejected and the call is retried on another live server, so
a request accepted by segserve is not lost while any server is left.

Deadlines: each call gets the time its callers still have (`deadline_s`), capped by the pool's
`timeout_s`. When the callers' deadline is what ran out, the answer is DeadlineExceeded: the
server is not ejected and the call is not retried elsewhere, since nobody waits for it any more;
a call is never sent once that deadline has passed. Only a call that outlasts `timeout_s` itself
counts against the server. A failure of the request itself (an invalid
tensor; a model error on a healthy server) is not the server's fault and is raised at once.
Only when no live server is left does a call fail, with ModelUnavailable (UNAVAILABLE). A
background task probes the ejected servers every `health_interval_s` (server ready and model
ready) and readmits those that pass; it probes the live ones too, and ejects one that fails,
so a server that went away is ejected even while no call reaches it. `on_change(live_count)`
(set by the backend) is called on the loop after every ejection and readmission.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from segserve_server.errors import DeadlineExceeded, InferenceFailed, ModelUnavailable, QueueFull
from segserve_server.settings import check_url

__all__ = ["Endpoint", "EndpointPool", "EndpointState", "PoolStats"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Servers that come back are reconnected to within a second (gRPC's default backoff grows to
# two minutes); message sizes as tritonclient sets them.
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class EndpointState(enum.Enum):
    LIVE = "live"
    EJECTED = "ejected"


class _Fault(enum.Enum):
    SERVER = "server"  # eject and retry elsewhere
    MAYBE_SERVER = "maybe_server"  # probe it: eject and retry if the probe fails, else raise
    BUSY = "busy"  # retry elsewhere without ejecting
    TIMEOUT = "timeout"  # the caller's deadline, or the server too slow: see call()
    REQUEST = "request"  # raise


_FAULTS = {
    grpc.StatusCode.UNAVAILABLE: _Fault.SERVER,
    grpc.StatusCode.DEADLINE_EXCEEDED: _Fault.TIMEOUT,
    grpc.StatusCode.CANCELLED: _Fault.SERVER,  # cancelled by the server or the connection
    grpc.StatusCode.NOT_FOUND: _Fault.SERVER,  # this server lacks the model
    grpc.StatusCode.UNAUTHENTICATED: _Fault.SERVER,
    grpc.StatusCode.PERMISSION_DENIED: _Fault.SERVER,
    grpc.StatusCode.INTERNAL: _Fault.MAYBE_SERVER,
    grpc.StatusCode.UNKNOWN: _Fault.MAYBE_SERVER,
    grpc.StatusCode.RESOURCE_EXHAUSTED: _Fault.BUSY,
}


def _fault_of(exc: Exception) -> tuple[_Fault, str]:
    if isinstance(exc, InferenceServerException):
        status = exc.status() or ""
        code = next((c for c in grpc.StatusCode if str(c) == status), None)
        fault = _FAULTS.get(code, _Fault.REQUEST) if code is not None else _Fault.MAYBE_SERVER
        return fault, f"{status.removeprefix('StatusCode.') or 'error'}: {exc.message()}"
    return _Fault.SERVER, f"{type(exc).__name__}: {exc}"


@dataclass(eq=False)
class Endpoint:
    """One Triton server of the pool, with what the pool knows of it."""

    url: str
    client: triton_aio.InferenceServerClient
    state: EndpointState = EndpointState.EJECTED
    outstanding: int = 0
    calls: int = 0
    failures: int = 0
    ejections: int = 0
    reason: str = "not probed yet"
    ejected_at_s: float = 0.0
    readmitted_after_s: float | None = None  # how long its last ejection lasted


@dataclass(frozen=True)
class PoolStats:
    calls: int
    retries: int  # calls sent again to another server after a server failed them
    ejections: int
    readmissions: int
    deadline_expiries: int  # calls ended by their callers' deadline: neither retried nor ejected


class EndpointPool:
    """Triton servers serving `model` (version `version`, "" for the server's choice)."""

    def __init__(
        self,
        urls: list[str],
        model: str,
        version: str,
        *,
        timeout_s: float,
        health_interval_s: float,
        probe_timeout_s: float = 5.0,
        name: str = "",
    ) -> None:
        if not urls:
            raise ValueError("a Triton pool needs at least one server URL")
        self._urls = list(dict.fromkeys(check_url(u) for u in urls))
        self.model, self.version = model, version
        self._timeout_s = timeout_s
        self._health_interval_s = health_interval_s
        self._probe_timeout_s = probe_timeout_s
        self._name = name or model
        self.endpoints: list[Endpoint] = []
        self._next = 0
        self._retries = self._readmissions = 0
        self.deadline_expiries = 0  # calls ended by their callers' deadline (no server's fault)
        self._health_task: asyncio.Task[None] | None = None
        self.on_change: Callable[[int], None] | None = None  # after each ejection / readmission

    @property
    def live(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.state is EndpointState.LIVE]

    def stats(self) -> PoolStats:
        return PoolStats(
            calls=sum(e.calls for e in self.endpoints),
            retries=self._retries,
            ejections=sum(e.ejections for e in self.endpoints),
            readmissions=self._readmissions,
            deadline_expiries=self.deadline_expiries,
        )

    def describe(self) -> str:
        return ",".join(f"{e.url}({e.state.value})" for e in self.endpoints)

    async def start(self, ready_timeout_s: float) -> None:
        """Connects and probes every server; waits up to ready_timeout_s for one to be ready.

        Raises ModelUnavailable naming every server's reason if none is ready by then. Servers
        not ready yet stay ejected and are readmitted by the health checks.
        """
        self.endpoints = [
            Endpoint(url, triton_aio.InferenceServerClient(url, channel_args=_CHANNEL_ARGS))
            for url in self._urls
        ]
        deadline = time.monotonic() + ready_timeout_s
        while True:
            await asyncio.gather(*(self._probe_and_readmit(e) for e in self.endpoints))
            if self.live or time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(self._health_interval_s, max(0.0, deadline - time.monotonic())))
        self._health_task = asyncio.create_task(
            self._health_checks(), name=f"triton-health-{self._name}"
        )
        if not self.live:
            raise ModelUnavailable(self.unavailable_reason())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await asyncio.gather(*(e.client.close() for e in self.endpoints), return_exceptions=True)

    def _pick(self, exclude: set[Endpoint]) -> Endpoint | None:
        """The live server with the fewest outstanding calls; ties round-robin."""
        candidates = [e for e in self.live if e not in exclude]
        if not candidates:
            return None
        fewest = min(e.outstanding for e in candidates)
        tied = [e for e in candidates if e.outstanding == fewest]
        self._next += 1
        return tied[self._next % len(tied)]

    async def call(
        self,
        fn: Callable[[triton_aio.InferenceServerClient, float], Awaitable[T]],
        deadline_s: float | None,
    ) -> T:
        """Runs fn(client, timeout_s) on a live server; retries on another when a server fails
        it; deadline_s (time.monotonic(), None: none) bounds every try (see the module doc)."""
        tried: set[Endpoint] = set()
        busy = False
        while True:
            timeout_s, callers_bound = self._timeout_s, False
            if deadline_s is not None:
                remaining_s = deadline_s - time.monotonic()
                if remaining_s <= 0:
                    again = " again" if tried else ""
                    raise DeadlineExceeded(
                        f"deadline passed before model {self._name}'s batch was sent{again}"
                    )
                if remaining_s < timeout_s:
                    timeout_s, callers_bound = remaining_s, True
            endpoint = self._pick(tried)
            if endpoint is None:
                if busy and self.live:
                    raise QueueFull(
                        f"every Triton server of model {self._name} refused the batch as busy"
                    )
                raise ModelUnavailable(self.unavailable_reason())
            if tried:
                self._retries += 1
            tried.add(endpoint)
            endpoint.outstanding += 1
            endpoint.calls += 1
            try:
                return await fn(endpoint.client, timeout_s)
            except (InferenceServerException, grpc.RpcError, OSError) as exc:
                fault, reason = _fault_of(exc)
                if fault is _Fault.TIMEOUT:
                    if callers_bound:
                        self.deadline_expiries += 1
                        raise DeadlineExceeded(
                            f"deadline passed while Triton server {endpoint.url} ran model "
                            f"{self._name}'s batch"
                        ) from exc
                    fault = _Fault.SERVER  # slower than triton_timeout_s: the server's fault
                endpoint.failures += 1
                if fault is _Fault.MAYBE_SERVER and await self._probe(endpoint) is None:
                    raise InferenceFailed(
                        f"Triton server {endpoint.url} failed model {self.model}: {reason}"
                    ) from exc
                if fault is _Fault.REQUEST:
                    raise InferenceFailed(
                        f"Triton server {endpoint.url} refused model {self.model}'s batch: {reason}"
                    ) from exc
                if fault is _Fault.BUSY:
                    busy = True
                    log.info("Triton server %s is busy (%s); trying another", endpoint.url, reason)
                    continue
                self.eject(endpoint, reason)
            finally:
                endpoint.outstanding -= 1

    def eject(self, endpoint: Endpoint, reason: str) -> None:
        endpoint.reason = reason
        if endpoint.state is EndpointState.EJECTED:
            return
        endpoint.state = EndpointState.EJECTED
        endpoint.ejections += 1
        endpoint.ejected_at_s = time.monotonic()
        log.warning(
            "model %s: Triton server %s ejected (%s); %d of %d left",
            self._name,
            endpoint.url,
            reason,
            len(self.live),
            len(self.endpoints),
        )
        self._changed()

    def _readmit(self, endpoint: Endpoint) -> None:
        if endpoint.state is EndpointState.LIVE:
            return
        if endpoint.ejections:
            endpoint.readmitted_after_s = time.monotonic() - endpoint.ejected_at_s
            self._readmissions += 1
            log.warning(
                "model %s: Triton server %s readmitted after %.1fs",
                self._name,
                endpoint.url,
                endpoint.readmitted_after_s,
            )
        endpoint.state = EndpointState.LIVE
        endpoint.reason = ""
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change(len(self.live))
            except Exception:
                log.exception("model %s: the pool's on_change callback failed", self._name)

    async def _probe(self, endpoint: Endpoint) -> str | None:
        """None if the server and the model are ready, else why not."""
        timeout_s = self._probe_timeout_s
        try:
            if not await endpoint.client.is_server_ready(client_timeout=timeout_s):
                return "server not ready"
            if not await endpoint.client.is_model_ready(
                self.model, self.version, client_timeout=timeout_s
            ):
                version = f" version {self.version}" if self.version else ""
                return f"model {self.model}{version} not ready there"
        except (InferenceServerException, grpc.RpcError, OSError) as exc:
            return _fault_of(exc)[1]
        return None

    async def _probe_and_readmit(self, endpoint: Endpoint) -> None:
        reason = await self._probe(endpoint)
        if reason is None:
            self._readmit(endpoint)
        else:
            endpoint.reason = reason

    async def _check(self, endpoint: Endpoint) -> None:
        """Readmits an ejected server that passes its probe; ejects a live one that fails it."""
        if endpoint.state is EndpointState.EJECTED:
            await self._probe_and_readmit(endpoint)
            return
        reason = await self._probe(endpoint)
        if reason is not None and endpoint.state is EndpointState.LIVE:
            self.eject(endpoint, f"health check: {reason}")

    async def _health_checks(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval_s)
            await asyncio.gather(*(self._check(e) for e in self.endpoints))

    def unavailable_reason(self) -> str:
        """Why no call can be sent: "no Triton server is available for model ... (url: why)"."""
        reasons = "; ".join(f"{e.url}: {e.reason}" for e in self.endpoints)
        return f"no Triton server is available for model {self._name} ({reasons})"
