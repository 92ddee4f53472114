"""segserve.v1 SegmentUpload: one encoded image too large for one message, sent in chunks.

The first message is an UploadHeader: the request's options (a SegmentRequest without its image)
and the image's size in bytes. Everything that can be refused without pixels is refused as soon
as it can be, before the rest is read: the options, the model (known, in the caller's scope), the
declared size (1..max_upload_bytes), then, from the first chunks, the image's format and its
width and height against max_image_pixels and max_image_side (`decode.sniff_format`,
`decode.image_size`: header bytes only). The image then runs down the same path as a Segment
call (`SegmentationCore.segment`), on a view of the upload's buffer.

Memory budget of one upload (what docs/imaging.md states and tests/test_upload.py measures):

- the encoded bytes, once: one buffer that grows as chunks arrive, never past the declared size
  (chunks are copied in and dropped; gRPC holds about one message at a time), never joined or
  copied again. Between them, the uploads running at once may hold at most
  max_upload_bytes_in_flight: the chunk that would pass it is refused RESOURCE_EXHAUSTED
  (`UploadBudget`). The count is returned when the call ends; a decode already running in a
  worker when its client cancels finishes on those bytes, so the bound is exact for the
  buffers and approximate by what at most worker_threads decodes still hold;
- one decoded copy: JPEGs decode at the smallest DCT scale (1/2, 1/4, 1/8) that still covers
  the model's input (jpeg_dct_scaling), so a 20000x20000 JPEG for a 64x48 model is a
  2500x2500 decode (18 MiB); 8-bit PNG, WebP and BMP at the same reduced scale
  (`decode.reduced_scale`), which peaks at OpenCV's one full-size buffer (3 bytes per pixel);
- the model's tensors (model size), and with output_size ORIGINAL the label map at the image's
  size (1 byte per pixel) and SRLE's run starts (1 byte per pixel) once the decoded copy is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator

import grpc
from prometheus_client import Gauge

from segserve.v1 import segserve_pb2 as pb
from segserve_server.adapters.grpc_helpers import deadline_of
from segserve_server.adapters.segserve_v1 import to_segment_input, to_segment_response
from segserve_server.auth import authorize_model
from segserve_server.core.requests import SegmentInput
from segserve_server.core.service import SegmentationCore
from segserve_server.errors import InvalidArgument, ModelNotFound, UploadsBusy
from segserve_server.pipeline import decode
from segserve_server.pipeline.encode import check_annotation_formats, check_encodings

__all__ = [
    "HEADER_FORMATS",
    "MAX_HEADER_BYTES",
    "UploadBudget",
    "UploadBuffer",
    "read_upload",
    "segment_upload",
]

HEADER_FORMATS = frozenset({"JPEG", "PNG", "WebP", "BMP"})
"""Formats whose size is always within the first MAX_HEADER_BYTES: an upload whose header is
not readable there is refused. Other formats (DICOM, TIFF) are checked from the first bytes when
their header is there, else by their decoder, which reads the header before any pixel."""

MAX_HEADER_BYTES = 4 * 1024 * 1024
"""A JPEG's size is in its SOF marker, after any APP segments (EXIF, ICC profiles): an upload
whose first MAX_HEADER_BYTES do not hold a readable header is refused."""

_SNIFF_BYTES = 32  # the JPEG, PNG, WebP and BMP signatures, and the PNG, WebP and BMP sizes
_DICOM_SNIFF_BYTES = 132  # DICOM's "DICM" is at 128
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_MAX_SNIFF_BYTES = 64 * 1024  # a TIFF whose IFD0 is not within this is refused
_EVERY_CHUNK_BYTES = 64 * 1024  # the header is looked at after every chunk up to here


class UploadBuffer:
    """The bytes of one upload, in one buffer that grows as chunks arrive (never past the
    declared size, so a client that declares much and sends little holds only what it sent),
    with the header checks."""

    def __init__(self, total_bytes: int, max_upload_bytes: int, limits: decode.ImageLimits):
        if total_bytes <= 0:
            raise InvalidArgument(
                f"upload header declares total_bytes {total_bytes}; it must be > 0"
            )
        if total_bytes > max_upload_bytes:
            raise InvalidArgument(
                f"upload of {total_bytes} bytes is larger than max_upload_bytes {max_upload_bytes}"
            )
        self.total_bytes = total_bytes
        self.received = 0
        self.format: str | None = None
        self.size: tuple[int, int] | None = None  # (width, height) from the header
        self._limits = limits
        self._data = bytearray()
        self._checked_bytes = 0  # bytes in at the last header check

    @property
    def buffered_bytes(self) -> int:
        """Bytes held now: what was received, never the declared total up front."""
        return len(self._data)

    def add(self, chunk: bytes) -> None:
        """Copies the next chunk in; checks the header as soon as enough bytes are in."""
        end = self.received + len(chunk)
        if end > self.total_bytes:
            raise InvalidArgument(
                f"upload sent more than the {self.total_bytes} bytes its header declared "
                f"(at least {end})"
            )
        self._data += chunk
        self.received = end
        # Re-parsing a long prefix on every small chunk would cost quadratic time on the loop:
        # past the first 64 KiB, look again once the bytes in have doubled (or all are in).
        if self.size is None and (
            end <= _EVERY_CHUNK_BYTES or end >= 2 * self._checked_bytes or end == self.total_bytes
        ):
            self._checked_bytes = end
            self._check_header()

    def _check_header(self) -> None:
        complete = self.received == self.total_bytes
        if self.received < _SNIFF_BYTES and not complete:
            return
        with memoryview(self._data) as whole, whole[: self.received] as head:
            self._check_head(head, complete)

    def _check_head(self, head: memoryview, complete: bool) -> None:
        if self.format is None:
            try:
                self.format = decode.sniff_format(head)
            except InvalidArgument:
                # DICOM's signature is at 128; a TIFF's IFD0 may start past the first chunk.
                tiff = bytes(head[:4]) in _TIFF_SIGNATURES and self.received < _MAX_SNIFF_BYTES
                if complete or (self.received >= _DICOM_SNIFF_BYTES and not tiff):
                    raise
                return
        try:
            width, height = decode.image_size(head, self.format)
        except InvalidArgument:
            if self.format in HEADER_FORMATS and (complete or self.received >= MAX_HEADER_BYTES):
                raise
            if self.format not in HEADER_FORMATS and self.received >= MAX_HEADER_BYTES:
                self.size = (0, 0)  # left to its decoder, which checks it before any pixel
            return  # the header goes on in the next chunk
        decode.check_size(width, height, self._limits, f"{self.format} image")
        self.size = (width, height)

    def image(self) -> memoryview:
        """The whole image, once every declared byte is in (a view: no copy)."""
        if self.received != self.total_bytes:
            raise InvalidArgument(
                f"upload ended after {self.received} of the {self.total_bytes} bytes its header "
                "declared"
            )
        if self.size is None:
            self._check_header()
        return memoryview(self._data)  # no more chunks: the buffer may be exported now


def _options(header: pb.UploadHeader, core: SegmentationCore) -> SegmentInput:
    """The request's options, checked before any image byte is read."""
    request = pb.SegmentRequest()
    request.CopyFrom(header.request)
    if request.HasField("image"):
        raise InvalidArgument(
            "upload header's request carries an image; send the image's bytes as chunks"
        )
    request.image.encoded = b""  # the oneof is set: to_segment_input checks everything else
    options = to_segment_input(request)
    check_encodings(options.encodings)
    check_annotation_formats(options.annotations, options.polygon_tolerance_px)
    settings = core.settings
    authorize_model(options.model, required=bool(settings.auth_tokens_file or settings.auth_tokens))
    if options.model not in core.models.models:
        raise ModelNotFound(f"model {options.model!r} is not in the repository")
    return options


class UploadBudget:
    """The bytes that the uploads running now have received, against max_upload_bytes_in_flight.
    Charged chunk by chunk (what the buffers really hold: an upload that declares much and sends
    little blocks no one), returned when the call ends. One per server; used on its event loop
    only (no lock)."""

    def __init__(self, limit_bytes: int, gauge: Gauge | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.held_bytes = 0
        self._gauge = gauge

    def _changed(self, held_bytes: int) -> None:
        self.held_bytes = held_bytes
        if self._gauge is not None:
            self._gauge.set(held_bytes)

    @contextlib.contextmanager
    def reservation(self) -> Iterator[_Reservation]:
        """A reservation for one upload, returned however the upload ends."""
        reservation = _Reservation(self)
        try:
            yield reservation
        finally:
            self._changed(self.held_bytes - reservation.bytes)
            reservation.bytes = 0


class _Reservation:
    def __init__(self, budget: UploadBudget) -> None:
        self._budget = budget
        self.bytes = 0

    def take(self, size: int) -> None:
        budget = self._budget
        if budget.held_bytes + size > budget.limit_bytes:
            raise UploadsBusy(
                f"uploads running now hold {budget.held_bytes} bytes; {size} more would pass "
                f"max_upload_bytes_in_flight {budget.limit_bytes}: retry later"
            )
        budget._changed(budget.held_bytes + size)
        self.bytes += size


async def segment_upload(
    core: SegmentationCore,
    messages: AsyncIterator[pb.SegmentUploadRequest],
    context: grpc.aio.ServicerContext,
    budget: UploadBudget,
) -> pb.SegmentResponse:
    """SegmentUpload: reads the upload, then segments it as Segment does; the bytes it received
    are held in `budget` until the answer is built."""
    with budget.reservation() as reservation:
        request = await read_upload(core, messages, reservation)
        output = await core.segment(request, deadline_of(context))
        return to_segment_response(output)


async def read_upload(
    core: SegmentationCore,
    messages: AsyncIterator[pb.SegmentUploadRequest],
    reservation: _Reservation | None = None,
) -> SegmentInput:
    """Reads one upload (see the module) and returns its request, the image a view of its
    buffer; each chunk is taken from `reservation` before it is kept."""
    settings = core.settings
    limits = decode.ImageLimits(settings.max_image_pixels, settings.max_image_side)
    buffer: UploadBuffer | None = None
    options: SegmentInput | None = None
    async for message in messages:
        part = message.WhichOneof("part")
        if buffer is None:
            if part != "header":
                raise InvalidArgument(
                    f"the first message of an upload must be its header, not {part or 'empty'}"
                )
            options = _options(message.header, core)
            buffer = UploadBuffer(message.header.total_bytes, settings.max_upload_bytes, limits)
        elif part == "chunk":
            if reservation is not None:
                reservation.take(len(message.chunk))
            buffer.add(message.chunk)
        else:
            raise InvalidArgument(
                f"upload message after the header is {part or 'empty'}, not a chunk"
            )
    if buffer is None or options is None:
        raise InvalidArgument("upload ended before its header")
    return dataclasses.replace(options, image=buffer.image())
