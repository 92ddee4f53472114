"""A Label Studio ML backend on segserve: brush-label predictions from a segserve model.

    segserve-client labelstudio-backend --server localhost:50051 --model roadseg --port 9090 \\
        --root /label-studio/files --label-map "Road=road,Car=car"

Then in Label Studio: Settings > Model > Connect model, URL http://HOST:9090. The routes are those
of Label Studio's ML backend protocol (label-studio-ml 2.x), on Starlette and uvicorn:

- `GET /health` (and `GET /`): {"status": "UP", "model_class": "SegserveBackend"}
- `POST /setup` {project, schema, extra_params}: {"model_version": "MODEL-vN"}
- `POST /predict` {tasks, label_config, ...}: {"results": [one prediction per task, in order]}
- `POST /webhook`: 200 (nothing is trained here).

Each prediction is {"result": [brush items], "score", "model_version"}; a brush item is one class
present in the label map, from segserve's LABEL_STUDIO_RLE annotation: {from_name, to_name,
original_width, original_height, image_rotation: 0, value: {format: "rle", rle, brushlabels:
[label]}, score, type: "brushlabels"}.

Labels: the project's `label_config` (sent with every /predict; the one from /setup otherwise) is
parsed for its first BrushLabels control: its `name` is from_name, its `toName` to_name, and the
`value` of the Image it points at names the task data key of the image. A model class becomes
the Label whose value equals the class name, ignoring case, unless `--label-map` /
$SEGSERVE_LS_LABEL_MAP maps it ("Label=class,..."; explicit entries win). Classes with no label
are left out.

Images (task["data"][key]): `data:` URIs; Label Studio's local files (`/data/local-files/?d=REL`,
also as a full URL when a root is set) and plain paths, read under the document root (`--root`, or
$LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; a path that resolves outside it is refused); http(s)
URLs, fetched with httpx, with `Authorization: Token $LABEL_STUDIO_API_KEY` when the URL is on the
Label Studio host (`--label-studio-url` / $LABEL_STUDIO_URL); paths such as `/data/upload/...`
are fetched from that host.

Errors: a task that fails (an unreadable image, a refused path, a segserve error) gets
{"result": [], "score": null, "model_version", "error": "why"} in its place; the other tasks of
the batch are answered as usual. Label Studio pairs predictions with tasks by position (it
checks that there are as many), reads `result` and `score` and ignores the keys it does not
know (label_studio/ml/models.py); it stores the empty prediction, so a task that failed is asked
again only for another model version or when asked for by hand (Retrieve predictions).

Score: when the model has confidence (GetModel's has_confidence, asked once), the backend asks
segserve for it (include_confidence) and each item's `score` is the mean confidence of its class's
pixels (the model's top class probability, 0..1; Segmentation.class_confidence), the
prediction's `score` the mean confidence over the whole image (ImageScores.mean_confidence), so
Label Studio's "sort by prediction score" puts the least sure images first. A model without
confidence (labels-only) keeps a stand-in (`_common.boundary_scores`): per item 1 - (share of
the class's pixels on a class boundary), per task the same over the whole label map; it ranks
ragged predictions first for review and is not a probability.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, unquote_to_bytes, urljoin, urlsplit

from segserve_client.aio import AsyncSegserveClient
from segserve_client.errors import SegserveError
from segserve_client.integrations import require
from segserve_client.integrations._common import (
    add_service_arguments,
    segmentation_scores,
    serve,
)
from segserve_client.models import ModelInfo

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse

__all__ = [
    "BackendConfig",
    "BrushControl",
    "ImageError",
    "LabelStudioBackend",
    "add_arguments",
    "class_labels",
    "create_app",
    "parse_label_config",
    "parse_label_map",
    "run",
]

MODEL_CLASS = "SegserveBackend"
LABEL_MAP_ENV = "SEGSERVE_LS_LABEL_MAP"
ROOT_ENV = "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
URL_ENV = "LABEL_STUDIO_URL"
KEY_ENV = "LABEL_STUDIO_API_KEY"
LOCAL_FILES = "/data/local-files/"
MAX_IMAGE_BYTES = 64 * 1024 * 1024
CONCURRENCY = 8
"""Tasks of one /predict batch in flight at once (read, segmented)."""


class ImageError(ValueError):
    """A task's image cannot be read (or may not be)."""


@dataclass(frozen=True)
class BrushControl:
    """The BrushLabels control of a labelling config."""

    from_name: str
    to_name: str
    data_key: str
    """The task data key of the image the control labels (the Image's `value` without `$`)."""
    labels: tuple[str, ...]


def parse_label_config(label_config: str) -> BrushControl:
    """The first BrushLabels control of a Label Studio labelling config (XML)."""
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError as exc:
        raise ValueError(f"the label config is not XML: {exc}") from exc
    control = next(root.iter("BrushLabels"), None)
    if control is None:
        raise ValueError("the label config has no BrushLabels control")
    from_name = control.get("name", "")
    to_name = control.get("toName", "")
    if not from_name or not to_name:
        raise ValueError("the BrushLabels control needs a name and a toName")
    image = next((tag for tag in root.iter() if tag.get("name") == to_name), None)
    data_key = (image.get("value", "") if image is not None else "").lstrip("$")
    labels = tuple(
        value for label in control.iter("Label") if (value := label.get("value")) is not None
    )
    return BrushControl(from_name, to_name, data_key or "image", labels)


def parse_label_map(text: str | None) -> dict[str, str]:
    """The label map text "Label=class,Label2=class2" as {label: class}."""
    mapping: dict[str, str] = {}
    for entry in (text or "").split(","):
        if not entry.strip():
            continue
        label, sep, name = entry.partition("=")
        if not sep or not label.strip() or not name.strip():
            raise ValueError(f"a label map entry is LABEL=CLASS, got {entry.strip()!r}")
        mapping[label.strip()] = name.strip()
    return mapping


def class_labels(
    info: ModelInfo, labels: tuple[str, ...], label_map: Mapping[str, str]
) -> dict[int, str]:
    """{class id: project label}: explicit entries first, then names equal but for case."""
    by_name = {c.name.lower(): c.id for c in info.classes}
    chosen: dict[int, str] = {}
    for label, name in label_map.items():
        class_id = by_name.get(name.lower())
        if class_id is None:
            raise ValueError(f"label map: model {info.name} has no class {name!r}")
        chosen[class_id] = label
    for label in labels:
        class_id = by_name.get(label.lower())
        if class_id is not None and class_id not in chosen and label not in label_map:
            chosen[class_id] = label
    return chosen


@dataclass
class BackendConfig:
    """What the backend forwards to and where it reads images."""

    server: str
    model: str
    root: Path | None = None
    label_map: dict[str, str] = field(default_factory=dict)
    label_studio_url: str | None = None
    api_key: str | None = None
    timeout_s: float | None = 30.0

    @classmethod
    def from_env(cls, server: str, model: str, **overrides: Any) -> BackendConfig:
        """Defaults from the environment ($LABEL_STUDIO_URL, ...), `overrides` where not None."""
        root = os.environ.get(ROOT_ENV)
        values: dict[str, Any] = {
            "root": Path(root) if root else None,
            "label_map": parse_label_map(os.environ.get(LABEL_MAP_ENV)),
            "label_studio_url": os.environ.get(URL_ENV) or None,
            "api_key": os.environ.get(KEY_ENV) or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(server=server, model=model, **values)


class LabelStudioBackend:
    """The backend's work, apart from HTTP: images in, predictions out."""

    def __init__(
        self, config: BackendConfig, client: AsyncSegserveClient, http: httpx.AsyncClient
    ) -> None:
        self.config = config
        self.client = client
        self.http = http
        self.label_config: str | None = None
        self._info: ModelInfo | None = None

    async def model_info(self) -> ModelInfo:
        if self._info is None:
            self._info = await self.client.get_model(self.config.model)
        return self._info

    async def model_version(self) -> str:
        info = await self.model_info()
        return f"{info.name}-v{info.version}"

    # -- images ----------------------------------------------------------------------------

    def _local(self, relative: str) -> bytes:
        root = self.config.root
        if root is None:
            raise ImageError(f"{relative!r} is a local file and no document root is set (--root)")
        base = root.resolve()
        given = Path(relative)
        path = (given if given.is_absolute() else base / given).resolve()
        if not path.is_relative_to(base):
            raise ImageError(f"{relative!r} is outside the document root")
        if not path.is_file():
            raise ImageError(f"no such file under the document root: {relative!r}")
        return path.read_bytes()

    def _on_label_studio(self, url: str) -> bool:
        if not self.config.label_studio_url:
            return False
        ours = urlsplit(self.config.label_studio_url)
        theirs = urlsplit(url)
        return (ours.scheme, ours.netloc) == (theirs.scheme, theirs.netloc)

    async def _fetch(self, url: str) -> bytes:
        headers = {}
        if self.config.api_key and self._on_label_studio(url):
            headers["Authorization"] = f"Token {self.config.api_key}"
        try:
            response = await self.http.get(url, headers=headers, follow_redirects=False)
        except Exception as exc:  # httpx.HTTPError and invalid URLs alike
            raise ImageError(f"cannot fetch {url}: {exc}") from exc
        if response.status_code != 200:
            raise ImageError(f"fetching {url} answered HTTP {response.status_code}")
        if len(response.content) > MAX_IMAGE_BYTES:
            raise ImageError(f"{url} is larger than {MAX_IMAGE_BYTES} bytes")
        return response.content

    async def read_image(self, reference: object) -> bytes:
        """The encoded image a task's data names."""
        if not isinstance(reference, str) or not reference:
            raise ImageError(f"the task's image is not a URL or path: {reference!r}")
        if reference.startswith("data:"):
            header, sep, payload = reference.partition(",")
            if not sep:
                raise ImageError("a data: URI without data")
            try:
                if header.endswith(";base64"):
                    return base64.b64decode(payload, validate=True)
                return unquote_to_bytes(payload)
            except (binascii.Error, ValueError) as exc:
                raise ImageError(f"a data: URI that does not decode: {exc}") from exc
        parts = urlsplit(reference)
        if parts.path.startswith(LOCAL_FILES) and (
            not parts.netloc or self.config.root is not None
        ):
            relative = parse_qs(parts.query).get("d", [""])[0]
            if not relative:
                raise ImageError(f"{reference!r} names no file (?d=...)")
            return await asyncio.to_thread(self._local, relative)
        if parts.scheme in ("http", "https"):
            return await self._fetch(reference)
        if parts.scheme:
            raise ImageError(f"unsupported URL scheme {parts.scheme!r}")
        if reference.startswith("/data/") and self.config.label_studio_url:
            return await self._fetch(urljoin(self.config.label_studio_url, reference))
        return await asyncio.to_thread(self._local, unquote(reference))

    # -- predictions -----------------------------------------------------------------------

    async def predict_task(
        self, task: Mapping[str, Any], control: BrushControl, version: str
    ) -> dict[str, Any]:
        data = task.get("data")
        if not isinstance(data, Mapping) or control.data_key not in data:
            raise ImageError(f"the task has no data[{control.data_key!r}]")
        image = await self.read_image(data[control.data_key])
        info = await self.model_info()
        labels_of = class_labels(info, control.labels, self.config.label_map)
        result = await self.client.segment(
            image,
            self.config.model,
            encodings="raw",
            annotations=["label_studio_rle"],
            include_confidence=info.has_confidence,
            timeout_s=self.config.timeout_s,
        )
        item_scores, score = segmentation_scores(result)
        items = [
            {
                "from_name": control.from_name,
                "to_name": control.to_name,
                "original_width": result.width,
                "original_height": result.height,
                "image_rotation": 0,
                "value": {
                    "format": "rle",
                    "rle": annotation.label_studio_rle,
                    "brushlabels": [labels_of[annotation.class_id]],
                },
                "score": item_scores.get(annotation.class_id),
                "type": "brushlabels",
            }
            for annotation in result.annotations
            if annotation.class_id in labels_of
        ]
        return {"result": items, "score": score, "model_version": version}

    async def predict(self, tasks: list[Any], label_config: str | None) -> list[dict[str, Any]]:
        """One prediction per task, in order; a failed task gets an empty one with `error`."""
        config = label_config or self.label_config
        if not config:
            raise ValueError("no label_config in the request and none from /setup")
        control = parse_label_config(config)
        version = await self.model_version()

        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(task: Any) -> dict[str, Any]:
            try:
                if not isinstance(task, Mapping):
                    raise ImageError("a task is a JSON object")
                async with limit:
                    return await self.predict_task(task, control, version)
            except (ImageError, SegserveError, ValueError, OSError) as exc:
                return {"result": [], "score": None, "model_version": version, "error": str(exc)}

        return list(await asyncio.gather(*(one(task) for task in tasks)))


def create_app(config: BackendConfig) -> Starlette:
    """The backend as a Starlette app; its gRPC and HTTP clients live as long as it runs."""
    require("starlette")
    httpx_module = require("httpx")
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    state: dict[str, LabelStudioBackend] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        del app
        client = AsyncSegserveClient(config.server, timeout_s=config.timeout_s)
        http: httpx.AsyncClient = httpx_module.AsyncClient(timeout=config.timeout_s)
        state["backend"] = LabelStudioBackend(config, client, http)
        try:
            yield
        finally:
            await http.aclose()
            await client.close()

    async def body(request: Request) -> dict[str, Any]:
        try:
            value = await request.json()
        except ValueError as exc:
            raise ValueError(f"the body is not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError("the body is a JSON object")
        return value

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"status": "ERROR", "error": message}, status_code=status)

    async def health(request: Request) -> JSONResponse:
        del request
        return JSONResponse({"status": "UP", "model_class": MODEL_CLASS})

    async def setup(request: Request) -> JSONResponse:
        backend = state["backend"]
        try:
            payload = await body(request)
            schema = payload.get("schema")
            if isinstance(schema, str) and schema:
                parse_label_config(schema)
                backend.label_config = schema
            return JSONResponse({"model_version": await backend.model_version()})
        except ValueError as exc:
            return error(400, str(exc))
        except SegserveError as exc:
            return error(503, str(exc))

    async def predict(request: Request) -> JSONResponse:
        backend = state["backend"]
        try:
            payload = await body(request)
            tasks = payload.get("tasks")
            if not isinstance(tasks, list):
                raise ValueError("`tasks` is a list")
            label_config = payload.get("label_config")
            results = await backend.predict(
                tasks, label_config if isinstance(label_config, str) else None
            )
        except ValueError as exc:
            return error(400, str(exc))
        except SegserveError as exc:  # the model itself is not there
            return error(503, str(exc))
        return JSONResponse({"results": results})

    async def webhook(request: Request) -> JSONResponse:
        del request
        return JSONResponse({})

    routes = [
        Route("/", health, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/setup", setup, methods=["POST"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/webhook", webhook, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


# ----------------------------------------------------------------------------------------------
# segserve-client labelstudio-backend
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_service_arguments(parser, 9090)
    parser.add_argument(
        "--root", type=Path, help=f"document root of local files (default: ${ROOT_ENV})"
    )
    parser.add_argument(
        "--label-map",
        metavar="LABEL=CLASS,...",
        help=f"project labels of model classes (default: ${LABEL_MAP_ENV}; else same names)",
    )
    parser.add_argument(
        "--label-studio-url",
        metavar="URL",
        help=f"Label Studio's address, sent ${KEY_ENV} as a token (default: ${URL_ENV})",
    )


def run(args: argparse.Namespace, client: object = None) -> int:
    """Serves the backend until interrupted (the CLI's sync client is not used)."""
    del client
    config = BackendConfig.from_env(
        args.server,
        args.model,
        root=args.root,
        label_map=parse_label_map(args.label_map) if args.label_map else None,
        label_studio_url=args.label_studio_url,
        timeout_s=args.timeout,
    )
    serve(create_app(config), args.host, args.port)
    return 0
