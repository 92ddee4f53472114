"""The Label Studio ML backend over real HTTP (uvicorn on loopback) in front of the real test
server; its brush masks decoded with Label Studio's own converter."""

from __future__ import annotations

import base64
import subprocess
import sys

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from segserve_client.aio import AsyncSegserveClient
from segserve_client.integrations import require
from segserve_client.integrations.labelstudio import (
    BackendConfig,
    create_app,
    parse_label_config,
    parse_label_map,
)
from tests.conftest import encode, quadrant_image
from tests.harness.http_apps import serving

LABEL_CONFIG = """
<View>
  <Image name="img" value="$picture" zoom="true"/>
  <BrushLabels name="tag" toName="img">
    <Label value="Red" background="red"/>
    <Label value="GREEN"/>
    <Label value="Road"/>
    <Label value="Sky"/>
  </BrushLabels>
</View>
"""
# Red and GREEN match classes by name (any case), Road is mapped to `blue` explicitly; Sky has no
# class and the model's white and background classes have no label.
LABELS = {"Red": 1, "GREEN": 2, "Road": 3}
TOKEN = "secret-token"


def image_site(png: bytes) -> Starlette:
    """Serves /img.png only to requests with Label Studio's token header."""

    async def image(request: Request) -> Response:
        if request.headers.get("authorization") != f"Token {TOKEN}":
            return Response("no token", status_code=401)
        return Response(png, media_type="image/png")

    return Starlette(routes=[Route("/img.png", image)])


async def truth(server, png: bytes) -> np.ndarray:
    async with AsyncSegserveClient(f"127.0.0.1:{server.port}") as client:
        result = await client.segment(png, "colour", encodings="raw")
    return np.asarray(result.labels)


def test_label_config_and_label_map_parse():
    control = parse_label_config(LABEL_CONFIG)
    assert (control.from_name, control.to_name, control.data_key) == ("tag", "img", "picture")
    assert control.labels == ("Red", "GREEN", "Road", "Sky")
    assert parse_label_map(" Road=blue, Car=car ") == {"Road": "blue", "Car": "car"}
    with pytest.raises(ValueError, match="LABEL=CLASS"):
        parse_label_map("Road")
    with pytest.raises(ValueError, match="no BrushLabels"):
        parse_label_config("<View><Image name='i' value='$image'/></View>")
    with pytest.raises(ImportError, match=r"segserve\[integrations\]"):
        require("segserve_no_such_module")


async def test_predict_over_http(server, tmp_path):
    from label_studio_converter import brush

    rgb = quadrant_image(60, 80)
    png = encode(rgb)
    labels = await truth(server, png)
    root = tmp_path / "files"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(png)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "secret.png").write_bytes(png)  # outside the root
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()

    async with serving(image_site(png)) as site, serving(image_site(png)) as elsewhere:
        config = BackendConfig(
            server=f"127.0.0.1:{server.port}",
            model="colour",
            root=root,
            label_map={"Road": "blue"},
            label_studio_url=site,
            api_key=TOKEN,
        )
        tasks = [
            {"id": 1, "data": {"picture": "/data/local-files/?d=sub/a.png"}},
            {"id": 2, "data": {"picture": str(root / "sub" / "a.png")}},
            {"id": 3, "data": {"picture": data_uri}},
            {"id": 4, "data": {"picture": f"{site}/img.png"}},  # on Label Studio: token sent
            {"id": 5, "data": {"picture": "/data/local-files/?d=../secret.png"}},
            {"id": 6, "data": {"picture": str(tmp_path / "files" / ".." / "secret.png")}},
            {"id": 7, "data": {"picture": "/data/local-files/?d=broken.png"}},
            {"id": 8, "data": {"picture": f"{elsewhere}/img.png"}},  # another host: no token
            {"id": 9, "data": {}},
        ]
        async with serving(create_app(config)) as backend, httpx.AsyncClient() as http:
            health = (await http.get(f"{backend}/health")).json()
            assert health == {"status": "UP", "model_class": "SegserveBackend"}
            setup = await http.post(
                f"{backend}/setup",
                json={"project": "1.1", "schema": LABEL_CONFIG, "extra_params": {}},
            )
            assert setup.status_code == 200
            version = setup.json()["model_version"]
            assert version.startswith("colour-v")
            answer = await http.post(
                f"{backend}/predict",
                json={
                    "tasks": tasks,
                    "model_version": version,
                    "project": "1.1",
                    "label_config": LABEL_CONFIG,
                    "params": {"context": None},
                },
            )
            assert answer.status_code == 200
            results = answer.json()["results"]
            # Without label_config the one from /setup is used.
            again = await http.post(f"{backend}/predict", json={"tasks": tasks[:1]})
            assert again.json()["results"][0]["result"] == results[0]["result"]
            webhook = await http.post(f"{backend}/webhook", json={"action": "PROJECT_UPDATED"})
            assert webhook.status_code == 200

    assert len(results) == len(tasks)
    for prediction in results[:4]:
        assert "error" not in prediction, prediction.get("error")
        assert prediction["model_version"] == version
        assert 0.0 < prediction["score"] <= 1.0
        items = prediction["result"]
        assert sorted(item["value"]["brushlabels"][0] for item in items) == sorted(LABELS)
        for item in items:
            assert item["type"] == "brushlabels"
            assert (item["from_name"], item["to_name"]) == ("tag", "img")
            assert (item["original_width"], item["original_height"]) == (80, 60)
            assert item["image_rotation"] == 0
            assert item["value"]["format"] == "rle"
            assert 0.0 < item["score"] <= 1.0
            label = item["value"]["brushlabels"][0]
            rgba = np.asarray(brush.decode_rle(item["value"]["rle"]), np.uint8)
            alpha = rgba.reshape(60, 80, 4)[:, :, 3]
            np.testing.assert_array_equal(alpha == 255, labels == LABELS[label])
    assert results[1]["result"] == results[0]["result"] == results[2]["result"]
    for failed, why in zip(
        results[4:],
        [
            "outside the document root",
            "outside the document root",
            "INVALID_ARGUMENT",
            "HTTP 401",
            "has no data['picture']",
        ],
        strict=True,
    ):
        assert failed["result"] == []
        assert failed["score"] is None
        assert why in failed["error"]


async def test_bad_requests_are_400(server):
    config = BackendConfig(server=f"127.0.0.1:{server.port}", model="colour")
    async with serving(create_app(config)) as backend, httpx.AsyncClient() as http:
        no_config = await http.post(f"{backend}/predict", json={"tasks": []})
        assert no_config.status_code == 400
        not_json = await http.post(f"{backend}/predict", content=b"{")
        assert not_json.status_code == 400
        local = await http.post(
            f"{backend}/predict",
            json={
                "tasks": [{"data": {"picture": "/data/local-files/?d=a.png"}}],
                "label_config": LABEL_CONFIG,
            },
        )
        assert "no document root" in local.json()["results"][0]["error"]


def test_the_client_imports_without_the_extra():
    """With Starlette, uvicorn and httpx absent, the CLI and the adapters' modules import and
    building an app names the extra."""
    code = """
import sys
for name in ("starlette", "uvicorn", "httpx"):
    sys.modules[name] = None  # import raises ImportError
import segserve_client.cli
from segserve_client.integrations import cvat, labelstudio
try:
    labelstudio.create_app(labelstudio.BackendConfig(server="x:1", model="m"))
except ImportError as exc:
    print(exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "segserve[integrations]" in done.stdout
