"""Batched JPEG decode across concurrent requests (pipeline/jpeg_batch.py).

The coalescing logic is tested directly with a gated decoder (events, no sleeps to wait out);
then the device pipeline on "cpu" with a batched CPU decoder standing in for nvJPEG (which
needs a GPU: tests/test_device_pipeline.py's CUDA tests and tools/gpu_check.sh cover it there).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np
import pytest

from segserve_server.pipeline.jpeg_batch import DecodeCoalescer

pytestmark = pytest.mark.timeout(60)


class FirstCallGated:
    """Wraps a batched decoder: records every call's inputs; the first call waits for `gate`."""

    def __init__(self, decode: Callable[[list[Any]], list[Any]]) -> None:
        self.decode = decode
        self.calls: list[list[Any]] = []
        self.gate, self.entered = threading.Event(), threading.Event()

    @property
    def sizes(self) -> list[int]:
        return [len(call) for call in self.calls]

    def __call__(self, items: list[Any]) -> list[Any]:
        self.calls.append(list(items))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.gate.wait(30)
        return self.decode(items)


def double(items: list[int]) -> list[int]:
    """The stand-in decoder of the scheduling tests: doubles; a negative "image" is corrupt."""
    if any(i < 0 for i in items):
        raise ValueError(f"cannot decode {min(items)}")
    return [2 * i for i in items]


def wait_for_waiting(coalescer: DecodeCoalescer[Any, Any], count: int) -> None:
    for _ in range(3000):
        if coalescer.waiting == count:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"{coalescer.waiting} waiting, expected {count}")


def behind_a_first_decode(
    pool: ThreadPoolExecutor,
    call: Callable[[Any], Any],
    coalescer: DecodeCoalescer[Any, Any],
    gated: FirstCallGated,
    first: Any,
    rest: list[Any],
) -> list[Future[Any]]:
    """`call(first)` until its decode runs (gated), then `call` on each of `rest`, one at a
    time (each waiting before the next: the arrival order is known), then the gate opens.
    The futures of all, first first."""
    futures = [pool.submit(call, first)]
    assert gated.entered.wait(10)
    for count, item in enumerate(rest, 1):
        futures.append(pool.submit(call, item))
        wait_for_waiting(coalescer, count)
    gated.gate.set()
    return futures


def test_a_lone_image_is_decoded_at_once_in_a_call_of_its_own():
    decoder = FirstCallGated(double)
    decoder.gate.set()
    coalescer = DecodeCoalescer(decoder, max_batch=8)
    assert coalescer.decode(21) == 42
    assert decoder.calls == [[21]] and coalescer.calls == 1


def test_images_arriving_during_a_decode_go_into_the_next_call_together():
    decoder = FirstCallGated(double)
    coalescer = DecodeCoalescer(decoder, max_batch=8)
    with ThreadPoolExecutor(8) as pool:
        first, *rest = behind_a_first_decode(
            pool, coalescer.decode, coalescer, decoder, 1, list(range(10, 15))
        )
        assert first.result() == 2
        assert [f.result() for f in rest] == [20, 22, 24, 26, 28]
    assert decoder.calls[0] == [1]
    assert sorted(decoder.calls[1]) == [10, 11, 12, 13, 14] and len(decoder.calls) == 2


def test_no_call_exceeds_max_batch_and_every_image_gets_its_own_answer():
    decoder = FirstCallGated(double)
    coalescer = DecodeCoalescer(decoder, max_batch=3)
    with ThreadPoolExecutor(10) as pool:
        first, *rest = behind_a_first_decode(
            pool, coalescer.decode, coalescer, decoder, 0, list(range(1, 8))
        )
        assert first.result() == 0
        assert {i: f.result() for i, f in enumerate(rest, 1)} == {i: 2 * i for i in range(1, 8)}
    assert all(len(call) <= 3 for call in decoder.calls)
    assert sorted(i for call in decoder.calls[1:] for i in call) == list(range(1, 8))
    assert len(decoder.calls) == 1 + 3  # 7 images in calls of 3, 3 and 1
    assert coalescer.waiting == 0


def test_images_are_served_oldest_first_even_one_at_a_time():
    """max_batch 1 (a model without batching): whoever leads, the oldest image goes next, so
    none waits behind newer arrivals."""
    decoder = FirstCallGated(double)
    coalescer = DecodeCoalescer(decoder, max_batch=1)
    with ThreadPoolExecutor(8) as pool:
        futures = behind_a_first_decode(
            pool, coalescer.decode, coalescer, decoder, 0, list(range(1, 7))
        )
        assert [f.result() for f in futures] == [2 * i for i in range(7)]
    assert decoder.calls == [[i] for i in range(7)]


def test_a_corrupt_image_fails_alone_and_its_batch_mates_decode():
    decoder = FirstCallGated(double)
    coalescer = DecodeCoalescer(decoder, max_batch=8)
    with ThreadPoolExecutor(4) as pool:
        first, good, bad, other = behind_a_first_decode(
            pool, coalescer.decode, coalescer, decoder, 5, [6, -1, 7]
        )
        assert (first.result(), good.result(), other.result()) == (10, 12, 14)
        with pytest.raises(ValueError, match="cannot decode -1"):
            bad.result()
    batched = [call for call in decoder.calls if len(call) == 3]
    assert len(batched) == 1 and sorted(batched[0]) == [-1, 6, 7]  # then each alone
    assert sorted(call[0] for call in decoder.calls if len(call) == 1) == [-1, 5, 6, 7]


def test_a_decoder_answering_the_wrong_count_is_retried_one_by_one():
    calls: list[list[int]] = []

    def short(items: list[int]) -> list[int]:
        calls.append(items)
        return [i + 1 for i in items][:1]

    coalescer: DecodeCoalescer[int, int] = DecodeCoalescer(short, max_batch=4)
    assert coalescer.decode(3) == 4
    assert calls == [[3]]
    with pytest.raises(ValueError, match="max_batch 0"):
        DecodeCoalescer(short, max_batch=0)


# The device pipeline with a batched decoder ---------------------------------------------------


def test_the_device_pipeline_batches_concurrent_jpegs_and_answers_as_the_host_path(tmp_path):
    torch = pytest.importorskip("torch", reason="the device pipeline needs torch")
    from segserve_server.backends.device import DeviceBatchBackend
    from segserve_server.backends.onnxruntime import OnnxRuntimeBackend
    from segserve_server.model_repository import parse_config
    from segserve_server.pipeline import decode
    from segserve_server.pipeline.device import DevicePipeline
    from tests.conftest import H, W, encode, make_settings, quadrant_image
    from tests.harness.synthetic_models import write_entry

    entry = write_entry(tmp_path, "m", H, W, output="logits")
    config = parse_config((entry / "config.pbtxt").read_text(), entry)
    backend = DeviceBatchBackend(
        OnnxRuntimeBackend(config, entry / "1" / "model.onnx", make_settings(tmp_path)),
        "cpu",
        config,
    )
    limits = decode.ImageLimits(max_pixels=1 << 24, max_side=1 << 13)

    def cpu_decode(encoded: list[Any]) -> list[Any]:
        decoded: list[np.ndarray] = []
        for e in encoded:
            bgr = cv2.imdecode(e.numpy(), cv2.IMREAD_COLOR)
            assert bgr is not None
            decoded.append(np.ascontiguousarray(bgr[:, :, ::-1]))
        return [torch.from_numpy(d).permute(2, 0, 1) for d in decoded]

    cpu_batched = FirstCallGated(cpu_decode)
    batched = DevicePipeline(
        config, backend.tensors, backend.device, limits, jpeg_decoder=cpu_batched
    )
    plain = DevicePipeline(config, backend.tensors, backend.device, limits)
    images = [encode(quadrant_image(H * k // 2, W * k // 2), ".jpg") for k in (2, 3, 4, 5)]

    def answer(pipeline: DevicePipeline, data: bytes) -> np.ndarray:
        prepared = pipeline.prepare(data)
        out = backend.infer(prepared.handle[np.newaxis])
        return pipeline.postprocess(out[0], prepared.width, prepared.height).labels

    assert batched._jpegs is not None
    with ThreadPoolExecutor(4) as pool:
        futures = behind_a_first_decode(
            pool, lambda d: answer(batched, d), batched._jpegs, cpu_batched, images[0], images[1:]
        )
        answers = [f.result() for f in futures]
    assert cpu_batched.sizes == [1, 3] and batched.jpeg_batches == 2
    for data, labels in zip(images, answers, strict=True):
        np.testing.assert_array_equal(labels, answer(plain, data))


# On a GPU host (tools/gpu_check.sh) -----------------------------------------------------------


def _nvjpeg() -> bool:
    try:
        import torch
        from torchvision.io import decode_jpeg  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.gpu
@pytest.mark.skipif(not _nvjpeg(), reason="needs CUDA and torchvision's nvJPEG decode_jpeg")
def test_nvjpeg_decodes_a_gathered_batch_as_each_alone():
    """torchvision's decode_jpeg on a list, through the coalescer, gives each image's own decode
    (the same nvJPEG, one call against one each); JPEGs of several sizes in one call."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from tests.conftest import encode, quadrant_image

    def nvjpeg(encoded: list[Any]) -> list[Any]:
        out: list[Any] = decode_jpeg(encoded, mode=ImageReadMode.RGB, device="cuda")
        return out

    gated = FirstCallGated(nvjpeg)
    coalescer: DecodeCoalescer[Any, Any] = DecodeCoalescer(gated, max_batch=8)
    images = [encode(quadrant_image(90 * k, 120 * k), ".jpg") for k in (1, 2, 3, 4, 8)]
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in images]
    with ThreadPoolExecutor(5) as pool:
        futures = behind_a_first_decode(
            pool, coalescer.decode, coalescer, gated, tensors[0], tensors[1:]
        )
        decoded = [f.result() for f in futures]
    assert gated.sizes == [1, 4]
    for tensor, got in zip(tensors, decoded, strict=True):
        assert got.is_cuda
        assert torch.equal(got, nvjpeg([tensor])[0])
