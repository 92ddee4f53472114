"""The one exception hierarchy of segserve; each error carries the gRPC status code it maps to.

They become gRPC statuses in one place, `adapters.grpc_helpers` (shared by the gRPC adapters),
and HTTP statuses in one place, `adapters.http_app` (by the same codes); anything else that
escapes a handler is logged there and becomes INTERNAL.
"""

from __future__ import annotations

import grpc

__all__ = [
    "MAX_MESSAGE_CHARS",
    "BodyTooLarge",
    "ClientGone",
    "ConfidenceUnavailable",
    "DeadlineExceeded",
    "FormatUnavailable",
    "FrameDropped",
    "FrameExpired",
    "InferenceFailed",
    "InvalidArgument",
    "ModelConfigError",
    "ModelNotFound",
    "ModelUnavailable",
    "PermissionDenied",
    "QueueFull",
    "QueueTimeout",
    "RateLimited",
    "SegserveError",
    "Unauthenticated",
    "UploadsBusy",
    "bounded",
]


MAX_MESSAGE_CHARS = 1000
"""Messages echo client-supplied values (names, lists, lengths): past this many characters they
are cut, so that a status never outgrows the client's metadata limit (8 KiB by default) and the
client sees the real code instead of RESOURCE_EXHAUSTED."""


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """The message in at most about `limit` characters: its start and its end (where the reason
    often is), with a note of how much of the middle was left out."""
    if len(message) <= limit:
        return message
    tail = limit // 4
    head = limit - tail
    return f"{message[:head]} … ({len(message) - limit} characters left out) … {message[-tail:]}"


class SegserveError(Exception):
    """Base class: a failure with a gRPC status code and a message for people (bounded)."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        message = bounded(message)
        super().__init__(message)
        self.message = message

    @property
    def outcome(self) -> str:
        """How the request counter labels this end: the status code's name, unless a frame's
        own fate names it better (DROPPED, EXPIRED)."""
        name: str = self.code.name
        return name


class InvalidArgument(SegserveError):
    """The request itself is wrong: a corrupt image, a bad size, an unknown encoding."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(SegserveError):
    """No model (or model version) of that name is in the repository."""

    code = grpc.StatusCode.NOT_FOUND


class ModelUnavailable(SegserveError):
    """The model exists but cannot serve: it failed to load, or the server is draining."""

    code = grpc.StatusCode.UNAVAILABLE


class QueueFull(SegserveError):
    """The model's batch queue is at its max_queue_size."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UploadsBusy(SegserveError):
    """The uploads running now hold max_upload_bytes_in_flight between them: retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(SegserveError):
    """The request's deadline passed before its answer was ready; it was not run."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class QueueTimeout(DeadlineExceeded):
    """The model's queue policy timed the request out in the queue (timeout_action REJECT)."""


class FrameExpired(DeadlineExceeded):
    """A stream frame was older than its max age when its batch formed; it never ran."""

    @property
    def outcome(self) -> str:
        return "EXPIRED"


class FrameDropped(SegserveError):
    """Stream policy LATEST: a newer frame of the same stream was queued before this one
    started; it never ran."""

    code = grpc.StatusCode.ABORTED

    @property
    def outcome(self) -> str:
        return "DROPPED"


class ConfidenceUnavailable(SegserveError):
    """The request asked for confidence of a model that outputs labels only."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class InferenceFailed(SegserveError):
    """The backend failed while running a batch, or returned output of the wrong shape."""

    code = grpc.StatusCode.INTERNAL


class Unauthenticated(SegserveError):
    """No token, a garbled one, or one no entry has: the caller is not known."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SegserveError):
    """The caller is known, but its token does not cover this model or method."""

    code = grpc.StatusCode.PERMISSION_DENIED


class RateLimited(SegserveError):
    """The token's request bucket is empty: retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FormatUnavailable(SegserveError):
    """An input or output format whose library is not installed (the `formats` extra), or a
    compression that the installed codecs cannot decode."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class BodyTooLarge(SegserveError):
    """A request body over max_receive_message_bytes (gRPC's RESOURCE_EXHAUSTED; HTTP 413)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ClientGone(SegserveError):
    """The HTTP client closed the connection before its answer (gRPC's CANCELLED; HTTP 499)."""

    code = grpc.StatusCode.CANCELLED


class ModelConfigError(Exception):
    """A model's config.pbtxt or files are invalid; the model is reported as FAILED."""
