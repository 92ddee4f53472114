"""The device pipeline: decode, resize, normalise, argmax and the resize back, as torch ops on a
device ("cuda:N" in production, "cpu" in the tests), for models whose config.pbtxt sets
`segserve.pipeline: "device"` (docs/gpu.md).

It mirrors the host path step for step (pipeline/decode.py, preprocess.py, postprocess.py) and
is checked against it on "cpu" (tests/test_device_pipeline.py):

- decode: JPEG on the GPU with torchvision's `decode_jpeg(device="cuda")` (nvJPEG; EXIF
  orientation applied with torch ops; full size: nvJPEG has no DCT scaling), the JPEGs of
  concurrent requests in one batched call (pipeline/jpeg_batch.py). Other formats, and
  every format on "cpu", use the host decoder (decode.decode), then one copy to the device.
- preprocess: bilinear resize (half-pixel centres, no antialias: cv2.INTER_LINEAR's geometry),
  rounded to whole values as OpenCV's uint8 resize is, then channel order and the folded
  (x / 255 - mean) / std as one multiply-add per channel, in float32.
- postprocess: argmax (first maximum, as numpy's) and the nearest resize back to the image size
  (an index gather on the device, with cv2.INTER_NEAREST_EXACT's own indices) on the device; the classes present
  counted there (bincount); only the uint8 label map (and the confidence map when asked for)
  comes back, through pinned host memory.

The image tensors travel through the batcher by handle (backends/device.py). On "cpu" the label
maps equal the host path's except where OpenCV's fixed-point bilinear weights round a resized
pixel to the other neighbouring integer (±1) and that flips a class decision: the tests bound it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from segserve_server.backends.device import DeviceBatchBackend, DeviceTensors
from segserve_server.errors import InferenceFailed, InvalidArgument
from segserve_server.model_repository import ModelConfig
from segserve_server.pipeline import decode
from segserve_server.pipeline.decode import ImageLimits, RawPixels
from segserve_server.pipeline.jpeg_batch import DecodeCoalescer
from segserve_server.pipeline.postprocess import Postprocessed

__all__ = [
    "MIN_DECODE_BATCH",
    "DevicePipeline",
    "JpegDecoder",
    "Prepared",
    "apply_orientation",
    "nearest_indices",
    "pipeline_for",
]

log = logging.getLogger(__name__)

MIN_DECODE_BATCH = 8
"""The fewest JPEGs one batched decode call may take (more for models with larger batches)."""

JpegDecoder = Callable[[list[torch.Tensor]], list[torch.Tensor]]
"""Encoded JPEGs (1-D uint8 tensors) -> (3, h, w) RGB uint8 tensors on the device, one call."""


@dataclass(frozen=True)
class Prepared:
    """One image on the device: its model-input handle (for the batcher) and original size."""

    handle: np.ndarray
    width: int
    height: int
    decode_s: float
    preprocess_s: float


def apply_orientation(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """(h, w[, c]) in stored orientation -> display orientation, as decode.apply_orientation."""
    if orientation == 2:
        return pixels.flip(1)
    if orientation == 3:
        return pixels.flip(0, 1)
    if orientation == 4:
        return pixels.flip(0)
    if orientation == 5:
        return pixels.transpose(0, 1)
    if orientation == 6:
        return torch.rot90(pixels, -1, dims=(0, 1))
    if orientation == 7:
        return pixels.flip(0, 1).transpose(0, 1)
    if orientation == 8:
        return torch.rot90(pixels, 1, dims=(0, 1))
    return pixels


def nearest_indices(source: int, target: int) -> np.ndarray:
    """Source index of each of `target` indices, as cv2.INTER_NEAREST_EXACT samples one axis.

    Read from OpenCV itself (a 1-pixel-wide ramp resized; cached): its sampling rounds pixel
    centres that fall exactly between two source pixels up or down depending on the sizes,
    which no closed formula tried here reproduces, and the maps must equal the host path's."""
    return _nearest_indices(source, target)


@functools.lru_cache(maxsize=256)
def _nearest_indices(source: int, target: int) -> np.ndarray:
    ramp = np.arange(source, dtype=np.float32).reshape(source, 1)
    sampled = cv2.resize(ramp, (1, target), interpolation=cv2.INTER_NEAREST_EXACT)
    indices = sampled.reshape(-1).astype(np.int64)
    indices.setflags(write=False)
    return indices


class DevicePipeline:
    """The host stages' counterpart on a device, for one model version (thread-safe)."""

    def __init__(
        self,
        config: ModelConfig,
        tensors: DeviceTensors,
        device: torch.device,
        limits: ImageLimits,
        *,
        gpu_decode: bool | None = None,
        jpeg_decoder: JpegDecoder | None = None,
    ) -> None:
        self._config = config
        self._tensors = tensors
        self.device = device
        self._limits = limits
        self._size = (config.input_height, config.input_width)
        self._order = config.channel_order
        self._dtype = _TORCH_INPUT[np.dtype(config.input_dtype).name]
        self._nchw = config.input_layout == "NCHW"
        std = torch.tensor(config.std, dtype=torch.float32)
        mean = torch.tensor(config.mean, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(device)
        self._shift = (-mean / std).view(1, 3, 1, 1).to(device)
        self._classes = len(config.classes)
        self._index_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._decode_jpeg = (
            _gpu_jpeg_decoder(device) if gpu_decode is not False and device.type == "cuda" else None
        )
        if gpu_decode and self._decode_jpeg is None:
            log.warning("model %s: no GPU JPEG decoder; decoding on the CPU", config.name)
        if jpeg_decoder is not None:  # the tests' stand-in for nvJPEG on "cpu"
            self._decode_jpeg = jpeg_decoder
        # Concurrent requests' JPEGs, one batched call (an inference batch's worth, at least 8:
        # nvJPEG batching pays also for models that infer one image at a time).
        self._jpegs: DecodeCoalescer[torch.Tensor, torch.Tensor] | None = (
            DecodeCoalescer(
                self._decode_jpeg, max(MIN_DECODE_BATCH, config.batching.max_batch_size)
            )
            if self._decode_jpeg is not None
            else None
        )

    @property
    def gpu_decode(self) -> bool:
        """Whether JPEGs decode on the GPU (torchvision on CUDA)."""
        return self._decode_jpeg is not None

    @property
    def jpeg_batches(self) -> int:
        """Batched JPEG decode calls made so far (0 without a GPU decoder)."""
        return self._jpegs.calls if self._jpegs is not None else 0

    # Decode and preprocess ----------------------------------------------------------------------

    def decode(
        self,
        image: bytes | memoryview | RawPixels,
        *,
        min_size: tuple[int, int] | None = None,
        ignore_exif_orientation: bool = False,
    ) -> tuple[torch.Tensor, str, int, int]:
        """The image as (h, w, c) or (h, w) uint8 on the device, its channel order and its
        original (display) width and height."""
        order = "BGR" if self._order == "BGR" else "RGB"
        if isinstance(image, RawPixels):
            raw = decode.from_raw(image, self._limits)
            pixels = self._upload(raw.pixels)
            return pixels, raw.order, raw.original_width, raw.original_height
        if self._jpegs is not None and len(image) and decode.sniff_format(image) == "JPEG":
            width, height = decode.image_size(image, "JPEG")
            decode.check_size(width, height, self._limits, "JPEG image")
            try:
                chw = self._jpegs.decode(torch.frombuffer(bytearray(image), dtype=torch.uint8))
            except torch.cuda.OutOfMemoryError as exc:  # the device's state, not the image's
                raise InferenceFailed(f"GPU out of memory decoding a JPEG: {exc}") from exc
            except RuntimeError as exc:
                raise InvalidArgument(f"JPEG does not decode on the GPU: {exc}") from exc
            orientation = 1 if ignore_exif_orientation else decode.exif_orientation(image, "JPEG")
            pixels = apply_orientation(chw.permute(1, 2, 0), orientation)
            if orientation >= 5:
                width, height = height, width
            return pixels, "RGB", width, height
        decoded = decode.decode(
            image,
            self._limits,
            order=order,  # type: ignore[arg-type]
            min_size=min_size,
            ignore_exif_orientation=ignore_exif_orientation,
        )
        return (
            self._upload(decoded.pixels),
            decoded.order,
            decoded.original_width,
            decoded.original_height,
        )

    def _upload(self, pixels: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(pixels))
        if self.device.type == "cpu":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def preprocess(self, pixels: torch.Tensor, order: str) -> torch.Tensor:
        """(h, w[, c]) uint8 on the device -> one model input (no batch dim), contiguous."""
        if pixels.dim() == 2:
            pixels = pixels.unsqueeze(-1)
        x = pixels.permute(2, 0, 1).unsqueeze(0).to(torch.float32)
        if tuple(x.shape[2:]) != self._size:
            x = F.interpolate(x, size=self._size, mode="bilinear", align_corners=False)
            x = x.round_().clamp_(0.0, 255.0)  # OpenCV resizes uint8 to uint8
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif order != self._order:
            x = x.flip(1)
        if self._dtype == torch.uint8:
            tensor = x.to(torch.uint8)
        else:
            tensor = (x * self._scale + self._shift).to(self._dtype)
        tensor = tensor[0] if self._nchw else tensor[0].permute(1, 2, 0)
        return tensor.contiguous()

    def prepare(
        self,
        image: bytes | memoryview | RawPixels,
        *,
        min_size: tuple[int, int] | None = None,
        ignore_exif_orientation: bool = False,
    ) -> Prepared:
        """Decode and preprocess, in a worker thread; the tensor stays on the device. On CUDA
        the thread waits for the device, so the stage times are the device's."""
        started = time.perf_counter()
        pixels, order, width, height = self.decode(
            image, min_size=min_size, ignore_exif_orientation=ignore_exif_orientation
        )
        self._synchronize()
        decoded = time.perf_counter()
        tensor = self.preprocess(pixels, order)
        self._synchronize()
        done = time.perf_counter()
        return Prepared(self._tensors.put(tensor), width, height, decoded - started, done - decoded)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    # Postprocess --------------------------------------------------------------------------------

    def label_maps(
        self, output: torch.Tensor, *, confidence: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One image's output on the device -> (H, W) uint8 labels and, if asked, confidence."""
        config = self._config
        expected = (
            (2, *self._size)
            if config.confidence_output is not None
            else self._size
            if config.outputs_labels
            else (self._classes, *self._size)
        )
        if tuple(output.shape) != expected:
            raise InferenceFailed(
                f"model {config.name} returned an output of shape {tuple(output.shape)} per "
                f"image; its config declares {expected}"
            )
        scores = output[0] if config.confidence_output is not None else output
        if config.outputs_labels:
            highest, lowest = int(scores.max()), int(scores.min())
            if highest >= self._classes or lowest < 0:
                raise InferenceFailed(
                    f"model {config.name} produced class id {highest if lowest >= 0 else lowest}"
                    f" but has {self._classes} classes"
                )
            labels = scores.to(torch.uint8)
        else:
            labels = scores.argmax(0).to(torch.uint8)
        if not confidence:
            return labels, None
        if config.confidence_output is not None:
            return labels, output[1].to(torch.uint8)
        scores = scores.to(torch.float32)
        total = torch.exp(scores - scores.max(0).values).sum(0)
        return labels, torch.round(255.0 / total).to(torch.uint8)

    def resize(self, labels: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Nearest resize to (height, width) on the device, as postprocess.resize_labels."""
        if tuple(labels.shape) == (height, width):
            return labels
        rows = self._indices(labels.shape[0], height)
        cols = self._indices(labels.shape[1], width)
        return labels.index_select(0, rows).index_select(1, cols)

    def _indices(self, source: int, target: int) -> torch.Tensor:
        key = (source, target)
        indices = self._index_cache.get(key)
        if indices is None:
            indices = torch.from_numpy(nearest_indices(source, target).copy()).to(self.device)
            if len(self._index_cache) < 64:  # a camera's few sizes; never unbounded
                self._index_cache[key] = indices
        return indices

    def postprocess(
        self,
        output_handle: np.ndarray,
        width: int,
        height: int,
        *,
        count_pixels: bool = False,
        confidence: bool = False,
    ) -> Postprocessed:
        """The batcher's answer for one image (a handle) -> what postprocess.postprocess gives.
        model_labels is (0, 0) unless `confidence` (only the review scores read it)."""
        (output,) = self._tensors.get(output_handle)
        model_labels, model_confidence = self.label_maps(output, confidence=confidence)
        labels = self.resize(model_labels, width, height)
        enlarged = height >= model_labels.shape[0] and width >= model_labels.shape[1]
        counted = labels if count_pixels or not enlarged else model_labels
        counts = torch.bincount(counted.reshape(-1).to(torch.int64), minlength=self._classes)
        host_counts = counts.cpu().numpy()
        present = [
            (int(i), int(host_counts[i]) if count_pixels else 0)
            for i in np.flatnonzero(host_counts)
        ]
        if model_confidence is None:
            return Postprocessed(self._to_host(labels), present, np.zeros((0, 0), np.uint8))
        return Postprocessed(
            self._to_host(labels),
            present,
            self._to_host(model_labels),
            self._to_host(self.resize(model_confidence, width, height)),
            self._to_host(model_confidence),
        )

    def _to_host(self, tensor: torch.Tensor) -> np.ndarray:
        """A uint8 map as numpy: the same memory on "cpu"; through pinned memory on CUDA."""
        if tensor.device.type == "cpu":
            return np.ascontiguousarray(tensor.numpy())
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        self._synchronize()
        return host.numpy()

    def decode_jpegs(self, images: list[bytes]) -> list[torch.Tensor]:
        """Batched GPU decode of JPEGs (one nvJPEG call) to (h, w, 3) RGB; host decode on
        "cpu" or without torchvision. Used by benchmarks/gpu_bench.py."""
        if self._decode_jpeg is None:
            return [self.decode(image)[0] for image in images]
        batch = [torch.frombuffer(bytearray(image), dtype=torch.uint8) for image in images]
        return [chw.permute(1, 2, 0) for chw in self._decode_jpeg(batch)]


_TORCH_INPUT = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}


def _gpu_jpeg_decoder(device: torch.device) -> JpegDecoder | None:
    """torchvision's nvJPEG decode on `device`, or None where unavailable."""
    if not torch.cuda.is_available():
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except (ImportError, RuntimeError) as exc:  # RuntimeError: a CPU-built torchvision
        log.warning("torchvision's decode_jpeg is unavailable (%s)", exc)
        return None

    def decode_on_gpu(data: list[torch.Tensor]) -> list[torch.Tensor]:
        decoded: list[torch.Tensor] = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return decoded

    return decode_on_gpu


_PIPELINES: weakref.WeakKeyDictionary[DeviceBatchBackend, DevicePipeline] = (
    weakref.WeakKeyDictionary()
)
_PIPELINES_LOCK = threading.Lock()


def pipeline_for(backend: object, config: ModelConfig, limits: ImageLimits) -> DevicePipeline:
    """The device pipeline of a model version's backend (a DeviceBatchBackend: the factory
    wraps every device-pipeline model's backend in one), made on first use."""
    if not isinstance(backend, DeviceBatchBackend):
        raise InferenceFailed(
            f"model {config.name} is configured for the device pipeline but its backend "
            f"{type(backend).__name__} is not a device backend"
        )
    with _PIPELINES_LOCK:
        pipeline = _PIPELINES.get(backend)
        if pipeline is None:
            pipeline = DevicePipeline(config, backend.tensors, backend.device, limits)
            _PIPELINES[backend] = pipeline
        return pipeline
