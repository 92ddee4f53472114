"""The Triton-protocol view of the repository, independent of gRPC: model routes, tensors in and
out as numpy arrays, statistics.

Every repository model is served under two names:

- `<model>`: the model exactly as Triton serves it. Its input and output are config.pbtxt's
  (name, datatype, dims, with a leading -1 batch dim when max_batch_size > 0); a request of
  batch N is split into N items submitted to the model's dynamic batcher, so it shares batches,
  queue limits and deadlines with segserve.v1 traffic, and the answers are stacked again.
- `<model>.image`: image in, mask out. Input IMAGE_BYTES (BYTES, shape [N]): encoded images
  (JPEG, PNG, WebP, BMP). Outputs MASK_BYTES (BYTES [N]: the encoded label maps), MASK_SHAPE
  (INT32 [N, 2]: height, width of each map) and CLASS_PIXEL_COUNTS (INT64 [N, C]: pixels per
  class). Request parameters: mask_encoding ("srle", default, "png" or "raw": row-major uint8
  bytes), output_size ("original", default, or "model"), embed_palette (bool, PNG only),
  ignore_exif_orientation (bool: EXIF orientation is applied by default, so masks and MASK_SHAPE
  are in display orientation). Each image runs the segserve request path (decode, preprocess,
  batch, postprocess, encode).

Errors are SegserveError subclasses naming the bad value; the gRPC surface maps them to codes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from segserve_server.core.models import ModelManager, ReadyVersion
from segserve_server.core.requests import (
    MaskEncoding,
    SegmentInput,
    SegmentOutput,
    TensorInput,
)
from segserve_server.core.service import SegmentationCore, gather_or_cancel
from segserve_server.core.tensor_types import (
    COUNTS_OUTPUT,
    DATATYPES,
    IMAGE_INPUT,
    IMAGE_PARAMETERS,
    IMAGE_SUFFIX,
    MASK_OUTPUT,
    RESERVED_PARAMETERS,
    SEQUENCE_PARAMETERS,
    SHAPE_OUTPUT,
    Duration,
    InferRequest,
    InferResult,
    Route,
    RouteStats,
    TensorSpec,
    admission_of,
    datatype_of,
    dims_of,
    image_options,
)
from segserve_server.errors import (
    InferenceFailed,
    InvalidArgument,
    ModelNotFound,
    SegserveError,
)

__all__ = [
    "COUNTS_OUTPUT",
    "DATATYPES",
    "IMAGE_INPUT",
    "IMAGE_PARAMETERS",
    "IMAGE_SUFFIX",
    "MASK_OUTPUT",
    "RESERVED_PARAMETERS",
    "SEQUENCE_PARAMETERS",
    "SHAPE_OUTPUT",
    "Duration",
    "InferRequest",
    "InferResult",
    "Route",
    "RouteStats",
    "TensorAPI",
    "TensorSpec",
    "admission_of",
    "datatype_of",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Run:
    """What one successful request did: its outputs, batch items and seconds per stage (for a
    request of several items, which run concurrently, the longest item's)."""

    outputs: dict[str, np.ndarray]
    items: int
    queue: float
    compute_input: float
    compute_infer: float
    compute_output: float


class TensorAPI:
    """The repository as Triton-protocol routes, served by the segserve core."""

    def __init__(self, core: SegmentationCore, *, max_images_per_request: int) -> None:
        self._core = core
        self._max_images = max_images_per_request
        self.stats: dict[tuple[str, int], RouteStats] = {}

    @property
    def models(self) -> ModelManager:
        """The repository's models (load, unload and index calls go to it)."""
        return self._core.models

    # Routes and what they advertise.

    def routes(self) -> list[Route]:
        models = self._core.models.models
        routes = [Route(name, model, image=False) for name, model in sorted(models.items())]
        for name, model in sorted(models.items()):
            image_name = name + IMAGE_SUFFIX
            if model.config is None:
                continue
            if image_name in models:
                log.warning("model %s hides the image route of model %s", image_name, name)
                continue
            routes.append(Route(image_name, model, image=True))
        return routes

    def route(self, name: str) -> Route:
        models = self._core.models.models
        if name in models:
            return Route(name, models[name], image=False)
        if name.endswith(IMAGE_SUFFIX):
            model = models.get(name.removesuffix(IMAGE_SUFFIX))
            if model is not None and model.config is not None:
                return Route(name, model, image=True)
        known = ", ".join(sorted(models)) or "none"
        raise ModelNotFound(
            f"model {name!r} is not served (models: {known}; each also as <model>{IMAGE_SUFFIX})"
        )

    def ready_version(self, route: Route, version: int = 0) -> ReadyVersion:
        """The READY version asked for (0: the serving one), or NOT_FOUND / UNAVAILABLE."""
        return self._core.models.get(route.model.name, version)

    def inputs(self, route: Route) -> list[TensorSpec]:
        config = route.config
        if route.image:
            return [TensorSpec(IMAGE_INPUT, "BYTES", (-1,))]
        model_input = config.raw.input[0]
        return [
            TensorSpec(
                model_input.name,
                datatype_of(model_input.data_type),
                dims_of(config, model_input.dims),
            )
        ]

    def outputs(self, route: Route) -> list[TensorSpec]:
        config = route.config
        if route.image:
            return [
                TensorSpec(MASK_OUTPUT, "BYTES", (-1,)),
                TensorSpec(SHAPE_OUTPUT, "INT32", (-1, 2)),
                TensorSpec(COUNTS_OUTPUT, "INT64", (-1, len(config.classes))),
            ]
        return [
            TensorSpec(output.name, datatype_of(output.data_type), dims_of(config, output.dims))
            for output in config.raw.output
        ]

    def platform(self, route: Route) -> str:
        return "segserve_image" if route.image else route.config.platform

    def model_config(self, route: Route) -> mc.ModelConfig:
        """config.pbtxt as Triton reports it; for an image route, a config of its own."""
        config = route.config
        if not route.image:
            raw = mc.ModelConfig()
            raw.CopyFrom(config.raw)
            raw.name = route.name
            return raw
        image = mc.ModelConfig(name=route.name, backend="segserve", max_batch_size=0)
        image.input.add(name=IMAGE_INPUT, data_type=mc.TYPE_STRING, dims=[-1])
        image.output.add(name=MASK_OUTPUT, data_type=mc.TYPE_STRING, dims=[-1])
        image.output.add(name=SHAPE_OUTPUT, data_type=mc.TYPE_INT32, dims=[-1, 2])
        image.output.add(
            name=COUNTS_OUTPUT, data_type=mc.TYPE_INT64, dims=[-1, len(config.classes)]
        )
        if config.raw.HasField("version_policy"):
            image.version_policy.CopyFrom(config.raw.version_policy)
        parameters = {
            "segserve.model": config.name,
            "segserve.class_names": json.dumps([c.name for c in config.classes]),
            "segserve.colors": ";".join(",".join(map(str, c.color)) for c in config.classes),
            "segserve.mask_encodings": ",".join(e.value for e in MaskEncoding),
            "segserve.input_size": f"{config.input_width}x{config.input_height}",
            "segserve.description": config.description,
        }
        for key, value in parameters.items():
            image.parameters[key].string_value = value
        return image

    # Inference.

    async def infer(self, request: InferRequest, deadline_s: float | None) -> InferResult:
        """Runs one request; raises SegserveError subclasses naming what is wrong.

        An unexpected exception is logged with its traceback and raised as InferenceFailed
        (INTERNAL), as core.segment does for the image path.
        """
        route = self.route(request.route)
        # Leased until answered, so a hot reload cannot retire the version looked up here
        # before the core (which looks it up again by number) runs it.
        with self._core.models.lease(route.model.name, request.version) as version:
            return await self._infer_on(route, version, request, deadline_s)

    async def _infer_on(
        self,
        route: Route,
        version: ReadyVersion,
        request: InferRequest,
        deadline_s: float | None,
    ) -> InferResult:
        started = time.perf_counter()
        stats = self.stats.setdefault((route.name, version.version), RouteStats())
        try:
            for key in request.parameters:
                if key in SEQUENCE_PARAMETERS:
                    raise InvalidArgument(f"model {route.name!r} is not a sequence model ({key})")
            wanted = self._requested(route, request.requested)
            if route.image:
                run = await self._infer_images(route, version, request, wanted, deadline_s)
            else:
                run = await self._infer_tensors(route, version, request, wanted, deadline_s)
        except (SegserveError, asyncio.CancelledError):
            stats.fail.add(time.perf_counter() - started)
            raise
        except Exception as exc:
            stats.fail.add(time.perf_counter() - started)
            log.exception("model %s: request failed unexpectedly", route.name)
            raise InferenceFailed(
                f"model {route.name!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        # All at once (no await in between), so a statistics read never sees the counts differ.
        stats.success.add(time.perf_counter() - started)
        stats.queue.add(run.queue)
        stats.compute_input.add(run.compute_input)
        stats.compute_infer.add(run.compute_infer)
        stats.compute_output.add(run.compute_output)
        stats.inference_count += run.items
        stats.last_inference_ms = int(time.time() * 1000)
        return InferResult(route.name, version.version, run.outputs)

    def record_conversion(self, route: str, version: int, input_s: float, output_s: float) -> None:
        """Adds a protocol adapter's tensor conversion for one successful request (answered by
        `infer` as `version` of `route`): input_s converting the request's tensors to the
        model's input, output_s building the response's. Durations only: `infer` has counted
        the request in every stage; the request's success duration takes both too."""
        stats = self.stats.setdefault((route, version), RouteStats())
        stats.compute_input.add(input_s, count=0)
        stats.compute_output.add(output_s, count=0)
        stats.success.add(input_s + output_s, count=0)

    def _requested(self, route: Route, names: tuple[str, ...]) -> list[str]:
        known = [spec.name for spec in self.outputs(route)]
        for name in names:
            if name not in known:
                raise InvalidArgument(
                    f"output {name!r} is not an output of model {route.name!r} (outputs: {known})"
                )
        if len(set(names)) != len(names):
            raise InvalidArgument(f"outputs {list(names)} repeat an output")
        return list(names) or known

    def _one_input(self, route: Route, request: InferRequest) -> np.ndarray:
        (spec,) = self.inputs(route)
        unknown = sorted(set(request.inputs) - {spec.name})
        if unknown:
            raise InvalidArgument(
                f"inputs {unknown} are not inputs of model {route.name!r} (inputs: [{spec.name!r}])"
            )
        if spec.name not in request.inputs:
            raise InvalidArgument(f"model {route.name!r} needs input {spec.name!r}")
        return request.inputs[spec.name]

    async def _infer_tensors(
        self,
        route: Route,
        version: ReadyVersion,
        request: InferRequest,
        wanted: list[str],
        deadline_s: float | None,
    ) -> _Run:
        config = route.config
        batch = self._one_input(route, request)
        count = batch.shape[0]
        limit = config.raw.max_batch_size
        if limit > 0 and count > limit:
            raise InvalidArgument(
                f"batch size {count} of model {route.name!r} exceeds its max_batch_size {limit}"
            )
        output = await self._core.infer_tensors(
            TensorInput(config.name, batch, version.version, admission_of(request.parameters)),
            deadline_s,
        )
        converting = time.perf_counter()
        timings = output.timings
        stacked = output.output
        if config.confidence_output is None:
            produced = {config.output_name: stacked}
        else:  # labels and confidence come stacked from the backend: (N, 2, H, W)
            produced = {
                config.output_name: stacked[:, 0],
                config.confidence_output: stacked[:, 1].astype(np.uint8, copy=False),
            }
        outputs = {name: np.ascontiguousarray(produced[name]) for name in wanted}
        return _Run(
            outputs,
            items=count,
            queue=timings.queue,
            compute_input=timings.decode + timings.preprocess,
            compute_infer=timings.infer,
            compute_output=timings.postprocess
            + timings.encode
            + (time.perf_counter() - converting),
        )

    async def _infer_images(
        self,
        route: Route,
        version: ReadyVersion,
        request: InferRequest,
        wanted: list[str],
        deadline_s: float | None,
    ) -> _Run:
        images = self._one_input(route, request)
        if images.size == 0:
            raise InvalidArgument(f"input {IMAGE_INPUT!r} holds no image")
        if images.size > self._max_images:
            raise InvalidArgument(
                f"input {IMAGE_INPUT!r} holds {images.size} images; at most {self._max_images} "
                "per request (kserve_max_images_per_request)"
            )
        options = image_options(request.parameters)
        admission = admission_of(request.parameters)

        async def one(index: int, image: bytes) -> SegmentOutput:
            segment = SegmentInput(
                model=route.model.name,
                image=image,
                version=version.version,
                encodings=(options[0],),
                output_model_size=options[1],
                include_pixel_counts=COUNTS_OUTPUT in wanted,
                embed_palette=options[2],
                admission=admission,
                ignore_exif_orientation=options[3],
            )
            try:
                return await self._core.segment(segment, deadline_s)
            except SegserveError as exc:
                raise type(exc)(f"{IMAGE_INPUT}[{index}]: {exc.message}") from exc

        results = await gather_or_cancel(
            one(i, bytes(image)) for i, image in enumerate(images.reshape(-1))
        )
        converting = time.perf_counter()
        timings = [r.timings for r in results]
        masks = np.empty(len(results), dtype=np.object_)
        masks[:] = [r.masks[0][1] for r in results]
        counts = np.zeros((len(results), len(route.config.classes)), dtype=np.int64)
        for row, result in enumerate(results):
            for present in result.classes:
                counts[row, present.class_id] = present.pixel_count
        produced = {
            MASK_OUTPUT: masks,
            SHAPE_OUTPUT: np.array([[r.height, r.width] for r in results], dtype=np.int32),
            COUNTS_OUTPUT: counts,
        }
        # One request: its images run concurrently, so each stage took its longest image's time.
        return _Run(
            {name: produced[name] for name in wanted},
            items=len(results),
            queue=max(t.queue for t in timings),
            compute_input=max(t.decode + t.preprocess for t in timings),
            compute_infer=max(t.infer for t in timings),
            compute_output=max(t.postprocess + t.encode for t in timings)
            + (time.perf_counter() - converting),
        )

    def version_stats(self, route: Route, version: int) -> RouteStats:
        return self.stats.get((route.name, version), RouteStats())
