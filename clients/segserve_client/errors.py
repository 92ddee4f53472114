"""Errors raised by the segserve clients: a failed RPC, or one failed frame of a stream.

Both carry the gRPC status code the server answered (`code`) and its message (`details`), so a
caller can tell a corrupt image (INVALID_ARGUMENT) from an overloaded model (RESOURCE_EXHAUSTED)
without touching grpc's own exception types.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from segserve_client.streaming import FrameStatus, FrameTimes, FrameTiming

__all__ = [
    "FrameFailed",
    "SegserveError",
    "rpc_errors",
    "status_code",
]

_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Code number; UNKNOWN for numbers gRPC does not know."""
    return _CODES_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


class SegserveError(Exception):
    """An RPC to segserve failed with status `code`; `details` is the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> SegserveError:
        """Converts the exception grpc raises (sync or asyncio) for a failed call."""
        code = error.code() if callable(getattr(error, "code", None)) else None
        details = error.details() if callable(getattr(error, "details", None)) else None
        return cls(code or grpc.StatusCode.UNKNOWN, details or str(error))


class FrameFailed(SegserveError, FrameTimes):
    """One frame of a SegmentStream was answered with an error (status ERROR); the stream
    itself went on. `frame` holds the frame's times (None if the answer is not known)."""

    def __init__(
        self,
        frame_id: int,
        code: grpc.StatusCode,
        details: str,
        frame: FrameTiming | None = None,
    ) -> None:
        super().__init__(code, details)
        self.frame_id = frame_id
        self.frame = frame

    @property
    def status(self) -> FrameStatus:
        return FrameStatus.ERROR

    def __str__(self) -> str:
        return f"frame {self.frame_id}: {super().__str__()}"


@contextmanager
def rpc_errors() -> Iterator[None]:
    """Re-raises the grpc.RpcError of a failed call inside the block as a SegserveError."""
    try:
        yield
    except grpc.RpcError as exc:
        raise SegserveError.from_rpc_error(exc) from exc
