"""segserve-client diff on synthetic masks: IoU and boundary F of known shapes, folder matching
by stem, every import format read back, the annotators' wording and the disagreement image."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from segserve_client.cli import main as client_main
from segserve_client.diff import boundary, disagreement_image, score_pair
from segserve_client.exports import ImageRecord, write_export
from segserve_client.formats.coco import coco_rle
from segserve_client.formats.cvat import cvat_mask
from segserve_client.formats.labelstudio import labelstudio_rle
from segserve_client.masks import encode_png
from segserve_client.overlay import color_table

NAMES = ["background", "road", "car"]


def square(offset_x: int = 0, size: int = 20) -> np.ndarray:
    labels = np.zeros((size, size), dtype=np.uint8)
    labels[5:15, 5 + offset_x : 15 + offset_x] = 1
    return labels


def test_iou_and_boundary_f_of_a_shifted_square() -> None:
    gt, pred = square(), square(1)
    score = score_pair(pred, gt, tolerance=2)
    road = score.classes[1]
    assert (road.intersection, road.union) == (90, 110)
    assert road.iou == pytest.approx(90 / 110)
    assert road.boundary_f == 1.0  # a 1 px shift is within 2 px
    assert score.classes[0].iou == pytest.approx(290 / 310)
    assert (score.changed, score.pixels) == (20, 400)
    assert score.mean_iou == pytest.approx((90 / 110 + 290 / 310) / 2)
    # At 0 px only the shared top and bottom edges (9 + 9 of 36 boundary pixels) match.
    assert score_pair(pred, gt, tolerance=0).classes[1].boundary_f == pytest.approx(0.5)
    # 3 px off at tolerance 2: the left and right edges no longer match, top and bottom do.
    far = score_pair(square(3), gt, tolerance=2).classes[1]
    assert 0.0 < far.boundary_f < 1.0


def test_boundary_ignores_the_image_edge_and_missing_classes_score_zero() -> None:
    full = np.ones((6, 6), dtype=bool)
    assert not boundary(full).any()
    assert int(boundary(square() == 1).sum()) == 36
    gt = square()
    pred = gt.copy()
    pred[0, 0] = 2  # a class only the prediction has
    car = score_pair(pred, gt).classes[2]
    assert car.iou == 0.0 and car.boundary_f == 0.0


def test_disagreement_image_pixels() -> None:
    gt, pred = square(), square(1)
    colors = color_table()
    image = disagreement_image(pred, gt, colors)
    grey_road = int(colors[1].astype(int).mean() * 0.4)
    assert tuple(image[10, 10]) == (grey_road,) * 3  # both road: dimmed grey
    assert tuple(image[0, 0]) == (0, 0, 0)  # both background (black, dimmed)
    assert tuple(image[10, 15]) == tuple(colors[1])  # predicted road over background
    assert tuple(image[10, 5]) == (255, 0, 255)  # predicted background (black): magenta


def write_pngs(folder: Path, maps: dict[str, np.ndarray]) -> None:
    folder.mkdir()
    for stem, labels in maps.items():
        (folder / f"{stem}.png").write_bytes(encode_png(labels))


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = client_main(argv)
    return rc, capsys.readouterr().out


def test_folders_matched_by_stem_with_images(tmp_path: Path, capsys) -> None:
    write_pngs(tmp_path / "pred", {"a": square(1), "b": square(), "only_pred": square()})
    write_pngs(tmp_path / "gt", {"a": square(), "b": square()})
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES) + "\n")
    out = tmp_path / "diffs"
    argv = ["diff", str(tmp_path / "pred"), str(tmp_path / "gt"), "--classes", str(names)]
    rc, text = run([*argv, "--json", "-o", str(out)], capsys)
    assert rc == 0
    report = json.loads(text)
    assert report["mode"] == "prediction" and report["unmatched"] == ["only_pred"]
    assert sorted(report["pairs"]) == ["a", "b"]
    assert report["pairs"]["b"]["changed_pixels"] == 0 and report["pairs"]["b"]["mean_iou"] == 1
    total = report["total"]
    assert (total["changed_pixels"], total["pixels"]) == (20, 800)
    road = next(c for c in total["classes"] if c["class_id"] == 1)
    assert road["name"] == "road" and (road["intersection"], road["union"]) == (190, 210)
    bgr = cv2.imread(str(out / "a.png"))
    assert bgr is not None
    written = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(written, disagreement_image(square(1), square(), color_table()))
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]

    rc, text = run(argv, capsys)
    assert "prediction vs ground truth" in text and "changed pixels: 20 (2.50%)" in text
    assert "annotator" not in text
    rc, text = run([*argv, "--annotators"], capsys)
    assert rc == 0
    assert "agreement between the annotators over 2 image(s)" in text
    assert "pixels the annotators label differently: 20 (2.50%)" in text
    assert "road" in text and "agreement (IoU)" in text


def records(maps: dict[str, np.ndarray]) -> list[ImageRecord]:
    out = []
    for stem, labels in maps.items():
        annotations = []
        for cid in np.unique(labels).tolist():
            mask = labels == cid
            annotations.append(
                {
                    "class_id": cid,
                    "name": NAMES[cid],
                    "area": int(mask.sum()),
                    "bbox": [0, 0, 1, 1],
                    "coco_rle_counts": coco_rle(mask)["counts"],
                    "cvat_mask": cvat_mask(mask),
                    "label_studio_rle": labelstudio_rle(mask),
                }
            )
        h, w = labels.shape
        out.append({"file": f"{stem}.jpg", "width": w, "height": h, "annotations": annotations})
    return out


@pytest.mark.parametrize("fmt,name", [("coco", "p.json"), ("labelstudio", "p.json"),
                                      ("cvat", "p.xml"), ("cvat", "p.zip")])  # fmt: skip
def test_every_import_format_is_read_back(tmp_path: Path, capsys, fmt: str, name: str) -> None:
    maps = {"a": square(1), "b": square()}
    maps["b"][0:3, 0:3] = 2
    classes = [(i, n, (i * 50, 0, 0)) for i, n in enumerate(NAMES)]
    write_export(tmp_path / name, fmt, records(maps), classes, model_version="m v1")
    write_pngs(tmp_path / "gt", maps)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES))
    rc, text = run(
        ["diff", str(tmp_path / name), str(tmp_path / "gt"), "--classes", str(names), "--json"],
        capsys,
    )
    assert rc == 0
    report = json.loads(text)
    assert sorted(report["pairs"]) == ["a", "b"] and report["unmatched"] == []
    assert report["total"]["changed_pixels"] == 0 and report["total"]["mean_iou"] == 1.0


def test_no_shared_stem_is_a_usage_error(tmp_path: Path, capsys) -> None:
    write_pngs(tmp_path / "pred", {"a": square()})
    write_pngs(tmp_path / "gt", {"b": square()})
    assert client_main(["diff", str(tmp_path / "pred"), str(tmp_path / "gt")]) == 2
    assert "share a file stem" in capsys.readouterr().err
