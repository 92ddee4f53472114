"""What both gRPC adapters share: parsing, deadlines, the one place a SegserveError becomes a
status, handler tables, and the ordered stream with its drain answer.

Requests arrive as bytes and are parsed here, so that a message of the wrong type is
INVALID_ARGUMENT rather than gRPC's UNKNOWN. Unary calls abort with the error's status. In a
bidirectional stream, the rule for both APIs is the same: **a frame that does not parse is
answered in its place, in order, with INVALID_ARGUMENT, and the stream goes on** (the adapter
turns the `InvalidArgument` it receives instead of a message into its error answer); only the
server draining or the client going away ends a stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from segserve_server.core.streams import StreamCut, StreamDrained, ordered_answers
from segserve_server.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidArgument,
    ModelUnavailable,
    SegserveError,
)

__all__ = [
    "StreamHandler",
    "StreamLimits",
    "abort_with",
    "as_segserve_error",
    "deadline_of",
    "handler_table",
    "ordered_stream",
    "parse",
    "parsed_frames",
    "stream_cut_at",
]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
A = TypeVar("A")
F = TypeVar("F")

# A servicer's methods, on parsed requests (each takes its own message type, hence Any) ...
Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]
Streaming = Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], AsyncIterator[Message]]
Uploading = Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], Awaitable[Message]]
# ... and the handlers gRPC calls, on the serialized requests.
UnaryHandler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message]]
UploadHandler = Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], Awaitable[Message]]
StreamingHandler = Callable[
    [AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[Message]
]


def parse(message_cls: type[M], data: bytes) -> M:
    """The message, or InvalidArgument naming the type it should have been."""
    try:
        message: M = message_cls.FromString(data)
    except DecodeError as exc:
        raise InvalidArgument(
            f"request is not a valid {message_cls.DESCRIPTOR.full_name} message: {exc}"
        ) from exc
    return message


async def parsed_frames(
    message_cls: type[M], frames: AsyncIterator[bytes]
) -> AsyncIterator[M | InvalidArgument]:
    """Each frame parsed; a frame that does not parse becomes its InvalidArgument (see above)."""
    async for data in frames:
        try:
            yield parse(message_cls, data)
        except InvalidArgument as exc:
            yield exc


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the time.monotonic() clock, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def as_segserve_error(exc: Exception, where: str) -> SegserveError:
    """A SegserveError as it is; anything else is a bug of ours: logged, then INTERNAL."""
    if isinstance(exc, SegserveError):
        return exc
    log.error("unexpected error in %s", where, exc_info=exc)
    return InferenceFailed(f"internal error: {type(exc).__name__}: {exc}")


def _unary(request_cls: type[Message], behaviour: Unary, where: str) -> UnaryHandler:
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> Message:
        try:
            return await behaviour(parse(request_cls, data), context)
        except grpc.aio.AbortError:
            raise  # context.abort was already called
        except Exception as exc:
            await abort_with(context, as_segserve_error(exc, where))

    return handle


async def abort_with(context: grpc.aio.ServicerContext, error: SegserveError) -> None:
    """Ends the call with the error's status, unless the call has already ended (the client
    went away, or a broken call failed its own abort): then there is nobody to tell."""
    if context.done() or context.cancelled():
        log.debug("call already ended; not answering %s: %s", error.code.name, error.message)
        return
    try:
        await context.abort(error.code, error.message)
    except grpc.aio.AbortError:
        raise  # how abort ends a handler
    except Exception as exc:  # grpc's own errors of a call that broke meanwhile
        log.debug("could not answer %s on a broken call: %s", error.code.name, exc)


def _streaming(request_cls: type[Message], behaviour: Streaming, where: str) -> StreamingHandler:
    async def handle(
        frames: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Message]:
        try:
            async for answer in behaviour(parsed_frames(request_cls, frames), context):
                yield answer
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            if context.done() or context.cancelled():
                return  # a broken call failed its abort: the client is gone
            await abort_with(context, as_segserve_error(exc, where))

    return handle


def _client_streaming(
    request_cls: type[Message], behaviour: Uploading, where: str
) -> UploadHandler:
    """A client-streaming call (one answer): a message that does not parse, or any error,
    ends the call with its status (the answer is for the whole stream)."""

    async def handle(frames: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Message:
        async def messages() -> AsyncIterator[Message]:
            async for data in frames:
                yield parse(request_cls, data)

        try:
            return await behaviour(messages(), context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, as_segserve_error(exc, where))

    return handle


def _refuse(message: str) -> UnaryHandler:
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> Message:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return handle


def handler_table(
    service: ServiceDescriptor,
    messages: ModuleType,
    servicer: object,
    *,
    implemented: Iterable[str] | None = None,
    unimplemented: Callable[[str], str] | None = None,
) -> grpc.GenericRpcHandler:
    """gRPC handlers for every method of `service`, calling the servicer's method of the same
    name on parsed messages (`messages`: the generated module of the request/response types).

    Methods not in `implemented` (None: all) answer UNIMPLEMENTED with unimplemented(name)."""
    wanted = None if implemented is None else set(implemented)
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_cls = getattr(messages, method.input_type.name)
        serialize = getattr(messages, method.output_type.name).SerializeToString
        where = f"{service.name}.{method.name}"
        if wanted is not None and method.name not in wanted:
            why = unimplemented(method.name) if unimplemented else f"{where} is not implemented"
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _refuse(why), response_serializer=serialize
            )
        elif method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                _client_streaming(request_cls, getattr(servicer, method.name), where),
                response_serializer=serialize,
            )
        elif method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _streaming(request_cls, getattr(servicer, method.name), where),
                response_serializer=serialize,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(request_cls, getattr(servicer, method.name), where),
                response_serializer=serialize,
            )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


@dataclass(frozen=True)
class StreamHandler(Generic[F, A]):
    """What a stream adapter answers for each frame read: its answer (never raising), whether
    it is a LATEST frame, and the answers of a frame dropped or cut (see core.streams)."""

    answer: Callable[[F], Coroutine[Any, Any, A]]
    cut: Callable[[F], A]
    latest: Callable[[F], bool] = lambda frame: False
    dropped: Callable[[F], A] | None = None


@dataclass(frozen=True)
class StreamLimits:
    """A stream API's flow control (core.streams.ordered_answers) and what it calls a frame."""

    max_inflight: int
    max_unsent: int
    what: str


def stream_cut_at(context: grpc.aio.ServicerContext, margin_s: float) -> float | None:
    """When a stream with a deadline stops reading and answers what it read: margin_s before
    the deadline (time.monotonic()); None without a deadline."""
    deadline_s = deadline_of(context)
    return None if deadline_s is None else deadline_s - margin_s


async def ordered_stream(
    frames: AsyncIterator[F],
    handler: StreamHandler[F, A],
    context: grpc.aio.ServicerContext,
    limits: StreamLimits,
    draining: asyncio.Event | None,
    cut_at_s: float | None,
) -> AsyncIterator[A]:
    """handler.answer(frame) for every frame, in frame order (core.streams.ordered_answers).
    When the server drains, reading stops, every frame read is answered, and the stream ends
    UNAVAILABLE; when the call's deadline nears (cut_at_s), reading stops, every frame read is
    answered (unfinished ones cut), and the stream ends DEADLINE_EXCEEDED."""
    try:
        async for result in ordered_answers(
            frames,
            handler.answer,
            max_inflight=limits.max_inflight,
            max_unsent=limits.max_unsent,
            draining=draining,
            latest=handler.latest,
            dropped=handler.dropped,
            cut=handler.cut,
            cut_at_s=cut_at_s,
        ):
            yield result
    except StreamDrained:
        await abort_with(
            context,
            ModelUnavailable(
                f"server is draining: every {limits.what} read was answered; send the rest to another "
                "replica"
            ),
        )
    except StreamCut:
        await abort_with(
            context,
            DeadlineExceeded(
                f"the stream's deadline came: every {limits.what} read was answered; long-lived streams "
                "should set no deadline and bound each frame with a max age"
            ),
        )
