"""One batched JPEG decode call for the JPEGs of concurrent requests (nvJPEG on the GPU).

Each request decodes in its own worker thread. On the GPU, torchvision's `decode_jpeg` takes a
list and decodes it in one nvJPEG call, which costs far less per image than one call each.
`DecodeCoalescer` gathers those calls without adding latency: a thread that finds no decode
running becomes the leader and decodes the JPEGs waiting at that moment, oldest first (at most
`max_batch`), in one call; JPEGs that arrive meanwhile wait for it and go into the next call,
led by one of their threads. No image waits behind newer ones. Under load the calls grow; a lone request is decoded at once, never held back
for company.

A failed batched call is retried image by image, so a corrupt JPEG fails its own request only.
Every waiting thread gets exactly one answer (its image or its error), also when the decoder
raises something unexpected; failures of the coalescing itself are InferenceFailed (INTERNAL),
never blamed on the image.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from segserve_server.errors import InferenceFailed

__all__ = ["DecodeCoalescer"]

In = TypeVar("In")
Out = TypeVar("Out")


class _Pending(Generic[In, Out]):
    __slots__ = ("data", "done", "error", "result")

    def __init__(self, data: In) -> None:
        self.data = data
        self.done = False
        self.result: Out | None = None
        self.error: BaseException | None = None


class DecodeCoalescer(Generic[In, Out]):
    """Runs `decode_many` on the inputs of concurrent `decode` calls, `max_batch` at most."""

    def __init__(self, decode_many: Callable[[list[In]], Sequence[Out]], max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch} must be at least 1")
        self._decode_many = decode_many
        self._max_batch = max_batch
        self._condition = threading.Condition()
        self._waiting: list[_Pending[In, Out]] = []
        self._leading = False
        self.calls = 0  # batched calls made (the tests and the bench read it)

    @property
    def waiting(self) -> int:
        """Images waiting for the next call (not those being decoded)."""
        with self._condition:
            return len(self._waiting)

    def decode(self, data: In) -> Out:
        """The decoded image; raises what decoding it alone raised."""
        item: _Pending[In, Out] = _Pending(data)
        with self._condition:
            self._waiting.append(item)
        while not item.done:
            leading = False
            batch: list[_Pending[In, Out]] = []
            try:
                with self._condition:
                    while not item.done and self._leading:
                        self._condition.wait()
                    if item.done:
                        break
                    # No decode running: lead one, oldest first (this image may have to wait
                    # for a later call, but no image waits behind newer ones).
                    self._leading = leading = True
                    batch = self._waiting[: self._max_batch]
                    del self._waiting[: self._max_batch]
                self._run(batch)
            finally:
                if leading:
                    for pending in batch:  # even if the decoder raised past Exception
                        if not pending.done:
                            pending.error = InferenceFailed(
                                "the batched JPEG decode was interrupted"
                            )
                            pending.done = True
                    with self._condition:
                        self._leading = False
                        self._condition.notify_all()
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[return-value]

    def _run(self, batch: list[_Pending[In, Out]]) -> None:
        try:
            self.calls += 1
            results = list(self._decode_many([p.data for p in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"decoded {len(results)} images for {len(batch)} inputs")
        except Exception:
            results = []
        if results:
            for pending, result in zip(batch, results, strict=True):
                pending.result = result
        else:  # find which image failed: each alone
            for pending in batch:
                try:
                    pending.result = self._decode_many([pending.data])[0]
                except Exception as exc:
                    pending.error = exc
        for pending in batch:
            if pending.result is None and pending.error is None:
                pending.error = InferenceFailed("the JPEG decoder answered nothing for this image")
            pending.done = True
