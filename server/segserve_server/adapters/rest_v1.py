"""The plain REST endpoints on the HTTP port, for people, scripts and the browser console.

- `GET /v1/models`, `GET /v1/models/{name}`: the repository as JSON (`model_json`).
- `POST /v1/models/{name}/segment`: the body is the image (any Content-Type), or
  multipart/form-data with a file field `image`; options are query parameters (`QUERY_KEYS`).
  The answer is the indexed PNG mask (`image/png`, the palette embedded unless
  embed_palette=false) or, with format=json, the masks, classes, pixel counts, confidence and
  timings as JSON (`segment_json`). It runs `SegmentationCore.segment`, as the gRPC Segment does:
  the same limits, deadline (the timeout header), priority, token scope and metrics.
- `GET /v1/stats`: request counts and latency histograms per model from the server's own
  metrics registry (a client computes rates and percentiles by differencing two polls).

Errors are JSON (`http_app.error_response`). Streams stay gRPC-only.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncGenerator
from typing import Any, TypeVar

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from segserve_server.adapters.http_app import (
    HttpState,
    check_model,
    deadline_of,
    endpoint,
    may_use,
    read_body,
    state_of,
    unless_disconnected,
)
from segserve_server.core.models import Model
from segserve_server.core.requests import (
    Admission,
    AnnotationFormat,
    MaskEncoding,
    SegmentInput,
    SegmentOutput,
)
from segserve_server.errors import InvalidArgument, ModelNotFound
from segserve_server.pipeline.postprocess import has_confidence

__all__ = ["QUERY_KEYS", "SegmentQuery", "model_json", "routes", "segment_json", "stats_json"]

QUERY_KEYS = (
    "encodings",
    "format",
    "confidence",
    "confidence_threshold",
    "pixel_counts",
    "output_model_size",
    "embed_palette",
    "version",
    "priority",
    "queue_timeout_us",
    "ignore_exif_orientation",
    "annotations",
    "polygon_tolerance_px",
)
"""The query parameters of POST /v1/models/{name}/segment; any other is refused."""
E = TypeVar("E", MaskEncoding, AnnotationFormat)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
_STAGES = ("decode", "preprocess", "queue", "infer", "postprocess", "encode", "total")


def routes(state: HttpState) -> list[BaseRoute]:
    return [
        Route("/v1/models", endpoint(_list_models), methods=["GET"]),
        Route("/v1/models/{name}", endpoint(_get_model), methods=["GET"]),
        Route("/v1/models/{name}/segment", endpoint(_segment), methods=["POST"]),
        Route("/v1/stats", endpoint(_stats), methods=["GET"]),
    ]


def model_json(model: Model) -> dict[str, Any]:
    """One model as GET /v1/models lists it (docs/http.md)."""
    config = model.config
    serving = model.serving
    return {
        "name": model.name,
        "state": model.state.name,
        "reason": model.reason,
        "versions": sorted(model.entry.versions),
        "serving_version": serving.version if serving else None,
        "classes": [c.name for c in config.classes] if config else [],
        "colors": [list(c.color) for c in config.classes] if config else [],
        "has_confidence": has_confidence(config) if config else False,
        "input_width": config.input_width if config else None,
        "input_height": config.input_height if config else None,
        "backend": serving.backend.description if serving else "",
        "pipeline": (
            (f"device:{config.device}" if config.pipeline == "device" else "host") if config else ""
        ),
        "description": config.description if config else "",
    }


async def _list_models(request: Request) -> Response:
    models = state_of(request).core.models.models
    entries = [model_json(models[n]) for n in sorted(models) if may_use(request, n)]
    return JSONResponse({"models": entries})


async def _get_model(request: Request) -> Response:
    name = request.path_params["name"]
    check_model(request, name)
    model = state_of(request).core.models.models.get(name)
    if model is None:
        raise ModelNotFound(f"model {name!r} is not in the repository")
    return JSONResponse(model_json(model))


class SegmentQuery:
    """The query parameters of one segment request, parsed and checked (InvalidArgument
    naming the parameter and its value)."""

    def __init__(self, params: dict[str, str]) -> None:
        unknown = sorted(set(params) - set(QUERY_KEYS))
        if unknown:
            raise InvalidArgument(
                f"query parameters {unknown} are not known (known: {', '.join(QUERY_KEYS)})"
            )
        self._params = params
        self.format = params.get("format", "png").lower()
        if self.format not in ("png", "json"):
            raise InvalidArgument(f"format={self.format!r} is not png or json")
        as_json = self.format == "json"
        self.encodings = self._choices("encodings", MaskEncoding, "png")
        if not as_json and self.encodings != (MaskEncoding.PNG,):
            raise InvalidArgument(
                f"encodings={params['encodings']!r} needs format=json (format=png answers "
                "the PNG mask itself)"
            )
        self.annotations = self._choices("annotations", AnnotationFormat, "")
        self.confidence = self._bool("confidence", False)
        if not as_json and (self.confidence or self.annotations):
            raise InvalidArgument("confidence and annotations need format=json")
        self.pixel_counts = self._bool("pixel_counts", as_json)
        self.embed_palette = self._bool("embed_palette", not as_json)
        self.output_model_size = self._bool("output_model_size", False)
        self.ignore_exif_orientation = self._bool("ignore_exif_orientation", False)
        self.confidence_threshold = self._float("confidence_threshold", 0.5)
        self.polygon_tolerance_px = self._float("polygon_tolerance_px", 0.0)
        self.version = self._int("version")
        self.priority = self._int("priority")
        self.queue_timeout_us = self._int("queue_timeout_us")

    def _bool(self, key: str, default: bool) -> bool:
        if key not in self._params:
            return default
        text = self._params[key].lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise InvalidArgument(f"{key}={self._params[key][:80]!r} is not true or false")

    def _int(self, key: str) -> int:
        text = self._params.get(key, "0")
        if not (text.isascii() and text.isdigit()):
            raise InvalidArgument(f"{key}={text[:80]!r} is not an integer >= 0")
        return int(text)

    def _float(self, key: str, default: float) -> float:
        if key not in self._params:
            return default
        try:
            return float(self._params[key])
        except ValueError:
            raise InvalidArgument(f"{key}={self._params[key][:80]!r} is not a number") from None

    def _choices(self, key: str, kind: type[E], default: str) -> tuple[E, ...]:
        text = self._params.get(key, default)
        names = [n.strip().lower() for n in text.split(",") if n.strip()]
        known = {member.value: member for member in kind}
        for name in names:
            if name not in known:
                raise InvalidArgument(
                    f"{key}: {name[:80]!r} is not one of {', '.join(sorted(known))}"
                )
        return tuple(known[n] for n in names)

    def segment_input(self, model: str, image: bytes) -> SegmentInput:
        return SegmentInput(
            model=model,
            image=image,
            version=self.version,
            encodings=self.encodings,
            output_model_size=self.output_model_size,
            include_pixel_counts=self.pixel_counts,
            embed_palette=self.embed_palette,
            admission=Admission(priority=self.priority, timeout_us=self.queue_timeout_us),
            annotations=self.annotations,
            polygon_tolerance_px=self.polygon_tolerance_px,
            include_confidence=self.confidence,
            confidence_threshold=self.confidence_threshold,
            ignore_exif_orientation=self.ignore_exif_orientation,
        )


async def _image_of(request: Request, body: bytes, limit_bytes: int) -> bytes:
    """The image: the body itself, or the multipart body's `image` file field."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        return body

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(
        request.headers, chunks(), max_files=4, max_fields=16, max_part_size=limit_bytes
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidArgument(f"multipart body does not parse: {exc.message}") from exc
    try:
        part = form.get("image")
        if isinstance(part, UploadFile):
            return await part.read()
        if isinstance(part, str):
            raise InvalidArgument("multipart field 'image' is not a file (send it as a file)")
        raise InvalidArgument(
            f"multipart body has no file field 'image' (fields: {sorted(form.keys())})"
        )
    finally:
        await form.close()


async def _segment(request: Request) -> Response:
    started_s = time.monotonic()
    state = state_of(request)
    name = request.path_params["name"]
    check_model(request, name)
    deadline_s = deadline_of(request)
    query = SegmentQuery(dict(request.query_params))
    limit = state.settings.max_receive_message_bytes
    image = await _image_of(request, await read_body(request, limit), limit)
    if not image:
        raise InvalidArgument("request has no image (send the image bytes as the body)")
    output = await unless_disconnected(
        request, state.core.segment(query.segment_input(name, image), deadline_s)
    )
    headers = {
        "Segserve-Model": output.model,
        "Segserve-Model-Version": str(output.model_version),
        "Segserve-Classes-Present": ",".join(str(c.class_id) for c in output.classes),
        "Server-Timing": ", ".join(
            f"{stage};dur={seconds * 1e3:.3f}" for stage, seconds in _timings(output).items()
        )
        + f", http;dur={(time.monotonic() - started_s) * 1e3:.3f}",
    }
    if query.format == "png":
        return Response(
            dict(output.masks)[MaskEncoding.PNG], media_type="image/png", headers=headers
        )
    model = state.core.models.models.get(output.model)
    config = model.config if model is not None else None
    classes = [c.name for c in config.classes] if config else []
    colors = [list(c.color) for c in config.classes] if config else []
    return JSONResponse(segment_json(output, classes, colors, query), headers=headers)


def _timings(output: SegmentOutput) -> dict[str, float]:
    t = output.timings
    return {stage: getattr(t, stage) for stage in _STAGES}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def segment_json(
    output: SegmentOutput, classes: list[str], colors: list[list[int]], query: SegmentQuery
) -> dict[str, Any]:
    """The JSON answer of format=json (docs/http.md)."""
    counts: list[int] | None = None
    if query.pixel_counts:
        counts = [0] * max(len(classes), 1 + max((c.class_id for c in output.classes), default=-1))
        for present in output.classes:
            counts[present.class_id] = present.pixel_count
    confidence = None
    if output.confidence_png is not None and output.scores is not None:
        scores = output.scores
        confidence = {
            "mean": scores.mean_confidence,
            "png_base64": _b64(output.confidence_png),
            "threshold": query.confidence_threshold,
            "uncertainty": scores.uncertainty,
            "boundary_length": scores.boundary_length,
            "regions": scores.regions,
            "class_confidence": [
                {"class_id": class_id, "mean": mean} for class_id, mean in scores.class_confidence
            ],
        }
    return {
        "model": output.model,
        "model_version": output.model_version,
        "width": output.width,
        "height": output.height,
        "classes": classes,
        "colors": colors,
        "classes_present": [c.class_id for c in output.classes],
        "pixel_counts": counts,
        "masks": [
            {"encoding": encoding.value, "data_base64": _b64(data)}
            for encoding, data in output.masks
        ],
        "confidence": confidence,
        "annotations": [
            {
                "class_id": a.class_id,
                "area": a.area,
                "bbox": list(a.bbox),
                "coco_rle_counts": a.coco_rle_counts,
                "cvat_mask": list(a.cvat_mask),
                "label_studio_rle_base64": _b64(a.label_studio_rle),
                "polygons": [
                    {"outer": list(r.outer), "holes": [list(h) for h in r.holes]}
                    for r in a.polygons
                ],
            }
            for a in output.annotations
        ],
        "batch_size": output.timings.batch_size,
        "timings_ms": {stage: seconds * 1e3 for stage, seconds in _timings(output).items()},
    }


def stats_json(state: HttpState, allowed: Any = None) -> dict[str, Any]:
    """Requests by code and the latency histogram of each model (segserve_requests and
    segserve_request_duration_seconds of the server's registry); `allowed(name)` filters."""
    metrics = state.core.metrics
    models: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return models.setdefault(
            name,
            {"requests": {}, "latency_s": {"count": 0, "sum": 0.0, "buckets": []}},
        )

    for family in metrics.requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                model = sample.labels["model"]
                entry(model)["requests"][sample.labels["code"]] = int(sample.value)
    for family in metrics.request_latency.collect():
        for sample in family.samples:
            latency = entry(sample.labels["model"])["latency_s"]
            if sample.name.endswith("_bucket"):
                le = sample.labels["le"]
                if le != "+Inf":  # its count is `count`; JSON has no infinity
                    latency["buckets"].append([float(le), int(sample.value)])
            elif sample.name.endswith("_count"):
                latency["count"] = int(sample.value)
            elif sample.name.endswith("_sum"):
                latency["sum"] = sample.value
    if allowed is not None:
        models = {name: value for name, value in models.items() if allowed(name)}
    return {"uptime_s": time.monotonic() - state.started_s, "models": models}


async def _stats(request: Request) -> Response:
    state = state_of(request)
    return JSONResponse(stats_json(state, lambda name: may_use(request, name)))
