"""`segserve eval`: the metric arithmetic, data set layouts, exact scores on a hand-labelled set,
and serving parity on CamVid: through a real server on loopback and offline, the same numbers."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from segserve_server import cli
from segserve_server.server import Server
from segserve_server.training.evaluate import (
    EvalError,
    Scores,
    confusion_matrix,
    evaluate_offline,
    evaluate_server,
    list_samples,
    resolve_dataset,
)
from tests.conftest import CAMVID, ROOT, H, W, encode, make_settings, quadrant_image
from tests.harness.synthetic_models import expected_colour_labels

# --------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------


def test_scores_of_a_hand_made_confusion_matrix():
    # rows: ground truth, columns: prediction. Class 3 is in neither: its IoU is undefined.
    conf = np.array([[3, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    scores = Scores.from_confusion(conf)
    # IoU = tp / (row + column - tp): 3/(4+4-3), 2/(2+3-2), 0/(1+0-0)
    np.testing.assert_allclose(scores.iou[:3], [3 / 5, 2 / 3, 0.0])
    assert math.isnan(scores.iou[3])
    assert scores.miou == pytest.approx((3 / 5 + 2 / 3 + 0) / 3)
    assert scores.pixel_accuracy == pytest.approx(5 / 7)
    assert scores.mean_class_accuracy == pytest.approx((3 / 4 + 1 + 0) / 3)


def test_confusion_matrix_skips_void_labels():
    pred = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    label = np.array([[0, 1, 11], [255, 2, 0]], dtype=np.uint8)
    expected = np.zeros((3, 3), dtype=np.int64)
    expected[0, 0], expected[1, 1], expected[2, 1] = 2, 1, 1
    np.testing.assert_array_equal(confusion_matrix(pred, label, 3), expected)


# --------------------------------------------------------------------------------------------
# A small hand-labelled set for the colour model, whose answers are known
# --------------------------------------------------------------------------------------------


def _write_label(path: Path, label: np.ndarray) -> None:
    assert cv2.imwrite(str(path), label)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """root/val + root/valannot: three frames with labels that partly disagree with the model.

    Returns the root and the confusion matrix the colour model must produce on it.
    """
    root = tmp_path_factory.mktemp("labelled")
    (root / "val").mkdir()
    (root / "valannot").mkdir()
    expected = np.zeros((5, 5), dtype=np.int64)
    rng = np.random.default_rng(7)
    for i in range(3):
        image = quadrant_image()
        image[rng.integers(0, H - 8) :, :5] = (0, 0, 0)  # a dark strip (class 0)
        predicted = expected_colour_labels(image)
        label = predicted.copy()
        label[:6, :6] = (i + 2) % 5  # mislabelled block
        label[-4:, -10:] = 11  # CamVid void
        label[20:22, :] = 255  # other ids beyond the classes: void too
        if i == 2:  # a frame at twice the model size: resized in, mask resized back
            image = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)
            predicted = np.repeat(np.repeat(predicted, 2, axis=0), 2, axis=1)
            label = np.repeat(np.repeat(label, 2, axis=0), 2, axis=1)
        (root / "val" / f"frame_{i}.png").write_bytes(encode(image))
        _write_label(root / "valannot" / f"frame_{i}.png", label)
        expected += confusion_matrix(predicted, label, 5)
    assert expected.trace() < expected.sum()  # some pixels are wrong on purpose
    return root, expected


def test_dataset_layouts(dataset, tmp_path: Path):
    root, _ = dataset
    val, annot = root / "val", root / "valannot"
    assert resolve_dataset(val) == (val, annot)  # the split's image folder: <dir>annot inferred
    assert resolve_dataset(root) == (val, annot)  # a CamVid-style root: val by default
    assert resolve_dataset(root, "val", "valannot") == (val, annot)
    assert resolve_dataset(val, labels_dir=str(annot)) == (val, annot)
    assert resolve_dataset(val, labels_dir="valannot") == (val, annot)  # relative to the parent
    assert [s.image.name for s in list_samples(val, annot, limit=2)] == [
        "frame_0.png",
        "frame_1.png",
    ]
    with pytest.raises(EvalError, match="label folder"):
        resolve_dataset(val, labels_dir="nowhere")
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(encode(quadrant_image()))
    with pytest.raises(EvalError, match="1 of 1 images have no label"):
        list_samples(tmp_path / "images", tmp_path / "labels")
    _write_label(tmp_path / "labels" / "a.png", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(EvalError, match="single-channel"):
        from segserve_server.training.evaluate import read_label

        read_label(tmp_path / "labels" / "a.png")


async def test_exact_scores_through_server_and_offline(dataset, server, repository):
    root, expected = dataset
    samples = list_samples(*resolve_dataset(root / "val"))
    online = await evaluate_server(samples, "colour", f"127.0.0.1:{server.port}", concurrency=3)
    offline = await asyncio.to_thread(evaluate_offline, samples, "colour", repository, threads=1)
    for result in (online, offline):
        np.testing.assert_array_equal(result.confusion, expected)
        assert result.frames == 3 and result.model_version == 1
        assert result.class_names == ["dark", "red", "green", "blue", "bright"]
    assert online.ignored_pixels == offline.ignored_pixels > 0


async def test_cli_json_and_errors(dataset, server, tmp_path: Path, capsys):
    root, expected = dataset
    out = tmp_path / "eval.json"
    target = f"127.0.0.1:{server.port}"
    argv = ["eval", str(root / "val"), "--model", "colour", "--server", target]
    rc = await asyncio.to_thread(cli.main, [*argv, "--json", str(out), "--no-progress"])
    assert rc == 0
    numbers = json.loads(out.read_text())
    assert numbers["confusion_matrix"] == expected.tolist()
    assert numbers["mode"] == "server" and numbers["frames"] == 3
    assert numbers["miou"] == pytest.approx(Scores.from_confusion(expected).miou, abs=1e-6)
    assert set(numbers["iou"]) == {"dark", "red", "green", "blue", "bright"}
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "pixel accuracy" in printed
    rc = await asyncio.to_thread(
        cli.main, ["eval", str(root), "--model", "nope", "--server", target]
    )
    assert rc == 2
    assert "model 'nope'" in capsys.readouterr().err


def test_offline_cli_never_imports_torch(dataset, repository, tmp_path: Path):
    root, expected = dataset
    out = tmp_path / "offline.json"
    script = (
        "import sys\n"
        "from segserve_server import cli\n"
        "import segserve_server.server\n"
        f"rc = cli.main(['eval', {str(root)!r}, '--model', 'colour', '--offline', "
        f"'--model-repository', {str(repository)!r}, '--json', {str(out)!r}, '--no-progress', "
        "'--threads', '1'])\n"
        "assert 'torch' not in sys.modules, 'segserve eval / serve imported torch'\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["confusion_matrix"] == expected.tolist()


# --------------------------------------------------------------------------------------------
# Serving parity on real CamVid frames
# --------------------------------------------------------------------------------------------


async def test_serving_parity_on_camvid(tmp_path: Path):
    if not (CAMVID / "val").is_dir() or not (CAMVID / "valannot").is_dir():
        pytest.skip(f"CamVid val not found at {CAMVID} (set SEGSERVE_CAMVID)")
    bundled = ROOT / "model_repository"
    name = (
        "deeplabv3plus_camvid"
        if (bundled / "deeplabv3plus_camvid").is_dir()
        else "synthetic_colour_classes"  # CamVid ids beyond its 5 classes are void then
    )
    repository = tmp_path / "repository"
    repository.mkdir()
    (repository / name).symlink_to(bundled / name, target_is_directory=True)
    samples = list_samples(*resolve_dataset(CAMVID / "val"), limit=6)

    server = Server(make_settings(repository))
    await server.start()
    try:
        online = await evaluate_server(samples, name, f"127.0.0.1:{server.port}", concurrency=3)
    finally:
        await server.stop(timeout_s=5)
    offline = await asyncio.to_thread(evaluate_offline, samples, name, repository, threads=1)

    assert online.frames == offline.frames == 6
    assert online.confusion.sum() == offline.confusion.sum() > 0
    # Same stages, same model: the masks match pixel for pixel, so the confusion matrices are
    # identical (what the README claims), not merely close.
    differing = int(np.abs(online.confusion - offline.confusion).sum() // 2)
    assert np.array_equal(online.confusion, offline.confusion), (
        f"{differing} of {int(online.confusion.sum())} labelled pixels classified differently"
    )
    assert online.scores.miou == offline.scores.miou
