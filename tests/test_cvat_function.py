"""The CVAT serverless detector: over real HTTP (uvicorn on loopback) in front of the real test
server, its function.yaml, and the nuclio main.py shim.

nuclio cannot be installed here, so the shim is called with a fake context and event: test
doubles of nuclio's interface only (context.user_data, context.logger, context.Response,
event.body). The segserve server behind it is real.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np

from segserve_client.aio import AsyncSegserveClient
from segserve_client.cli import main
from segserve_client.formats.cvat import connected_regions, decode_cvat_bitmap
from segserve_client.formats.polygons import rasterize
from segserve_client.integrations.cvat import FunctionConfig, create_app, function_yaml
from tests.conftest import encode, quadrant_image
from tests.harness.http_apps import serving

HEIGHT, WIDTH = 60, 80


def street() -> np.ndarray:
    """Quadrants plus a second, separate red blob: a class in two regions."""
    image = quadrant_image(HEIGHT, WIDTH)
    image[45:55, 60:70] = (255, 0, 0)
    return image


async def segment_truth(server, png: bytes):
    async with AsyncSegserveClient(f"127.0.0.1:{server.port}") as client:
        result = await client.segment(png, "colour", encodings="raw")
        info = await client.get_model("colour")
    return np.asarray(result.labels), info


def check_shapes(shapes: list[dict[str, Any]], labels: np.ndarray, names: dict[str, int]) -> None:
    present = {int(c) for c in np.unique(labels)}
    assert sorted(names[s["label"]] for s in shapes) == sorted(present)
    for shape in shapes:
        assert shape["type"] == "mask"
        class_id = names[shape["label"]]
        truth = labels == class_id
        mask = decode_cvat_bitmap(shape["mask"], HEIGHT, WIDTH)
        np.testing.assert_array_equal(mask, truth)
        assert set(shape["mask"][:-4]) <= {0, 1}
        assert 0.0 < shape["confidence"] <= 1.0
        # points: the outer contour of the class's largest region (holes filled).
        ring = np.asarray(shape["points"]).reshape(-1, 2).tolist()
        inside = rasterize([{"outer": ring, "holes": []}], HEIGHT, WIDTH)
        regions, count = connected_regions(truth, 8)
        largest = np.bincount(regions.reshape(-1), minlength=count + 1)[1:].argmax() + 1
        np.testing.assert_array_equal(inside & truth, regions == largest)


async def test_detector_over_http(server):
    png = encode(street())
    labels, info = await segment_truth(server, png)
    names = {c.name: c.id for c in info.classes}
    config = FunctionConfig(f"127.0.0.1:{server.port}", "colour")
    async with serving(create_app(config)) as function, httpx.AsyncClient() as http:
        answer = await http.post(
            f"{function}/", json={"image": base64.b64encode(png).decode(), "threshold": 0.5}
        )
        assert answer.status_code == 200
        shapes = answer.json()
        bad = await http.post(f"{function}/", json={"image": "not base64!"})
        assert bad.status_code == 400
        not_image = await http.post(
            f"{function}/", json={"image": base64.b64encode(b"garbage").decode()}
        )
        assert not_image.status_code == 400
        assert (await http.get(f"{function}/health")).json()["status"] == "UP"
    check_shapes(shapes, labels, names)
    red = next(s for s in shapes if s["label"] == "red")
    # Red is two regions, one shape: its bitmap has both, its outline the larger.
    assert decode_cvat_bitmap(red["mask"], HEIGHT, WIDTH)[50, 65]


def parse_function_yaml(text: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The document with PyYAML where installed; the class spec from the text in any case."""
    try:
        import yaml
    except ImportError:
        document = None
    else:
        document = yaml.safe_load(text)
    block = re.search(r"    spec: \|\n((?:      .*\n)+)", text)
    assert block is not None
    return document, json.loads(block.group(1))


async def test_function_yaml_and_nuclio_shim(server, tmp_path, monkeypatch):
    png = encode(street())
    labels, info = await segment_truth(server, png)
    target = f"127.0.0.1:{server.port}"
    # The command, through the CLI (its sync client must not block the server's event loop).
    status = await asyncio.to_thread(
        main,
        ["cvat-function", "yaml", "--server", target, "--model", "colour", "-o", str(tmp_path)],
    )
    assert status == 0
    text = (tmp_path / "function.yaml").read_text()
    assert text == function_yaml(info, target)
    document, spec = parse_function_yaml(text)
    assert spec == [{"id": c.id, "name": c.name, "type": "mask"} for c in info.classes]
    assert len(spec) == 5 and spec[1]["name"] == "red"
    for line in (
        "    type: detector",
        "  handler: main:handler",
        "  eventTimeout: 30s",
        "        maxRequestBodySize: 33554432 # 32MB",
        "  runtime: 'python:3.11'",
        f'      value: "{target}"',
    ):
        assert line + "\n" in text
    if document is not None:
        assert document["metadata"]["annotations"]["type"] == "detector"
        assert json.loads(document["metadata"]["annotations"]["spec"]) == spec
        assert document["spec"]["handler"] == "main:handler"
        assert document["spec"]["eventTimeout"] == "30s"

    # The main.py written beside it, loaded as nuclio would (a module named main).
    module_spec = importlib.util.spec_from_file_location("main", tmp_path / "main.py")
    assert module_spec is not None and module_spec.loader is not None
    shim = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(shim)

    @dataclass
    class Response:  # nuclio's context.Response, as handlers build it
        body: str
        headers: dict[str, str]
        content_type: str
        status_code: int

    @dataclass
    class Logger:
        lines: list[str] = field(default_factory=list)

        def info(self, message: str) -> None:
            self.lines.append(message)

        warn = info

    context = SimpleNamespace(user_data=SimpleNamespace(), logger=Logger(), Response=Response)
    monkeypatch.setenv("SEGSERVE_SERVER", target)
    monkeypatch.setenv("SEGSERVE_MODEL", "colour")
    shim.init_context(context)
    assert "colour" in context.logger.lines[0]
    try:
        body = {"image": base64.b64encode(png).decode(), "threshold": 0.5}
        # nuclio hands over the JSON body parsed (a dict) or as bytes: both are taken.
        for event_body in (body, json.dumps(body).encode()):
            answer = await asyncio.to_thread(
                shim.handler, context, SimpleNamespace(body=event_body)
            )
            assert (answer.status_code, answer.content_type) == (200, "application/json")
            check_shapes(json.loads(answer.body), labels, {c.name: c.id for c in info.classes})
        bad = await asyncio.to_thread(shim.handler, context, SimpleNamespace(body=b"{}"))
        assert bad.status_code == 400
    finally:
        context.user_data.function.close()
