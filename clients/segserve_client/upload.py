"""Chunked uploads (segserve.v1 SegmentUpload) for encoded images too large for one message.

    with SegserveClient("localhost:50051") as client:
        result = client.segment_large("orthophoto.jpg", "roadseg", output_size="model")

A file is read a chunk at a time as gRPC sends it, never whole; the first message declares the
request's options and the image's size, so that the server refuses a bad model, an image past
its limits or a header past them before the rest is sent (see docs/imaging.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from segserve.v1 import segserve_pb2 as pb

__all__ = ["DEFAULT_CHUNK_BYTES", "UPLOAD_ABOVE_BYTES", "Upload", "UploadImage"]

DEFAULT_CHUNK_BYTES = 1023 * 1024
"""1023 KiB chunks: a chunk and its message framing fit the smallest message limit a server
takes (1 MiB), and per-message costs vanish."""

UPLOAD_ABOVE_BYTES = 60 * 1024 * 1024
"""Encoded images larger than this do not fit a Segment call under the server's default 64 MiB
message limit (the CLI uploads them in chunks instead)."""

UploadImage = bytes | bytearray | memoryview | str | os.PathLike[str]
"""An encoded image to upload: its bytes, or the path of its file."""


@dataclass(frozen=True)
class Upload:
    """One image's SegmentUpload messages: the header, then its bytes in chunks."""

    image: UploadImage
    total_bytes: int
    chunk_bytes: int

    @classmethod
    def of(cls, image: UploadImage, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Upload:
        """Checks the image (a non-empty file or buffer) and the chunk size; ValueError if not."""
        if chunk_bytes <= 0:
            raise ValueError(f"a chunk is at least 1 byte, got chunk_bytes {chunk_bytes}")
        if isinstance(image, str | os.PathLike):
            path = Path(image)
            if not path.is_file():
                raise ValueError(f"no such image file: {os.fspath(image)!r}")
            total = path.stat().st_size
        elif isinstance(image, bytes | bytearray | memoryview):
            total = memoryview(image).nbytes
        else:
            raise TypeError(
                f"an upload is encoded bytes or a file path, not {type(image).__name__}"
            )
        if total == 0:
            raise ValueError("the encoded image is empty")
        return cls(image, total, chunk_bytes)

    def requests(self, request: pb.SegmentRequest) -> Iterator[pb.SegmentUploadRequest]:
        """The header (`request` without its image, and the size), then the chunks."""
        options = pb.SegmentRequest()
        options.CopyFrom(request)
        options.ClearField("image")
        header = pb.UploadHeader(request=options, total_bytes=self.total_bytes)
        yield pb.SegmentUploadRequest(header=header)
        for chunk in self._chunks():
            yield pb.SegmentUploadRequest(chunk=chunk)

    def _chunks(self) -> Iterator[bytes]:
        if isinstance(self.image, str | os.PathLike):
            with open(self.image, "rb") as file:
                while chunk := file.read(self.chunk_bytes):
                    yield chunk
            return
        view = memoryview(self.image).cast("B")
        for start in range(0, view.nbytes, self.chunk_bytes):
            yield bytes(view[start : start + self.chunk_bytes])
