"""`segserve export`: a user's torch model (module:factory + state dict) and a training checkpoint
become complete repository entries that segserve parses, loads and serves like torch computes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segserve_client import AsyncSegserveClient
from segserve_server import cli
from segserve_server.model_repository import IMAGENET_MEAN, IMAGENET_STD, scan_repository
from segserve_server.server import Server
from segserve_server.training import data as camvid
from segserve_server.training.export import MIN_AGREEMENT, check_batch
from segserve_server.training.onnx_export import check_against_torch
from tests.conftest import CAMVID, H, W, make_settings

# onnx_export uses torch's TorchScript exporter on purpose (dynamic batch axis, stable graphs).
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CLASSES = ("road", "car", "person", "sky")
COLORS = "128,64,128;64,0,128;64,64,0;128,128,128"


class TinySegmenter(nn.Module):
    """A few convolutions, stride 2 inside and bilinear back up, plus a per-pixel colour term."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(16, num_classes, 1)
        self.colour = nn.Conv2d(3, num_classes, 1)  # a full-resolution path: colour matters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.head(self.body(x))
        scores = F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return scores + self.colour(x)


def tiny_segmenter(num_classes: int = 4) -> TinySegmenter:
    """The factory that `--factory tests.test_export:tiny_segmenter` names."""
    return TinySegmenter(num_classes)


def trained_tiny() -> TinySegmenter:
    """The "trained" weights: random, but fixed, and different from a fresh factory call."""
    torch.manual_seed(1234)
    model = TinySegmenter(len(CLASSES))
    norm = model.body[3]
    assert isinstance(norm, nn.BatchNorm2d)
    assert norm.running_mean is not None and norm.running_var is not None
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    return model.eval()


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path))
    assert bgr is not None, f"cannot read {path}"
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def street_images(count: int) -> list[np.ndarray]:
    """RGB frames: CamVid val frames where present, else synthetic scenes (gradients, shapes)."""
    frames = sorted((CAMVID / "val").glob("*.png"))[:: 101 // count or 1][:count]
    if frames:
        return [read_rgb(f) for f in frames]
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        y, x = np.mgrid[0:360, 0:480]
        image = np.stack([x * 255 // 480, y * 255 // 360, (x + y) * 255 // 840], -1)
        for _ in range(6):
            x0, y0 = rng.integers(0, 400), rng.integers(0, 300)
            image[y0 : y0 + 60, x0 : x0 + 80] = rng.integers(0, 256, 3)
        images.append(image.astype(np.uint8))
    return images


def png(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def torch_labels(model: nn.Module, rgb: np.ndarray) -> np.ndarray:
    """torch's argmax for an (H, W, 3) RGB image at the model size, normalised here by hand."""
    mean = np.array(IMAGENET_MEAN, dtype=np.float32)
    std = np.array(IMAGENET_STD, dtype=np.float32)
    x = (rgb.astype(np.float32) / 255.0 - mean) / std
    with torch.no_grad():
        scores = model(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None])))
    return scores.argmax(1)[0].numpy().astype(np.uint8)


@pytest.fixture(scope="module")
def check_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("check_images")
    for i, image in enumerate(street_images(4)):
        (folder / f"frame_{i}.png").write_bytes(png(image))
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, check_dir: Path) -> Path:
    """`segserve export --factory ...` of the tiny model into a fresh repository."""
    root = tmp_path_factory.mktemp("export")
    weights = root / "tiny.pt"
    torch.save(trained_tiny().state_dict(), weights)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    repository = root / "repository"
    argv = [
        "export",
        "--factory",
        "tests.test_export:tiny_segmenter",
        "--weights",
        str(weights),
        "--classes",
        str(root / "classes.txt"),
        "--colors",
        COLORS,
        "--input-size",
        str(H),
        str(W),
        "--num-classes",
        str(len(CLASSES)),
        "--description",
        "Tiny test segmenter",
        "--repository",
        str(repository),
        "--name",
        "tiny",
        "--max-batch-size",
        "4",
        "--preferred-batch-size",
        "2",
        "4",
        "--max-queue-delay-us",
        "1000",
        "--max-queue-size",
        "16",
        "--check-images",
        str(check_dir),
        "--check-frames",
        "3",
        "--threads",
        "1",
    ]
    assert cli.main(argv) == 0
    return repository


def test_entry_parses(exported: Path):
    (entry,) = scan_repository(exported)  # the staging folder is gone
    assert entry.error is None and entry.config is not None
    assert sorted(entry.versions) == [1]
    config = entry.config
    assert (config.name, config.platform) == ("tiny", "onnxruntime_onnx")
    assert (config.input_name, config.input_dtype, config.input_layout) == (
        "image",
        np.dtype(np.float32),
        "NCHW",
    )
    assert (config.input_height, config.input_width) == (H, W)
    assert (config.output_name, config.output_dtype, config.outputs_labels) == (
        "labels",
        np.dtype(np.uint8),
        True,
    )
    assert [c.name for c in config.classes] == list(CLASSES)
    assert config.palette == [tuple(map(int, c.split(","))) for c in COLORS.split(";")]
    assert config.mean == pytest.approx(IMAGENET_MEAN) and config.std == pytest.approx(IMAGENET_STD)
    batching = config.batching
    assert batching.enabled and batching.max_batch_size == 4
    assert batching.preferred_batch_sizes == (2, 4)
    assert (batching.max_queue_delay_us, batching.max_queue_size) == (1000, 16)
    assert config.instance_count == 1 and not config.use_gpu
    assert config.description.startswith("Tiny test segmenter")
    assert "Val mIoU not measured" in config.description
    assert (exported / "tiny" / "labels.txt").read_text().split() == list(CLASSES)
    text = (exported / "tiny" / "config.pbtxt").read_text()
    assert "label_filename" in text and "KIND_CPU" in text and "FORMAT_NCHW" in text
    assert config.confidence_output == "confidence"


def test_onnx_has_dynamic_batch_and_uint8_labels(exported: Path):
    graph = onnx.load(str(exported / "tiny" / "1" / "model.onnx")).graph
    (image,) = graph.input
    labels, confidence = graph.output  # every export carries the confidence output
    assert (labels.name, confidence.name) == ("labels", "confidence")
    assert confidence.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    in_dims = image.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and not in_dims[0].dim_value
    assert [d.dim_value for d in in_dims[1:]] == [3, H, W]
    assert labels.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    out_dims = labels.type.tensor_type.shape.dim
    assert out_dims[0].dim_param and [d.dim_value for d in out_dims[1:]] == [H, W]


def test_onnx_agrees_with_torch(exported: Path, check_dir: Path):
    (entry,) = scan_repository(exported)
    assert entry.config is not None
    batch = check_batch(sorted(check_dir.iterdir()), entry.config, 3)
    assert batch.shape == (3, 3, H, W)
    agreement = check_against_torch(trained_tiny(), exported / "tiny" / "1" / "model.onnx", batch)
    assert agreement >= MIN_AGREEMENT


async def test_served_mask_equals_torch_argmax(exported: Path):
    model = trained_tiny()
    rgb = cv2.resize(street_images(1)[0], (W, H), interpolation=cv2.INTER_AREA)
    expected = torch_labels(model, rgb)
    assert len(np.unique(expected)) >= 2  # the test image is not one flat class
    server = Server(make_settings(exported))
    await server.start()
    try:
        async with AsyncSegserveClient(f"127.0.0.1:{server.port}", timeout_s=30) as client:
            info = await client.get_model("tiny")
            assert info.state == "READY" and [c.name for c in info.classes] == list(CLASSES)
            for image in (png(rgb), rgb):  # encoded PNG and raw pixels, both at the model size
                result = await client.segment(image, "tiny", output_size="model")
                assert (result.width, result.height) == (W, H)
                np.testing.assert_array_equal(result.labels, expected)
    finally:
        await server.stop(timeout_s=5)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("no_such_module_xyz.models:build", "cannot import module 'no_such_module_xyz.models'"),
        ("tests.test_export:no_such_factory", "has no attribute 'no_such_factory'"),
        ("tests.test_export", "is not MODULE:FACTORY"),
        ("tests.test_export:CLASSES", "not callable"),
    ],
)
def test_bad_factory_is_a_clear_error(tmp_path: Path, capsys, factory: str, message: str):
    weights = tmp_path / "tiny.pt"
    torch.save(trained_tiny().state_dict(), weights)
    argv = ["export", "--factory", factory, "--weights", str(weights), "--classes", "a,b,c,d"]
    argv += ["--input-size", "8", "8", "--repository", str(tmp_path / "repo"), "--name", "m"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "segserve export: error:" in err and message in err
    assert not (tmp_path / "repo" / "m").exists()


def test_mismatched_classes_and_existing_entry_are_refused(
    tmp_path: Path, capsys, exported: Path, check_dir: Path
):
    weights = tmp_path / "tiny.pt"
    torch.save(trained_tiny().state_dict(), weights)
    common = ["export", "--factory", "tests.test_export:tiny_segmenter", "--weights", str(weights)]
    common += ["--input-size", str(H), str(W), "--check-images", str(check_dir)]
    # Three names for a four-class state dict: the weights do not fit the model the factory built.
    argv = [*common, "--classes", "a,b,c", "--repository", str(tmp_path), "--name", "m"]
    assert cli.main(argv) == 2
    assert "do not fit the model" in capsys.readouterr().err
    argv = [*common, "--classes", "a,b,c,d", "--num-classes", "5", "--repository", str(tmp_path)]
    assert cli.main([*argv, "--name", "m"]) == 2
    assert "--num-classes 5" in capsys.readouterr().err
    before = (exported / "tiny" / "config.pbtxt").read_text()
    argv = [
        *common,
        "--classes",
        ",".join(CLASSES),
        "--repository",
        str(exported),
        "--name",
        "tiny",
    ]
    assert cli.main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert (exported / "tiny" / "config.pbtxt").read_text() == before


@pytest.mark.parametrize("splits", [["train"], ["train", "val"]])
def test_training_checkpoint(tmp_path: Path, check_dir: Path, splits: list[str]):
    """A `segserve train` checkpoint: classes, colours, normalisation, size, mIoU, licence; a
    final (train + val) checkpoint states that val was trained on instead of a val figure."""
    from segserve_server.training.models import build_model

    torch.manual_seed(0)
    model = build_model("deeplabv3plus", camvid.NUM_CLASSES)
    checkpoint = tmp_path / "best.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "epoch": 12,
            "train_splits": splits,
            "val_miou": 0.4321,
            "arch": "deeplabv3plus",
            "num_classes": camvid.NUM_CLASSES,
            "class_names": list(camvid.CLASS_NAMES),
            "class_colors": [list(c) for c in camvid.CLASS_COLORS],
            "ignore_index": camvid.IGNORE_INDEX,
            "input_size": [H, W],
            "normalization": {
                "color_order": "RGB",
                "scale": 1 / 255,
                "mean": list(camvid.MEAN),
                "std": list(camvid.STD),
            },
            "args": {"data": "../shared/data/camvid", "epochs": 150},
            "license": "trained on CamVid (CC BY-NC 4.0, Brostow et al. 2009): non-commercial use",
        },
        checkpoint,
    )
    repository = tmp_path / "repository"
    argv = ["export", "--checkpoint", str(checkpoint), "--repository", str(repository)]
    argv += ["--check-images", str(check_dir), "--check-frames", "2", "--threads", "1"]
    assert cli.main(argv) == 0
    (entry,) = scan_repository(repository)
    assert entry.name == "deeplabv3plus_camvid" and entry.error is None
    config = entry.config
    assert config is not None
    assert [c.name for c in config.classes] == list(camvid.CLASS_NAMES)
    assert config.palette == list(camvid.CLASS_COLORS)
    assert (config.input_height, config.input_width) == (H, W)
    description = config.description
    assert description.startswith("DeepLabV3+")
    if splits == ["train"]:
        assert "Val mIoU 0.4321" in description and "epoch 12 of 150" in description
    else:
        assert "Val mIoU" not in description
        assert "Trained on CamVid train + val for a fixed 150-epoch schedule" in description
        assert "val is in its training data" in description
    assert "CC BY-NC 4.0" in description and "research use" in description
    assert "inherit" in description
