"""Confidence through the client library and its tools, against a real server with a label model
that has a confidence output (tools/add_confidence.py), a scores model and a labels-only model:
Segmentation.confidence / class_confidence / scores, ModelInfo.has_confidence,
FAILED_PRECONDITION as SegserveError, and the real per-class confidence in the scores of the
Label Studio backend, the CVAT detector and prefill's import files."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from segserve_client import (
    AsyncSegserveClient,
    FrameFailed,
    Segmentation,
    SegserveClient,
    SegserveError,
)
from segserve_client.cli import main as client_main
from segserve_client.confidence import ImageScores
from segserve_client.integrations.cvat import FunctionConfig, SyncCvatFunction, create_app
from segserve_client.integrations.labelstudio import BackendConfig
from segserve_client.integrations.labelstudio import create_app as labelstudio_app
from segserve_server.server import Server
from tests.conftest import H, W, encode, make_settings, quadrant_image
from tests.harness.http_apps import serving
from tests.harness.synthetic_models import write_confidence_entry, write_entry
from tests.test_confidence import soft_image

MODEL = "colour_confident"
LABEL_CONFIG = """
<View>
  <Image name="img" value="$image"/>
  <BrushLabels name="tag" toName="img">
    <Label value="dark"/><Label value="red"/><Label value="green"/>
    <Label value="blue"/><Label value="bright"/>
  </BrushLabels>
</View>
"""


@pytest.fixture(scope="module")
async def target(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    root = tmp_path_factory.mktemp("client-confidence-repository")
    write_confidence_entry(root, MODEL, H, W, max_batch_size=4)
    write_entry(root, "colour_logits", H, W, output="logits", max_batch_size=4)
    write_entry(root, "colour", H, W, max_batch_size=4)
    server = Server(make_settings(root, metrics_port=None))
    await server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.stop(timeout_s=5)


def soft_png(height: int = H, width: int = W) -> bytes:
    return encode(soft_image(height, width))


def check_confidence(result: Segmentation, threshold: float) -> np.ndarray:
    """The Segmentation's confidence fields agree with each other and with its label map."""
    confidence = result.confidence
    assert confidence is not None
    assert confidence.shape == (result.height, result.width) and confidence.dtype == np.uint8
    assert not confidence.flags.writeable
    assert confidence.min() < confidence.max()  # the ramp is not equally sure everywhere
    labels = np.asarray(result.labels)
    present = sorted(int(c) for c in np.unique(labels))
    assert sorted(result.class_confidence) == present == [c.class_id for c in result.classes]
    for class_id, mean in result.class_confidence.items():
        assert 0.0 < mean <= 1.0
        assert mean == pytest.approx(confidence[labels == class_id].mean() / 255, abs=1e-5)
    scores = result.scores
    assert isinstance(scores, ImageScores)
    assert scores.mean_confidence == pytest.approx(confidence.mean() / 255, abs=1e-5)
    assert scores.uncertainty == pytest.approx(
        (confidence < round(255 * threshold)).mean(), abs=1e-6
    )
    assert scores.boundary_length > 0 and scores.regions >= len(present)
    return confidence


async def test_segment_with_confidence_async(target: str) -> None:
    async with AsyncSegserveClient(target, timeout_s=30) as client:
        info = await client.get_model(MODEL)
        assert info.has_confidence
        assert (await client.get_model("colour_logits")).has_confidence
        assert not (await client.get_model("colour")).has_confidence
        for model in (MODEL, "colour_logits"):
            for threshold in (0.5, 0.9):
                result = await client.segment(
                    soft_png(),
                    model,
                    encodings="raw",
                    output_size="model",
                    include_confidence=True,
                    confidence_threshold=threshold,
                )
                check_confidence(result, threshold)
        # Original size: the map comes back at the label map's size.
        big = await client.segment(soft_png(96, 128), MODEL, include_confidence=True)
        assert (big.width, big.height) == (128, 96)
        check_confidence(big, 0.5)
        # Not asked for: nothing.
        plain = await client.segment(soft_png(), MODEL)
        assert plain.confidence is None and plain.scores is None
        assert plain.class_confidence == {}
        # Stream answers carry the same fields.
        frames = [(i, soft_image()) for i in range(3)]
        answers = [
            answer
            async for _, answer in client.stream(
                frames, MODEL, include_confidence=True, confidence_threshold=0.9
            )
        ]
        assert len(answers) == 3
        for answer in answers:
            assert isinstance(answer, Segmentation)
            check_confidence(answer, 0.9)


async def test_sync_client_and_labels_only_models(target: str) -> None:
    def run() -> None:
        with SegserveClient(target, timeout_s=30) as client:
            result = client.segment(soft_png(), MODEL, encodings="png", include_confidence=True)
            check_confidence(result, 0.5)
            assert client.get_model(MODEL).has_confidence
            with pytest.raises(SegserveError) as err:
                client.segment(soft_png(), "colour", include_confidence=True)
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "confidence unavailable" in str(err.value)
            # Without confidence the labels-only model answers as ever.
            assert client.segment(soft_png(), "colour").scores is None
            for bad in (0.0, 1.5, -0.1):
                with pytest.raises(ValueError, match="confidence threshold"):
                    client.segment(soft_png(), MODEL, include_confidence=True,
                                   confidence_threshold=bad)  # fmt: skip

    await asyncio.to_thread(run)

    async with AsyncSegserveClient(target, timeout_s=30) as client:
        with pytest.raises(SegserveError) as err:
            await client.segment(soft_png(), "colour", include_confidence=True)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        # A stream to a labels-only model: every frame answers FAILED_PRECONDITION.
        answers = [
            answer
            async for _, answer in client.stream(
                [(1, soft_image())], "colour", include_confidence=True
            )
        ]
        assert len(answers) == 1 and isinstance(answers[0], FrameFailed)
        assert answers[0].code == grpc.StatusCode.FAILED_PRECONDITION


async def reference(target: str, png: bytes) -> Segmentation:
    """What the tools should score: the same image, asked for with confidence."""
    async with AsyncSegserveClient(target, timeout_s=30) as client:
        return await client.segment(png, MODEL, encodings="raw", include_confidence=True)


async def test_labelstudio_backend_scores_are_class_confidence(target: str) -> None:
    png = soft_png(60, 80)
    expected = await reference(target, png)
    assert expected.scores is not None
    names = {c.class_id: c.name for c in expected.classes}
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    config = BackendConfig(server=target, model=MODEL)
    async with serving(labelstudio_app(config)) as backend, httpx.AsyncClient() as http:
        answer = await http.post(
            f"{backend}/predict",
            json={"tasks": [{"id": 1, "data": {"image": data_uri}}], "label_config": LABEL_CONFIG},
        )
    assert answer.status_code == 200
    (prediction,) = answer.json()["results"]
    assert "error" not in prediction, prediction.get("error")
    assert prediction["score"] == pytest.approx(expected.scores.mean_confidence, abs=1e-6)
    by_label = {item["value"]["brushlabels"][0]: item["score"] for item in prediction["result"]}
    assert by_label == pytest.approx(
        {names[c]: mean for c, mean in expected.class_confidence.items()}, abs=1e-6
    )
    # Real probabilities, not the boundary stand-in: the classes are not all equally sure.
    assert len(set(by_label.values())) > 1


async def test_cvat_detector_confidence_and_threshold(target: str) -> None:
    png = soft_png(60, 80)
    expected = await reference(target, png)
    names = {c.class_id: c.name for c in expected.classes}
    by_name = {names[c]: mean for c, mean in expected.class_confidence.items()}
    means = sorted(by_name.values())
    assert means[0] < means[-1]
    cut = (means[0] + means[-1]) / 2
    kept = {name for name, mean in by_name.items() if mean >= cut}
    assert kept and kept != set(by_name)
    image = base64.b64encode(png).decode()
    config = FunctionConfig(target, MODEL)
    async with serving(create_app(config)) as function, httpx.AsyncClient() as http:
        everything = (await http.post(f"{function}/", json={"image": image})).json()
        zero = (await http.post(f"{function}/", json={"image": image, "threshold": 0})).json()
        some = (await http.post(f"{function}/", json={"image": image, "threshold": cut})).json()
    assert everything == zero
    assert {s["label"]: s["confidence"] for s in everything} == pytest.approx(by_name, abs=1e-6)
    assert {s["label"] for s in some} == kept
    assert all(s["confidence"] >= cut for s in some)

    def sync() -> None:
        function = SyncCvatFunction(config)
        try:
            answer = function.detect({"image": image, "threshold": cut})
        finally:
            function.close()
        assert {s["label"]: s["confidence"] for s in answer} == pytest.approx(
            {name: by_name[name] for name in kept}, abs=1e-6
        )

    await asyncio.to_thread(sync)


async def test_cvat_detector_without_confidence_keeps_the_stand_in(target: str) -> None:
    """A labels-only model: the boundary stand-in, and the threshold is not applied."""
    image = base64.b64encode(encode(quadrant_image(60, 80))).decode()

    def sync() -> list[dict[str, Any]]:
        function = SyncCvatFunction(FunctionConfig(target, "colour"))
        try:
            return function.detect({"image": image, "threshold": 0.99})
        finally:
            function.close()

    answer = await asyncio.to_thread(sync)
    assert {s["label"] for s in answer} == {"red", "green", "blue", "bright"}
    for shape in answer:
        assert 0.0 < shape["confidence"] < 0.99


async def test_prefill_scores_are_class_confidence(target: str, tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    folder = tmp_path / "images"
    folder.mkdir()
    pngs = {"a.png": soft_png(), "b.png": encode(soft_image()[:, ::-1].copy())}
    for name, data in pngs.items():
        (folder / name).write_bytes(data)
    expected = {name: await reference(target, data) for name, data in pngs.items()}

    out = tmp_path / "tasks.json"
    argv = ["prefill", str(folder), "-m", MODEL, "--format", "labelstudio", "-o", str(out),
            "--server", target]  # fmt: skip
    assert await asyncio.to_thread(client_main, argv) == 0
    tasks = json.loads(out.read_text())
    assert len(tasks) == 2
    for task, name in zip(tasks, sorted(pngs), strict=True):
        result = expected[name]
        assert result.scores is not None
        names = {c.class_id: c.name for c in result.classes}
        (prediction,) = task["predictions"]
        assert prediction["score"] == pytest.approx(result.scores.mean_confidence, abs=1e-6)
        assert prediction["score"] != 1.0
        items = {item["value"]["brushlabels"][0]: item["score"] for item in prediction["result"]}
        assert items == pytest.approx(
            {names[c]: m for c, m in result.class_confidence.items()}, abs=1e-6
        )

    coco_out = tmp_path / "coco.json"
    argv = ["prefill", str(folder), "-m", MODEL, "--format", "coco", "-o", str(coco_out),
            "--server", target]  # fmt: skip
    assert await asyncio.to_thread(client_main, argv) == 0
    coco = COCO(str(coco_out))
    for image in coco.dataset["images"]:
        result = expected[image["file_name"]]
        scores = {
            a["category_id"]: a["score"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        }
        assert scores == pytest.approx(result.class_confidence, abs=1e-6)


async def test_prefill_without_confidence_keeps_the_stand_in(target: str, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(quadrant_image()))
    out = tmp_path / "tasks.json"
    argv = ["prefill", str(folder), "-m", "colour", "--format", "labelstudio", "-o", str(out),
            "--server", target]  # fmt: skip
    assert await asyncio.to_thread(client_main, argv) == 0
    (task,) = json.loads(out.read_text())
    (prediction,) = task["predictions"]
    assert prediction["score"] == 1.0
    assert all("score" not in item for item in prediction["result"])
