"""A CVAT serverless detector on segserve: mask shapes from a segserve model.

    segserve-client cvat-function serve --server localhost:50051 --model roadseg --port 8080
    segserve-client cvat-function yaml --server localhost:50051 --model roadseg -o fn/roadseg
    nuctl deploy --project-name cvat --path fn/roadseg --platform local

CVAT's lambda manager posts {"image": base64 of the frame, "threshold": ...} to a detector and
reads back a list of shapes. This one answers one mask shape per class present in the label map
(as CVAT's CamVid import makes one mask per class; a class split in regions stays one shape):

    {"label": class name, "confidence": score, "type": "mask",
     "mask": [0/1 bitmap of the class's box, row-major..., xtl, ytl, xbr, ybr],
     "points": [x0, y0, x1, y1, ...]}

`mask` is what CVAT's detectors return (the lambda manager run-length encodes it itself; the
inclusive box is in image pixels), made from segserve's CVAT_MASK annotation; `points` is the
outer contour of the class's largest region (segserve's POLYGONS annotation), which CVAT uses
when the user asks for masks converted to polygons (the other regions are then left out). The
labels are the model's class names, as `function.yaml` declares them; labels the CVAT task does
not map (background, say) are dropped by CVAT's label-mapping dialog.

Confidence: when the model has confidence (GetModel's has_confidence, asked once per detector),
the detector asks segserve for it (include_confidence) and a shape's `confidence` is the mean
confidence of its class's pixels (the model's top class probability, 0..1); the request's
`threshold` then drops the classes whose mean confidence is below it (no threshold, or 0: every
class). A model without confidence (labels-only) keeps the stand-in of
`_common.boundary_scores` (1 - share of the class's pixels on a class boundary), not a
probability, and `threshold` is accepted and not applied: filtering on that stand-in would drop
thin classes, not unsure ones.

Three ways to run the same code (`decode_request`, `shapes`): `create_app` (Starlette, async
client, `POST /`) for local use and tests; `nuclio_main` (nuclio's `main:handler`, the sync client
`SyncCvatFunction`, since nuclio's Python handlers are called synchronously) in the function that
`function_yaml` describes.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from segserve_client.aio import AsyncSegserveClient
from segserve_client.annotations import ClassAnnotation
from segserve_client.client import SegserveClient
from segserve_client.errors import SegserveError
from segserve_client.formats.polygons import Region
from segserve_client.integrations import require
from segserve_client.integrations._common import (
    add_service_arguments,
    segmentation_scores,
    serve,
)
from segserve_client.models import ModelInfo
from segserve_client.types import Segmentation

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse

__all__ = [
    "SEGMENT_OPTIONS",
    "CvatFunction",
    "FunctionConfig",
    "RequestError",
    "SyncCvatFunction",
    "add_arguments",
    "create_app",
    "decode_request",
    "function_yaml",
    "run",
    "segment_options",
    "shapes",
    "write_function",
]

SERVER_ENV = "SEGSERVE_SERVER"
MODEL_ENV = "SEGSERVE_MODEL"
SEGMENT_OPTIONS: dict[str, Any] = {"encodings": "raw", "annotations": ["cvat_mask", "polygons"]}
"""What every adapter asks segserve for: the label map (for the stand-in scores) and the two
formats; and include_confidence=True when the model has confidence (`segment_options`)."""
MAX_BODY_BYTES = 32 * 1024 * 1024
SHIM = Path(__file__).with_name("nuclio_main.py")


class RequestError(ValueError):
    """A lambda-manager request that cannot be answered (no image, bad base64)."""


def decode_request(body: object) -> tuple[bytes, float | None]:
    """The image bytes and threshold of a lambda-manager request (a dict or its JSON)."""
    if isinstance(body, bytes | bytearray | str):
        try:
            body = json.loads(body)
        except ValueError as exc:
            raise RequestError(f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RequestError("the body is a JSON object")
    image = body.get("image")
    if not isinstance(image, str) or not image:
        raise RequestError("the body has no `image` (base64)")
    if image.startswith("data:"):
        image = image.partition(",")[2]
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"`image` is not base64: {exc}") from exc
    threshold = body.get("threshold")
    return data, float(threshold) if isinstance(threshold, int | float) else None


def _bitmap(cvat_mask: Sequence[int]) -> list[int]:
    """CVAT mask points (runs over the box, then the box) as the box bitmap, then the box."""
    runs = np.asarray(cvat_mask[:-4], dtype=np.int64)
    pixels = np.repeat((np.arange(runs.size) & 1).astype(np.uint8), runs)
    return [*pixels.tolist(), *cvat_mask[-4:]]


def _ring_area(points: list[list[int]]) -> float:
    if len(points) < 3:
        return 0.0
    xy = np.asarray(points, dtype=np.float64)
    x, y = xy[:, 0], xy[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def _outline(regions: list[Region]) -> list[int]:
    if not regions:
        return []
    largest = max(regions, key=lambda region: _ring_area(region["outer"]))
    return [int(v) for point in largest["outer"] for v in point]


def _shape(annotation: ClassAnnotation, confidence: float | None) -> dict[str, Any]:
    return {
        "label": annotation.name,
        "confidence": confidence,
        "type": "mask",
        "mask": _bitmap(annotation.cvat_mask),
        "points": _outline(annotation.polygons),
    }


def segment_options(has_confidence: bool) -> dict[str, Any]:
    """SEGMENT_OPTIONS, asking for confidence when the model has it."""
    return {**SEGMENT_OPTIONS, "include_confidence": has_confidence}


def shapes(result: Segmentation, threshold: float | None = None) -> list[dict[str, Any]]:
    """The detector's answer for one segmentation (asked with `segment_options`).

    With confidence in `result`, a class whose mean confidence is below `threshold` is left
    out; without (a labels-only model), `threshold` is not applied (see the module's doc).
    """
    scores, _ = segmentation_scores(result)
    cut = threshold if threshold is not None and result.scores is not None else None
    return [
        _shape(a, scores.get(a.class_id))
        for a in result.annotations
        if a.cvat_mask and (cut is None or scores.get(a.class_id, 0.0) >= cut)
    ]


@dataclass(frozen=True)
class FunctionConfig:
    server: str
    model: str
    timeout_s: float | None = 30.0


class CvatFunction:
    """The detector with the async client (the HTTP service)."""

    def __init__(self, config: FunctionConfig, client: AsyncSegserveClient) -> None:
        self.config = config
        self.client = client
        self._has_confidence: bool | None = None

    async def has_confidence(self) -> bool:
        """Whether the model has confidence (GetModel, asked once)."""
        if self._has_confidence is None:
            info = await self.client.get_model(self.config.model, timeout_s=self.config.timeout_s)
            self._has_confidence = info.has_confidence
        return self._has_confidence

    async def detect(self, body: object) -> list[dict[str, Any]]:
        image, threshold = decode_request(body)
        options = segment_options(await self.has_confidence())
        result = await self.client.segment(
            image, self.config.model, timeout_s=self.config.timeout_s, **options
        )
        return shapes(result, threshold)


class SyncCvatFunction:
    """The detector with the sync client (nuclio's synchronous handler)."""

    def __init__(self, config: FunctionConfig, client: SegserveClient | None = None) -> None:
        self.config = config
        self.client = client or SegserveClient(config.server, timeout_s=config.timeout_s)
        self._has_confidence: bool | None = None

    def has_confidence(self) -> bool:
        """Whether the model has confidence (GetModel, asked once)."""
        if self._has_confidence is None:
            self._has_confidence = self.client.get_model(self.config.model).has_confidence
        return self._has_confidence

    def detect(self, body: object) -> list[dict[str, Any]]:
        image, threshold = decode_request(body)
        options = segment_options(self.has_confidence())
        return shapes(self.client.segment(image, self.config.model, **options), threshold)

    def close(self) -> None:
        self.client.close()


def create_app(config: FunctionConfig) -> Starlette:
    """The detector as a Starlette app: `POST /` as nuclio's HTTP trigger, `GET /health`."""
    require("starlette")
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    state: dict[str, CvatFunction] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        del app
        client = AsyncSegserveClient(config.server, timeout_s=config.timeout_s)
        state["function"] = CvatFunction(config, client)
        try:
            yield
        finally:
            await client.close()

    async def invoke(request: Request) -> JSONResponse:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return JSONResponse({"error": "the body is over 32 MB"}, status_code=413)
        try:
            return JSONResponse(await state["function"].detect(body))
        except RequestError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except SegserveError as exc:
            status = 400 if exc.code == grpc.StatusCode.INVALID_ARGUMENT else 503
            return JSONResponse({"error": str(exc)}, status_code=status)

    async def health(request: Request) -> JSONResponse:
        del request
        return JSONResponse({"status": "UP", "model": config.model})

    return Starlette(
        routes=[Route("/", invoke, methods=["POST"]), Route("/health", health, methods=["GET"])],
        lifespan=lifespan,
    )


# ----------------------------------------------------------------------------------------------
# function.yaml
# ----------------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    text = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return text or "model"


def function_yaml(
    info: ModelInfo,
    server: str,
    *,
    pip_spec: str = "segserve",
    base_image: str = "python:3.11-slim",
) -> str:
    """nuclio's function.yaml of the detector for one model, as CVAT's stock functions have it:
    the classes as `metadata.annotations.spec`, handler `main:handler`, 30 s event timeout,
    32 MB bodies. JSON strings are valid YAML scalars, so every value is written as one."""
    q = json.dumps
    spec = json.dumps(
        [{"id": c.id, "name": c.name, "type": "mask"} for c in info.classes], indent=2
    )
    spec_lines = "\n".join("      " + line for line in spec.splitlines())
    slug = _slug(info.name)
    return f"""\
# Generated by `segserve-client cvat-function yaml` from model {info.name} v{info.version}.
metadata:
  name: {q("segserve-" + slug)}
  namespace: cvat
  annotations:
    name: {q("segserve " + info.name)}
    type: detector
    framework: segserve
    spec: |
{spec_lines}

spec:
  description: {q(f"segserve model {info.name}: one mask per class")}
  runtime: 'python:3.11'
  handler: main:handler
  eventTimeout: 30s
  env:
    - name: {SERVER_ENV}
      value: {q(server)}
    - name: {MODEL_ENV}
      value: {q(info.name)}

  build:
    image: {q("cvat.segserve." + slug)}
    baseImage: {q(base_image)}
    directives:
      preCopy:
        - kind: RUN
          value: {q("pip install --no-cache-dir " + pip_spec)}

  triggers:
    myHttpTrigger:
      numWorkers: 2
      kind: 'http'
      workerAvailabilityTimeoutMilliseconds: 10000
      attributes:
        maxRequestBodySize: 33554432 # 32MB

  platform:
    attributes:
      restartPolicy:
        name: always
        maximumRetryCount: 3
      mountMode: volume
"""


def write_function(info: ModelInfo, server: str, directory: Path, **options: str) -> list[Path]:
    """Writes DIRECTORY/function.yaml and DIRECTORY/main.py (the nuclio shim)."""
    directory.mkdir(parents=True, exist_ok=True)
    yaml_path = directory / "function.yaml"
    yaml_path.write_text(function_yaml(info, server, **options))
    main_path = directory / "main.py"
    main_path.write_text(SHIM.read_text())
    return [yaml_path, main_path]


# ----------------------------------------------------------------------------------------------
# segserve-client cvat-function {serve,yaml}
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", choices=["serve", "yaml"], help="serve over HTTP, or write function.yaml"
    )
    add_service_arguments(parser, 8080)
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("."), metavar="DIR", help="yaml: where to write"
    )
    parser.add_argument(
        "--function-server",
        metavar="HOST:PORT",
        help="yaml: segserve's address as the function sees it (default: --server)",
    )
    parser.add_argument(
        "--pip-spec",
        default="segserve",
        help="yaml: what the function's image pip-installs (a wheel path, a VCS URL, ...)",
    )


def run(args: argparse.Namespace, client: SegserveClient) -> int:
    if args.action == "yaml":
        info = client.get_model(args.model)
        written = write_function(
            info, args.function_server or args.server, args.output, pip_spec=args.pip_spec
        )
        print("wrote " + ", ".join(str(path) for path in written))
        return 0
    config = FunctionConfig(args.server, args.model, args.timeout or FunctionConfig.timeout_s)
    serve(create_app(config), args.host, args.port)
    return 0
