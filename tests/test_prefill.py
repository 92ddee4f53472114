"""segserve-client prefill against a real server: COCO, Label Studio and CVAT import files that
decode back to the server's label maps, per-file errors, and resuming from the state file."""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest

from segserve_client.aio import AsyncSegserveClient
from segserve_client.cli import main as client_main
from segserve_client.formats.cvat import decode_cvat_mask
from segserve_client.masks import encode_png
from segserve_client.prefill import state_path
from tests.conftest import encode, quadrant_image

CLASS_IDS = {"dark": 0, "red": 1, "green": 2, "blue": 3, "bright": 4}


@pytest.fixture(scope="module")
def target(server) -> str:
    return f"127.0.0.1:{server.port}"


def requests_ok(server) -> float:
    value = server.core.metrics.registry.get_sample_value(
        "segserve_requests_total", {"model": "colour", "code": "OK"}
    )
    return value or 0.0


def images() -> dict[str, np.ndarray]:
    """Four images with different label maps (classes 0..4)."""
    quadrants = quadrant_image()
    half = quadrants.copy()
    half[:, :20] = 0
    return {
        "a.png": quadrants,
        "b.png": quadrants[::-1].copy(),
        "c.png": quadrants[:, ::-1].copy(),
        "d.png": half,
    }


def write_folder(folder: Path, names: list[str], corrupt: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    all_images = images()
    for name in names:
        (folder / name).write_bytes(encode(all_images[name]))
    if corrupt:
        (folder / "bad.png").write_bytes(b"this is not an image")


async def server_labels(target: str, names: list[str]) -> dict[str, np.ndarray]:
    async with AsyncSegserveClient(target) as client:
        return {
            name: np.array((await client.segment(encode(images()[name]), "colour")).labels)
            for name in names
        }


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(client_main, list(argv))


async def test_coco_with_a_corrupt_image(target, tmp_path: Path, capsys) -> None:
    from pycocotools.coco import COCO

    folder, out = tmp_path / "images", tmp_path / "prefill.json"
    write_folder(folder, ["a.png", "b.png", "c.png"], corrupt=True)
    rc = await run_cli("prefill", str(folder), "-m", "colour", "--format", "coco", "-o", str(out),
                       "--server", target, "--concurrency", "2")  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 1  # the corrupt image failed, the others were written
    assert "error: bad.png:" in captured.err and "failed: bad.png" in captured.out
    assert state_path(out).is_file()  # kept for a rerun

    coco = COCO(str(out))
    expected = await server_labels(target, ["a.png", "b.png", "c.png"])
    assert sorted(i["file_name"] for i in coco.dataset["images"]) == sorted(expected)
    assert {c["id"]: c["name"] for c in coco.dataset["categories"]} == {
        v: k for k, v in CLASS_IDS.items()
    }
    for image in coco.dataset["images"]:
        assert (image["width"], image["height"]) == (64, 48)
        labels = np.zeros((48, 64), dtype=np.uint8)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])):
            mask = coco.annToMask(ann).astype(bool)
            assert ann["iscrowd"] == 0 and ann["area"] == int(mask.sum())
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(mask)
            assert (x, y, w, h) == (xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1)
            labels[mask] = ann["category_id"]
        np.testing.assert_array_equal(labels, expected[image["file_name"]])

    # COCOeval takes the file as ground truth: the same masks as detections score AP 1.
    from pycocotools.cocoeval import COCOeval

    detections = [
        {k: a[k] for k in ("image_id", "category_id", "segmentation")} | {"score": 1.0}
        for a in coco.dataset["annotations"]
    ]
    evaluation = COCOeval(coco, coco.loadRes(detections), "segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


async def test_resume_skips_finished_images(server, target, tmp_path: Path, capsys) -> None:
    folder, out = tmp_path / "images", tmp_path / "tasks.json"
    # A first run that fails on one image leaves the state of the two it finished.
    write_folder(folder, ["a.png", "b.png"], corrupt=True)
    argv = ["prefill", str(folder), "-m", "colour", "--format", "labelstudio", "-o", str(out),
            "--server", target, "--image-url-prefix", "/data/local-files/?d=imgs/",
            "--from-name", "brush", "--to-name", "img"]  # fmt: skip
    assert await run_cli(*argv) == 1
    lines = state_path(out).read_text().splitlines()
    assert sorted(json.loads(line)["file"] for line in lines) == ["a.png", "b.png"]
    # Fixed and grown: only the two new images are segmented.
    (folder / "bad.png").unlink()
    write_folder(folder, ["c.png", "d.png"])
    capsys.readouterr()
    before = requests_ok(server)
    assert await run_cli(*argv, "--json") == 0
    assert requests_ok(server) - before == 2
    summary = json.loads(capsys.readouterr().out)
    assert (summary["images"], summary["resumed"], summary["segmented"]) == (4, 2, 2)
    assert summary["failed"] == {}

    assert not state_path(out).exists()  # removed once nothing failed
    from label_studio_converter.brush import decode_rle

    tasks = json.loads(out.read_text())
    expected = await server_labels(target, ["a.png", "b.png", "c.png", "d.png"])
    assert [t["data"]["image"] for t in tasks] == [
        f"/data/local-files/?d=imgs/{n}" for n in sorted(expected)
    ]
    for task, name in zip(tasks, sorted(expected), strict=True):
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "colour v1" and "score" in prediction
        labels = np.zeros((48, 64), dtype=np.uint8)
        for item in prediction["result"]:
            assert item["type"] == "brushlabels" and item["from_name"] == "brush"
            assert item["to_name"] == "img" and item["image_rotation"] == 0
            assert (item["original_width"], item["original_height"]) == (64, 48)
            assert item["value"]["format"] == "rle"
            rgba = np.reshape(decode_rle(item["value"]["rle"]), (48, 64, 4))
            labels[rgba[..., 3] > 0] = CLASS_IDS[item["value"]["brushlabels"][0]]
        np.testing.assert_array_equal(labels, expected[name])


async def test_cvat_zip_recursive_and_diff_round_trip(target, tmp_path: Path, capsys) -> None:
    folder, out = tmp_path / "images", tmp_path / "annotations.zip"
    write_folder(folder, ["a.png"])
    write_folder(folder / "sub", ["d.png"])
    rc = await run_cli("prefill", str(folder), "-m", "colour", "--format", "cvat", "-o", str(out),
                       "--server", target, "--recursive", "--skip-class", "0")  # fmt: skip
    assert rc == 0
    with zipfile.ZipFile(out) as archive:
        assert archive.namelist() == ["annotations.xml"]
        root = ET.fromstring(archive.read("annotations.xml"))
    assert root.findtext("version") == "1.1"
    assert [e.findtext("name") for e in root.iter("label")] == ["red", "green", "blue", "bright"]
    expected = await server_labels(target, ["a.png", "d.png"])
    names = [image.get("name") for image in root.iter("image")]
    assert names == ["a.png", "sub/d.png"]
    for image in root.iter("image"):
        labels = np.zeros((48, 64), dtype=np.uint8)
        for mask in image.iter("mask"):
            assert mask.get("source") == "auto" and mask.get("label") != "dark"
            left, top = int(mask.get("left", 0)), int(mask.get("top", 0))
            width, height = int(mask.get("width", 0)), int(mask.get("height", 0))
            runs = [int(v) for v in mask.get("rle", "").split(", ")]
            assert sum(runs) == width * height
            points = [*runs, left, top, left + width - 1, top + height - 1]
            labels[decode_cvat_mask(points, 48, 64)] = CLASS_IDS[mask.get("label", "")]
        np.testing.assert_array_equal(labels, expected[Path(image.get("name", "")).name])

    # diff reads the export back: identical to the server's label maps.
    gt = tmp_path / "gt"
    gt.mkdir()
    for name, labels in expected.items():
        (gt / name).write_bytes(encode_png(labels))
    capsys.readouterr()
    assert (
        await run_cli("diff", str(out), str(gt), "-m", "colour", "--server", target, "--json") == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["total"]["changed_pixels"] == 0 and report["total"]["mean_iou"] == 1.0
    assert sorted(report["pairs"]) == ["a", "d"]


def test_defaults_and_progress_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    from segserve_client import prefill
    from segserve_client.cli import build_parser

    args = build_parser().parse_args(["prefill", "f", "-m", "m", "--format", "coco", "-o", "o"])
    # Bulk work: 4 at a time, priority 0 = the model's default level (below streams' level 1).
    assert (args.concurrency, args.priority, args.skip_class, args.iscrowd) == (4, 0, [], False)
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # not installed
    bar = prefill._progress(5, 2)
    assert isinstance(bar, prefill._LineProgress)
    bar.update(1)
    bar.close()
    assert bar.count == 3


async def test_prefill_is_bulk_traffic_behind_streams(server, target, tmp_path: Path) -> None:
    """Pre-fill requests wait on the model's default level (2, bulk), behind stream frames
    (level 1): the server's queue-wait histogram counts them there."""
    registry = server.core.metrics.registry

    def waited(level: str) -> float:
        value = registry.get_sample_value(
            "segserve_queue_wait_seconds_count", {"model": "colour", "priority": level}
        )
        return value or 0.0

    folder = tmp_path / "bulk"
    write_folder(folder, ["a.png", "b.png", "c.png"])
    before = waited("1"), waited("2")
    out = tmp_path / "bulk.json"
    code = await run_cli(
        "prefill", str(folder), "--model", "colour", "--format", "coco", "-o", str(out),
        "--server", target,
    )  # fmt: skip
    assert code == 0
    assert (waited("1"), waited("2")) == (before[0], before[1] + 3)
