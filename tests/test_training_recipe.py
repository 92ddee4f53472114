"""The training recipe features: rare-class crops, photometric extras, OHEM / Lovász / dice terms,
train+val final runs, resumable checkpoints that refuse another recipe, and the stage-1 choice.

The training runs are real `segserve train` runs (in-process) on a tiny CamVid-layout data set of
real PNG files written to tmp_path: a few 48x64 frames, 2 steps an epoch, well under a second.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("torch")

import torch
import torch.nn.functional as F

from segserve_server.training import data, recipe, train
from segserve_server.training.losses import (
    SegLoss,
    dice_loss,
    lovasz_softmax,
    ohem_cross_entropy,
    ohem_kept,
)
from segserve_server.training.photometric import extra_photometric, hue_matrix
from segserve_server.training.sampling import crop_origin, rare_centre
from tests.conftest import ROOT

POLE, ROAD, FENCE = (data.CLASS_NAMES.index(n) for n in ("Pole", "Road", "Fence"))


# --- rare-class crops ---------------------------------------------------------------------------


def pole_map(rng: np.random.Generator, height: int = 180, width: int = 240) -> np.ndarray:
    """Road everywhere but a 4x4 Pole patch at a random place."""
    label = np.full((height, width), ROAD, dtype=np.uint8)
    y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
    label[y : y + 4, x : x + 4] = POLE
    return label


def crop_hits(rare_p: float, draws: int = 300) -> float:
    rng = np.random.default_rng(1)
    weights = recipe.parse_class_weights(recipe.RARE_CLASSES)
    hits = 0
    for _ in range(draws):
        label = pole_map(rng)
        y, x = crop_origin(label, (32, 48), rng, rare_p, weights)
        hits += bool((label[y : y + 32, x : x + 48] == POLE).any())
    return hits / draws


def test_rare_crops_hold_the_rare_class_far_more_often_than_uniform_crops():
    uniform, half, rare = crop_hits(0.0), crop_hits(0.5), crop_hits(1.0)
    # A uniform 32x48 crop of 180x240 meets a 4x4 patch with probability ~ 36*52/(149*193) = 6.5 %.
    assert uniform < 0.15
    assert rare == 1.0  # centred on a Pole pixel, clamped inside the map: always holds it
    assert 0.35 < half < 0.75


def test_rare_crops_draw_only_present_classes_with_positive_weight():
    label = np.full((60, 80), ROAD, dtype=np.uint8)
    label[10:12, 10:12] = POLE
    label[40:42, 60:62] = FENCE
    rng = np.random.default_rng(0)
    weights = recipe.parse_class_weights("Pole:1,Fence:0")
    centres = {rare_centre(label, weights, rng) for _ in range(50)}
    assert centres <= {(10, 10), (10, 11), (11, 10), (11, 11)} and centres
    assert rare_centre(np.full((8, 8), ROAD, np.uint8), weights, rng) is None  # falls back


def test_crops_without_the_option_are_the_original_ones():
    label = np.zeros((90, 120), dtype=np.uint8)
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(20):
        y, x = crop_origin(label, (32, 48), a)
        assert (y, x) == (int(b.integers(0, 90 - 32 + 1)), int(b.integers(0, 120 - 48 + 1)))


def test_augment_centres_its_crops_on_rare_classes():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (180, 240, 3), dtype=np.uint8)
    weights = recipe.parse_class_weights(recipe.RARE_CLASSES)
    augment = data.Augment(crop=(32, 48), scale=(0.8, 1.2), rare_p=1.0, rare_weights=weights)
    for _ in range(20):
        x, lab = augment(image, pole_map(rng), rng)
        assert x.shape == (3, 32, 48) and (lab == POLE).any()


def test_rare_class_weights_name_the_bad_value():
    assert recipe.parse_class_weights("Pole:2,Bicyclist")[POLE] == 2.0
    with pytest.raises(ValueError, match="'Lamp'"):
        recipe.parse_class_weights("Lamp:1")
    with pytest.raises(ValueError, match="'x'"):
        recipe.parse_class_weights("Pole:x")


# --- photometric extras -------------------------------------------------------------------------


def test_hue_rotation_keeps_greys_and_turns_full_circle():
    grey = np.full((4, 4, 3), 117.0, dtype=np.float32)
    np.testing.assert_allclose(grey @ hue_matrix(73.0).T, grey, atol=1e-3)
    np.testing.assert_allclose(hue_matrix(360.0), np.eye(3), atol=1e-5)
    red = np.array([200.0, 30.0, 30.0], dtype=np.float32)
    assert np.argmax(hue_matrix(120.0) @ red) != 0  # red is no longer red


def test_photometric_extras_off_change_nothing_and_draw_nothing():
    img = np.random.default_rng(0).uniform(0, 255, (8, 8, 3)).astype(np.float32)
    rng = np.random.default_rng(3)
    assert extra_photometric(img, rng) is img
    assert rng.random() == np.random.default_rng(3).random()
    out = extra_photometric(img, rng, hue_deg=20, blur_p=1.0, noise=8.0)
    assert out.shape == img.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 255.0 and not np.allclose(out, img)


# --- loss terms ---------------------------------------------------------------------------------


def confident(labels: torch.Tensor, classes: int = 4) -> torch.Tensor:
    """Logits that predict ``labels`` with probability ~1."""
    return 40.0 * F.one_hot(labels, classes).permute(0, 3, 1, 2).float()


def test_lovasz_and_dice_of_perfect_predictions_are_zero():
    labels = torch.randint(0, 4, (2, 6, 7), generator=torch.Generator().manual_seed(0))
    logits = confident(labels)
    assert lovasz_softmax(logits, labels).item() < 1e-6
    assert dice_loss(logits, labels, eps=0.0).item() < 1e-6


def test_lovasz_at_hard_predictions_is_one_minus_iou():
    """On one-hot predictions the Lovász extension is exact: mean over present classes of 1-IoU."""
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (2, 8, 9), generator=g)
    labels[0, 0, :4] = 5  # void, ignored
    pred = torch.randint(0, 4, (2, 8, 9), generator=g)
    valid = labels != 5
    expected = []
    for c in range(4):
        truth, guess = (labels == c) & valid, (pred == c) & valid
        if truth.any():
            inter, union = (truth & guess).sum().item(), (truth | guess).sum().item()
            expected.append(1.0 - inter / union)
    loss = lovasz_softmax(confident(pred), labels, ignore_index=5)
    assert loss.item() == pytest.approx(float(np.mean(expected)), abs=1e-5)
    wrong = lovasz_softmax(confident((labels.clamp(max=3) + 1) % 4), labels, ignore_index=5)
    assert wrong.item() == pytest.approx(1.0, abs=1e-5)


def test_lovasz_on_a_pixel_subsample_is_close_and_reproducible():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 4, (2, 40, 50), generator=g)
    logits = torch.randn(2, 4, 40, 50, generator=g)
    full = lovasz_softmax(logits, labels).item()
    torch.manual_seed(0)
    a = lovasz_softmax(logits, labels, max_pixels=1000).item()
    torch.manual_seed(0)
    assert lovasz_softmax(logits, labels, max_pixels=1000).item() == a
    assert a == pytest.approx(full, rel=0.1)


def test_ohem_keeps_exactly_k_hardest_pixels():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (2, 10, 10), generator=g)
    labels[:, 0] = 9  # 20 void pixels: 180 valid
    logits = torch.randn(2, 4, 10, 10, generator=g, requires_grad=True)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5])
    k = ohem_kept(180, 0.1)
    assert k == 18 and ohem_kept(180, 0.1, min_kept=50) == 50 and ohem_kept(10, 0.5, 50) == 10
    loss = ohem_cross_entropy(logits, labels, weight, ignore_index=9, keep=0.1)
    per_pixel = F.cross_entropy(logits, labels, weight, ignore_index=9, reduction="none")
    hardest = per_pixel[labels != 9].sort(descending=True).values[:k]
    assert loss.item() == pytest.approx(hardest.mean().item(), rel=1e-6)
    loss.backward()
    assert logits.grad is not None
    touched = (logits.grad.abs().sum(1) > 0).sum().item()
    assert touched == k  # only the kept pixels get a gradient
    plain = ohem_cross_entropy(logits, labels, weight, ignore_index=9, keep=1.0)
    assert plain.item() == pytest.approx(
        F.cross_entropy(logits, labels, weight, ignore_index=9).item()
    )
    with pytest.raises(ValueError, match=r"1\.5"):
        ohem_kept(10, 1.5)


def test_void_pixels_take_no_part_in_the_loss():
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 4, (1, 6, 6), generator=g)
    labels[0, :2] = 11
    logits = torch.randn(1, 4, 6, 6, generator=g)
    other = logits.clone()
    other[:, :, :2] = 100 * torch.randn(1, 4, 2, 6, generator=g)
    loss = SegLoss(None, 11, ohem_keep=0.5, lovasz_weight=0.7, dice_weight=0.3, lovasz_pixels=0)
    assert loss(logits, labels).item() == pytest.approx(loss(other, labels).item(), rel=1e-6)


def fake_run(root: Path, epochs: int, mious: list[float]) -> Path:
    root.mkdir()
    (root / "run.json").write_text(json.dumps({"args": {"epochs": epochs}}))
    lines = [json.dumps({"epoch": i + 1, "val_miou": m}) for i, m in enumerate(mious)]
    (root / "log.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_the_best_run_is_the_finished_one_with_the_highest_val_miou(tmp_path, capsys):
    a = fake_run(tmp_path / "a", 3, [0.2, 0.5, 0.4])
    b = fake_run(tmp_path / "b", 2, [0.3, 0.45])
    c = fake_run(tmp_path / "c", 3, [0.1, 0.55])  # unfinished
    assert recipe.best_run([a, b]) == (a, 0.5) and recipe.best_run([b]) == (b, 0.45)
    assert recipe.main(["best", str(b), str(a)]) == 0
    assert capsys.readouterr().out.strip() == str(a)
    with pytest.raises(RuntimeError, match="unfinished"):
        recipe.best_run([a, c])


# --- training runs ------------------------------------------------------------------------------


def write_split(root: Path, split: str, frames: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True)
    (root / f"{split}annot").mkdir()
    for i in range(frames):
        label = rng.integers(0, data.NUM_CLASSES, (6, 8)).repeat(8, 0).repeat(8, 1)
        label[:4, :4] = data.IGNORE_INDEX
        colours = np.array((*data.CLASS_COLORS, (0, 0, 0)), dtype=np.int16)[label]
        noise = rng.integers(-20, 20, colours.shape)
        bgr = np.clip(colours + noise, 0, 255).astype(np.uint8)[..., ::-1]
        assert cv2.imwrite(str(root / split / f"f{seed}_{i:03d}.png"), bgr)
        assert cv2.imwrite(
            str(root / f"{split}annot" / f"f{seed}_{i:03d}.png"), label.astype(np.uint8)
        )


@pytest.fixture(scope="module")
def tiny_camvid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("camvid")
    write_split(root, "train", 4, seed=1)
    write_split(root, "val", 2, seed=2)
    return root


# Every recipe feature on, so resuming must restore each random stream they draw from.
RECIPE = [
    "--model",
    "deeplabv3plus",
    "--batch-size",
    "2",
    "--crop",
    "32",
    "48",
    "--size",
    "48",
    "64",
]
RECIPE += ["--warmup-epochs", "1", "--threads", "1", "--rare-crop-p", "0.5", "--hue", "10"]
RECIPE += ["--blur-p", "0.5", "--noise", "5", "--ohem-keep", "0.5", "--lovasz-weight", "0.5"]
RECIPE += ["--lovasz-pixels", "500", "--dice-weight", "0.2"]


def run(data_root: Path, out: Path, *extra: str) -> int:
    return train.main(["--data", str(data_root), "--out", str(out), *RECIPE, *extra])


def weights_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]


def test_interrupted_and_resumed_elsewhere_gives_the_same_weights(tiny_camvid, tmp_path):
    assert run(tiny_camvid, tmp_path / "straight", "--epochs", "2") == 0
    assert run(tiny_camvid, tmp_path / "cut", "--epochs", "2", "--stop-after", "1") == 0
    assert json.loads((tmp_path / "cut" / "log.jsonl").read_text())["epoch"] == 1
    # "Another machine": the checkpoint folder and the data both somewhere else.
    moved_data, moved_out = tmp_path / "elsewhere" / "camvid", tmp_path / "elsewhere" / "run"
    shutil.copytree(tiny_camvid, moved_data)
    shutil.copytree(tmp_path / "cut", moved_out)
    assert run(moved_data, moved_out, "--epochs", "2", "--resume") == 0
    a, b = weights_of(tmp_path / "straight" / "last.pt"), weights_of(moved_out / "last.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit for bit: every RNG state restored
    straight = [
        json.loads(x) for x in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()
    ]
    resumed = [json.loads(x) for x in (moved_out / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in straight] == [r["loss"] for r in resumed]
    checkpoint = torch.load(moved_out / "last.pt", weights_only=False)
    assert checkpoint["recipe"]["lovasz_weight"] == 0.5 and "out" not in checkpoint["recipe"]
    assert checkpoint["args"]["stop_after"] == 0 and checkpoint["selection"] == "best val mIoU"


def test_resume_refuses_another_recipe_naming_the_difference(tiny_camvid, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_camvid, out, "--epochs", "2", "--stop-after", "1") == 0
    before = (out / "last.pt").read_bytes()
    assert run(tiny_camvid, out, "--epochs", "2", "--resume", "--lr", "1e-3") == 2
    assert "lr: checkpoint 0.002, now 0.001" in capsys.readouterr().err
    assert run(tiny_camvid, out, "--epochs", "3", "--resume", "--ohem-keep", "1") == 2
    err = capsys.readouterr().err
    assert "epochs: checkpoint 2, now 3" in err and "ohem_keep: checkpoint 0.5, now 1.0" in err
    label = next((tiny_camvid / "trainannot").glob("*.png"))
    original = label.read_bytes()
    assert cv2.imwrite(str(label), np.zeros((48, 64), np.uint8))  # other data, same names
    try:
        assert run(tiny_camvid, out, "--epochs", "2", "--resume") == 2
        assert "data: checkpoint" in capsys.readouterr().err
    finally:
        label.write_bytes(original)
    assert (out / "last.pt").read_bytes() == before  # nothing overwritten
    operational = ["--threads", "2", "--stop-after", "1", "--eval-every", "3"]
    assert run(tiny_camvid, out, "--epochs", "2", "--resume", *operational) == 0


def test_train_plus_val_trains_a_fixed_schedule_without_val_selection(
    tiny_camvid, tmp_path, capsys
):
    out = tmp_path / "final"
    assert run(tiny_camvid, out, "--epochs", "2", "--train-splits", "train,val") == 0
    printed = capsys.readouterr().out
    assert "no val selection" in printed and "6 train (train+val) / 0 val" in printed
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and not any("val_miou" in r for r in records)
    assert not (out / "best.pt").exists()
    final = torch.load(out / "final.pt", weights_only=False)
    assert final["epoch"] == 2 and final["train_splits"] == ["train", "val"]
    assert final["selection"].startswith("last epoch") and "val_miou" not in final
    assert final["data_fingerprint"]["val"]["frames"] == 2
    last = weights_of(out / "last.pt")
    assert all(torch.equal(last[k], final["model"][k]) for k in last)
    assert torch.load(out / "last.pt", weights_only=False)["best_miou"] is None
    assert data.load_splits(tiny_camvid, ("train", "val"))[0].shape == (6, 48, 64, 3)


def test_stage_two_takes_the_recipe_of_the_best_stage_one_run(tiny_camvid, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(tiny_camvid, a, "--epochs", "1") == 0
    assert run(tiny_camvid, b, "--epochs", "1", "--lr", "1e-2") == 0
    unfinished = tmp_path / "c"
    assert run(tiny_camvid, unfinished, "--epochs", "2", "--stop-after", "1") == 0
    capsys.readouterr()
    assert recipe.main(["best", str(a), str(unfinished)]) == 1
    assert "unfinished" in capsys.readouterr().err

    final = tmp_path / "final"
    argv = ["--data", str(tiny_camvid), "--out", str(final), "--threads", "1"]
    argv += ["--recipe-from", str(b / "best.pt"), "--train-splits", "train,val"]
    assert train.main(argv) == 0
    info = json.loads((final / "run.json").read_text())
    stage1 = json.loads((b / "run.json").read_text())
    assert info["recipe"] | {"train_splits": "train"} == stage1["recipe"]
    assert info["recipe"]["lr"] == 1e-2 and (final / "final.pt").exists()
    assert train.main([*argv, "--resume"]) == 0  # finished: resuming with the same flags is a no-op


@pytest.mark.slow
@pytest.mark.timeout(900)  # 11 tiny runs, each a new process, at nice 19
def test_the_bundled_recipe_script_runs_both_stages_and_resumes(tiny_camvid, tmp_path):
    """tools/train_bundled.sh end to end on the tiny set (its flags overridden by EXTRA)."""
    runs = tmp_path / "runs"
    env = dict(os.environ, DATA=str(tiny_camvid), RUNS=str(runs), PY=sys.executable, THREADS="1")
    env["EXTRA"] = "--epochs 1 --batch-size 2 --crop 32 48 --size 48 64 --warmup-epochs 1"
    script = [str(ROOT / "tools" / "train_bundled.sh")]
    one = subprocess.run(
        [*script, "run", "dl_ohem"], env=env, capture_output=True, text=True, timeout=600
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert (runs / "dl_ohem" / "best.pt").exists() and not (runs / "dl_base").exists()
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "done:" in (runs / "dl_ohem.log").read_text().rsplit("start dl_ohem", 1)[1]
    stage1 = ["dl_base", "dl_rare", "dl_lovasz", "dl_ohem", "unet_base"]
    for name in stage1:
        assert (runs / name / "best.pt").exists(), name
    for name in ("final_deeplabv3plus", "final_unet"):
        final = torch.load(runs / name / "final.pt", weights_only=False)
        assert final["train_splits"] == ["train", "val"] and final["epoch"] == 1
    dl = torch.load(runs / "final_deeplabv3plus" / "final.pt", weights_only=False)["args"]
    assert dl["model"] == "deeplabv3plus" and dl["recipe_from"].startswith(str(runs / "dl_"))
    again = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "done:" in (runs / "final_unet.log").read_text().rsplit("start final_unet", 1)[1]
    # final RUN: stage 2 from a named winner, with no other stage-1 run beside it.
    alone = tmp_path / "alone"
    shutil.copytree(runs / "dl_lovasz", alone / "dl_lovasz")
    env["RUNS"] = str(alone)
    bad = subprocess.run([*script, "final", "dl_base"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "finished stage-1 run" in bad.stderr
    final = subprocess.run([*script, "final", "dl_lovasz"], env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    args = torch.load(alone / "final_deeplabv3plus" / "final.pt", weights_only=False)["args"]
    assert args["recipe_from"] == str(alone / "dl_lovasz" / "best.pt")
    assert (args["lovasz_weight"], args["train_splits"]) == (0.5, "train,val")
    # run unet_dlrecipe: the deeplabv3plus winner's recipe on unet, the winner named by DL_WINNER.
    env["DL_WINNER"] = "dl_nowhere"
    gone = subprocess.run(
        [*script, "run", "unet_dlrecipe"], env=env, capture_output=True, text=True
    )
    assert gone.returncode == 1 and "DL_WINNER: no" in gone.stderr
    env["DL_WINNER"] = "dl_lovasz"
    unet = subprocess.run(
        [*script, "run", "unet_dlrecipe"], env=env, capture_output=True, text=True
    )
    assert unet.returncode == 0, unet.stderr[-2000:]
    args = torch.load(alone / "unet_dlrecipe" / "best.pt", weights_only=False)["args"]
    assert (args["model"], args["lovasz_weight"]) == ("unet", 0.5)
    assert args["recipe_from"] == str(alone / "dl_lovasz" / "best.pt")
