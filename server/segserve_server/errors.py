"""The one exception hierarchy of segserve; each error carries the gRPC status code it maps to.

They become gRPC statuses in one place, `adapters.grpc_helpers` (shared by the segserve.v1 and
KServe v2 adapters); anything else that escapes a handler is logged there and becomes INTERNAL.
"""

from __future__ import annotations

import grpc

__all__ = [
    "DeadlineExceeded",
    "InferenceFailed",
    "InvalidArgument",
    "ModelConfigError",
    "ModelNotFound",
    "ModelUnavailable",
    "QueueFull",
    "SegserveError",
]


class SegserveError(Exception):
    """Base class: a failure with a gRPC status code and a message for people."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


class DeadlineExceeded(SegserveError):
    """The request's deadline passed before its answer was ready; it was not run."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class InferenceFailed(SegserveError):
    """The backend failed while running a batch, or returned output of the wrong shape."""

    code = grpc.StatusCode.INTERNAL


class ModelConfigError(Exception):
    """A model's config.pbtxt or files are invalid; the model is reported as FAILED."""
