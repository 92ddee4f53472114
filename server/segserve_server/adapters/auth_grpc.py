"""Authentication for every gRPC port: one grpc.aio server interceptor (`AuthInterceptor`),
the same on the segserve.v1 and the KServe v2 server; the rules are `segserve_server.auth`'s.

For each call: health and reflection (and KServe ServerLive / ServerReady) pass untouched
unless `health_requires_auth`; every other call needs a known bearer token (UNAUTHENTICATED),
takes one request of the token's rate (RESOURCE_EXHAUSTED), and, by method (`RULES`):

- admin-only methods (model load and unload, anything of segserve.v1.ModelRepository, KServe's
  shared-memory, trace and log settings) need `admin` (PERMISSION_DENIED);
- a method whose request names a model checks it against the token's scope before the handler
  runs (PERMISSION_DENIED, whether the model exists or not; KServe `<model>.image` is `<model>`);
  the name is read from the serialized request without parsing the tensors or image;
- listings (ListModels, RepositoryIndex, ModelStatistics of every model) keep only the models
  in scope;
- the call runs `auth.acting_as` its principal, so the core checks every model it runs, stream
  frames included; in streams each frame also takes one request of the token's rate, and a
  frame refused is answered in its place (FrameError / error_message) while the stream goes on.

Refusals are logged at WARNING (the token's name or the peer, never the token).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import service_pb2 as kserve

from segserve.v1 import segserve_pb2 as pb
from segserve_server.adapters.grpc_helpers import abort_with
from segserve_server.auth import (
    Access,
    Principal,
    TokenTable,
    current_access,
)
from segserve_server.core.tensor_types import IMAGE_SUFFIX
from segserve_server.errors import RateLimited, SegserveError, Unauthenticated

__all__ = [
    "ADMIN_PREFIXES",
    "HEALTH_PREFIXES",
    "RULES",
    "AuthInterceptor",
    "MethodRule",
    "peek_string",
]

log = logging.getLogger(__name__)

HEALTH_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)
"""Open without a token unless health_requires_auth."""
ADMIN_PREFIXES = ("/segserve.v1.ModelRepository/",)
"""Every method of these services needs an admin token (matched by prefix)."""


@dataclass(frozen=True)
class MethodRule:
    """What a method needs beyond a known token."""

    model_field: tuple[type[Message], str] | None = None
    """(request type, field) naming the model the call is about ('' : none, e.g. every model)."""
    kserve_names: bool = False
    """Model names are KServe routes: `<model>.image` is `<model>`."""
    admin: bool = False
    listing: str | None = None
    """The response's repeated field of per-model entries (by .name) to keep in scope."""
    per_request: bool = False
    """A stream: each frame is checked and metered by the core."""


_SEG = "/segserve.v1.Segmentation/"
_KS = "/inference.GRPCInferenceService/"
_REPO = "/segserve.v1.ModelRepository/"
RULES: dict[str, MethodRule] = {
    _SEG + "Segment": MethodRule((pb.SegmentRequest, "model")),
    _SEG + "SegmentStream": MethodRule(per_request=True),
    _SEG + "GetModel": MethodRule((pb.GetModelRequest, "name")),
    _SEG + "ListModels": MethodRule(listing="models"),
    _KS + "ModelReady": MethodRule((kserve.ModelReadyRequest, "name"), kserve_names=True),
    _KS + "ModelMetadata": MethodRule((kserve.ModelMetadataRequest, "name"), kserve_names=True),
    _KS + "ModelConfig": MethodRule((kserve.ModelConfigRequest, "name"), kserve_names=True),
    _KS + "ModelInfer": MethodRule((kserve.ModelInferRequest, "model_name"), kserve_names=True),
    _KS + "ModelStreamInfer": MethodRule(kserve_names=True, per_request=True),
    _KS + "ModelStatistics": MethodRule(
        (kserve.ModelStatisticsRequest, "name"), kserve_names=True, listing="model_stats"
    ),
    _KS + "RepositoryIndex": MethodRule(kserve_names=True, listing="models"),
    _REPO + "LoadModel": MethodRule((pb.LoadModelRequest, "name"), admin=True),
    _REPO + "UnloadModel": MethodRule((pb.UnloadModelRequest, "name"), admin=True),
    _REPO + "RepositoryIndex": MethodRule(admin=True, listing="models"),
    _KS + "RepositoryModelLoad": MethodRule(
        (kserve.RepositoryModelLoadRequest, "model_name"), kserve_names=True, admin=True
    ),
    _KS + "RepositoryModelUnload": MethodRule(
        (kserve.RepositoryModelUnloadRequest, "model_name"), kserve_names=True, admin=True
    ),
    _KS + "TraceSetting": MethodRule(
        (kserve.TraceSettingRequest, "model_name"), kserve_names=True, admin=True
    ),
    **{
        _KS + name: MethodRule(admin=True)
        for name in (
            "LogSettings",
            "SystemSharedMemoryStatus",
            "SystemSharedMemoryRegister",
            "SystemSharedMemoryUnregister",
            "CudaSharedMemoryStatus",
            "CudaSharedMemoryRegister",
            "CudaSharedMemoryUnregister",
        )
    },
}
_ADMIN_RULE = MethodRule(admin=True)
_PLAIN_RULE = MethodRule()


def peek_string(data: bytes, number: int) -> str | None:
    """Top-level string field `number` of a serialized message, as a parser would read it (the
    last occurrence wins; absent: ''), without parsing the rest (tensors and images are
    skipped, not copied). None when the bytes are not plain wire format (then parse)."""
    view = memoryview(data)
    found = ""
    at, end = 0, len(view)
    try:
        while at < end:
            key, at = _varint(view, at)
            wire = key & 7
            if wire == 0:
                _, at = _varint(view, at)
            elif wire == 1:
                at += 8
            elif wire == 5:
                at += 4
            elif wire == 2:
                length, at = _varint(view, at)
                if key >> 3 == number:
                    found = bytes(view[at : at + length]).decode()
                at += length
            else:
                return None  # groups: leave them to the real parser
        return found if at == end else None
    except (IndexError, UnicodeDecodeError):
        return None


def _varint(view: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates and authorizes every call of a grpc.aio server (see the module)."""

    def __init__(self, tokens: TokenTable, *, health_requires_auth: bool = False) -> None:
        self._tokens = tokens
        self._open = () if health_requires_auth else HEALTH_PREFIXES

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = details.method
        handler = await continuation(details)
        if method.startswith(self._open):
            return handler
        rule = RULES.get(method) or (
            _ADMIN_RULE if method.startswith(ADMIN_PREFIXES) else _PLAIN_RULE
        )
        principal: Principal | None = None
        try:
            principal = self._tokens.authenticate(_authorization(details.invocation_metadata))
            principal.admit()
            if rule.admin:
                principal.check_admin(method)
        except SegserveError as error:
            _log_refusal(method, principal.name if principal else None, error)
            return _refusal(handler, error)
        if handler is None:
            return None
        return _authorized(handler, method, rule, Access(principal, rule.per_request))


def _authorization(metadata: Any) -> str | None:
    values = [value for key, value in metadata or () if key == "authorization"]
    if len(values) > 1:
        raise Unauthenticated("more than one authorization metadata entry")
    value = values[0] if values else None
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _log_refusal(method: str, name: str | None, error: SegserveError) -> None:
    level = logging.INFO if isinstance(error, RateLimited) else logging.WARNING
    who = f"token {name!r}" if name else "a caller"
    log.log(level, "refused %s to %s: %s %s", method, who, error.code.name, error.message)


def _refusal(handler: grpc.RpcMethodHandler | None, error: SegserveError) -> Any:
    """A handler of the call's own kind that answers `error` without reading a request."""

    async def unary(request: object, context: grpc.aio.ServicerContext) -> None:
        await abort_with(context, error)

    async def streaming(
        request: object, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Message]:
        await abort_with(context, error)
        return
        yield  # an async generator that answers nothing

    if handler is None or not (handler.request_streaming or handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(unary)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    return grpc.unary_stream_rpc_method_handler(streaming)


def _authorized(
    handler: grpc.RpcMethodHandler, method: str, rule: MethodRule, access: Access
) -> Any:
    """The handler, run as `access`, with the rule's model check and listing filter."""
    principal = access.principal
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }

    def model_allowed(name: str) -> bool:
        if rule.kserve_names and name.endswith(IMAGE_SUFFIX):
            name = name[: -len(IMAGE_SUFFIX)]
        return principal.may_use(name)

    def check(request: object, context: grpc.aio.ServicerContext) -> SegserveError | None:
        current_access.set(access)  # this call's task: the core and the tasks it starts see it
        if rule.model_field is None:
            return None
        name = _requested_model(request, *rule.model_field)
        if name and not model_allowed(name):
            try:
                principal.check_model(name)
            except SegserveError as error:
                _log_refusal(method, principal.name, error)
                return error
        return None

    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request: object, context: grpc.aio.ServicerContext) -> Any:
            refused = check(request, context)
            if refused is not None:
                await abort_with(context, refused)
                return None  # the call had already ended
            response = await inner(request, context)
            if rule.listing is not None and isinstance(response, Message):
                _keep_in_scope(getattr(response, rule.listing), model_allowed)
            return response

        return grpc.unary_unary_rpc_method_handler(unary_unary, **serializers)
    if handler.stream_stream is not None:
        inner_ss = handler.stream_stream

        async def stream_stream(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            check(None, context)
            async for answer in inner_ss(requests, context):
                yield answer

        return grpc.stream_stream_rpc_method_handler(stream_stream, **serializers)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(
            request: object, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            check(None, context)
            async for answer in inner_us(request, context):
                yield answer

        return grpc.unary_stream_rpc_method_handler(unary_stream, **serializers)
    inner_su = handler.stream_unary

    async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        check(None, context)
        return await inner_su(requests, context)

    return grpc.stream_unary_rpc_method_handler(stream_unary, **serializers)


def _requested_model(request: object, message_cls: type[Message], field: str) -> str | None:
    """The model a request names; None when it cannot be read (the handler then answers
    INVALID_ARGUMENT, as for any message that does not parse)."""
    if isinstance(request, Message):
        return str(getattr(request, field))
    if not isinstance(request, bytes):
        return None
    number = message_cls.DESCRIPTOR.fields_by_name[field].number
    name = peek_string(request, number)
    if name is not None:
        return name
    try:
        return str(getattr(message_cls.FromString(request), field))
    except DecodeError:
        return None


def _keep_in_scope(entries: Any, allowed: Callable[[str], bool]) -> None:
    kept = [entry for entry in entries if allowed(entry.name)]
    if len(kept) != len(entries):
        del entries[:]
        entries.extend(kept)
