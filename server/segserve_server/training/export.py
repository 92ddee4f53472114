"""`segserve export`: a trained torch model becomes a complete model-repository entry.

    <repository>/<name>/config.pbtxt         Triton's onnxruntime backend and segserve both load it
    <repository>/<name>/labels.txt           class names, one per line (the output's label_filename)
    <repository>/<name>/<version>/model.onnx image (N,3,H,W) float32 in, labels (N,H,W) uint8 out

Two sources:

* a training checkpoint of `segserve train` (``runs/deeplabv3plus/best.pt``): architecture,
  weights, class names and colours, normalisation, input size and val mIoU come from it::

    segserve export --checkpoint runs/deeplabv3plus/best.pt \\
        --repository model_repository --name deeplabv3plus_camvid

* your own torch model: a factory ``module:function`` (or ``path/to/file.py:function``) that
  returns an ``nn.Module`` mapping a normalised (N,3,H,W) float32 image to (N,C,H,W) class
  scores, plus a state-dict file; ``num_classes=`` is passed to the factory when it accepts it::

    segserve export --factory mypkg.models:build --weights weights.pt \\
        --classes names.txt --input-size 360 480 --name roadseg --repository model_repository

The graph is written by `onnx_export.export_onnx` (argmax and a uint8 cast inside the graph,
dynamic batch axis). Before the entry is installed, the export is checked: the written
config.pbtxt must parse with segserve's own parser, the ONNX model must have a dynamic batch
axis and uint8 labels, and ONNX Runtime must agree with torch's argmax on at least 99.9 % of
the pixels of real frames, decoded and preprocessed by the server's own code (``--check-images``;
CamVid val by default). A failed check installs nothing and exits non-zero. Everything is built
in a hidden folder of the repository first and moved into place at the end, config.pbtxt last.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf import text_format
from torch import nn
from tritonclient.grpc import model_config_pb2 as mc

from segserve_server.errors import ModelConfigError, SegserveError
from segserve_server.model_repository import (
    CONFIG_FILE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelConfig,
    default_palette,
    parse_config,
)
from segserve_server.pipeline import decode
from segserve_server.pipeline.preprocess import Preprocessor
from segserve_server.training import data as camvid
from segserve_server.training.onnx_export import check_against_torch, export_onnx, load_checkpoint

__all__ = [
    "MIN_AGREEMENT",
    "BatchingOptions",
    "ExportError",
    "ExportResult",
    "ModelSpec",
    "config_text",
    "export_entry",
    "from_checkpoint",
    "from_factory",
    "main",
    "resolve_factory",
]

MIN_AGREEMENT = 0.999
LABELS_FILE = "labels.txt"
MODEL_FILE = "model.onnx"
DEFAULT_CAMVID = Path("../shared/data/camvid")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
CAMVID_LICENCE = (
    "Licence: trained on CamVid (Brostow, Fauqueur, Cipolla, Pattern Recognition Letters 2009), "
    "CC BY-NC 4.0: personal and research use only, no commercial use; "
    "these weights inherit those terms."
)
ARCHITECTURES = {
    "deeplabv3plus": "DeepLabV3+ (small ResNet-style backbone, output stride 16, ASPP, "
    "stride-4 decoder)",
    "unet": "U-Net (narrow: widths 16-32-64-128-192, bilinear up-sampling)",
}


class ExportError(Exception):
    """The export cannot go on; the message says why and what to change."""


class AgreementError(ExportError):
    """ONNX Runtime disagrees with torch on more pixels than allowed."""


@dataclass
class ModelSpec:
    """A torch model and everything the repository entry says about it."""

    model: nn.Module
    class_names: list[str]
    colors: list[tuple[int, int, int]]
    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str
    source: str
    channel_order: str = "RGB"
    metadata: dict[str, str] = field(default_factory=dict)  # ONNX metadata_props
    default_check_images: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class BatchingOptions:
    """config.pbtxt's max_batch_size and dynamic_batching."""

    max_batch_size: int = 8
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 2000
    max_queue_size: int = 64


@dataclass(frozen=True)
class ExportResult:
    entry: Path
    version: int
    onnx_path: Path
    config: ModelConfig
    agreement: float | None  # None: the check was skipped
    check_frames: int
    check_pixels: int


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def _triple(values: Sequence[float], what: str) -> tuple[float, float, float]:
    if len(values) != 3:
        raise ExportError(f"{what} needs 3 values (one per RGB channel), got {list(values)}")
    return float(values[0]), float(values[1]), float(values[2])


def _count_parameters(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def from_checkpoint(
    path: str | os.PathLike[str],
    *,
    input_size: tuple[int, int] | None = None,
    data_root: Path | None = None,
) -> ModelSpec:
    """The model of a `segserve train` checkpoint and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint {str(path)!r} does not exist")
    try:
        model, meta = load_checkpoint(path)
    except Exception as exc:  # torch and pickle raise many types for a bad file
        raise ExportError(
            f"cannot load {path} as a segserve training checkpoint: {type(exc).__name__}: {exc}"
        ) from exc
    arch = str(meta.get("arch", "model"))
    names = [str(n) for n in meta["class_names"]]
    colors = [(int(c[0]), int(c[1]), int(c[2])) for c in meta.get("class_colors", [])]
    colors = colors or default_palette(len(names))
    norm = meta.get("normalization", {})
    scale = float(norm.get("scale", 1.0 / 255.0))
    if abs(scale * 255.0 - 1.0) > 1e-6:
        raise ExportError(f"checkpoint scales pixels by {scale}; segserve scales by 1/255")
    order = str(norm.get("color_order", "RGB")).upper()
    height, width = input_size or (int(meta["input_size"][0]), int(meta["input_size"][1]))
    args = meta.get("args", {}) or {}
    licence = str(meta.get("license", ""))
    is_camvid = (
        "camvid" in licence.lower()
        or "camvid" in str(args.get("data", "")).lower()
        or tuple(names) == camvid.CLASS_NAMES
    )
    miou = meta.get("val_miou", meta.get("best_miou"))
    epoch, epochs = meta.get("epoch"), args.get("epochs")

    what = ARCHITECTURES.get(arch, arch)
    trained = "trained from scratch on CamVid" if is_camvid else "trained"
    imagenet = tuple(norm.get("mean", IMAGENET_MEAN)) == IMAGENET_MEAN
    text = (
        f"{what}, {_count_parameters(model):.2f}M parameters, {trained} "
        f"({len(names)} classes: {', '.join(names)}); input {height}x{width} (HxW), {order}"
        + (", ImageNet mean/std." if imagenet else ".")
    )
    if miou is not None:
        at = f" after epoch {epoch}" + (f" of {epochs}" if epochs else "") if epoch else ""
        split = "CamVid val" if is_camvid else "validation"
        text += f" Val mIoU {float(miou):.4f} on {split}{at} (void ignored)."
    else:
        text += " Val mIoU not recorded in the checkpoint."
    if is_camvid:
        text += " " + CAMVID_LICENCE
    elif licence:
        text += f" Licence: {licence}."

    root = data_root or Path(str(args.get("data") or DEFAULT_CAMVID))
    metadata = {
        "source": f"segserve train checkpoint {path}",
        "arch": arch,
        "class_names": json.dumps(names),
        "class_colors": json.dumps([list(c) for c in colors]),
        "normalization": json.dumps(norm),
        "input_size": json.dumps([height, width]),
        "license": CAMVID_LICENCE if is_camvid else licence,
    }
    if epoch is not None:
        metadata["epoch"] = str(epoch)
    if miou is not None:
        metadata["val_miou"] = f"{float(miou):.4f}"
    return ModelSpec(
        model=model,
        class_names=names,
        colors=colors,
        height=height,
        width=width,
        mean=_triple(norm.get("mean", IMAGENET_MEAN), "mean"),
        std=_triple(norm.get("std", IMAGENET_STD), "std"),
        channel_order=order,
        description=text,
        source=str(path),
        metadata=metadata,
        default_check_images=[root / "val", DEFAULT_CAMVID / "val"],
    )


def resolve_factory(text: str) -> Callable[..., Any]:
    """The callable named by ``module:attr`` or ``path/to/file.py:attr`` (attr may be dotted)."""
    module_name, sep, attr = text.rpartition(":")
    if not sep or not module_name or not attr:
        raise ExportError(
            f"--factory {text!r} is not MODULE:FACTORY "
            "(e.g. mypackage.models:build_model or path/to/models.py:build_model)"
        )
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_file():
            raise ExportError(f"--factory {text!r}: the file {module_name!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"segserve_user_model_{file.stem}", file)
        if spec is None or spec.loader is None:
            raise ExportError(f"--factory {text!r}: cannot load {module_name!r} as Python")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ExportError(
                f"--factory {text!r}: running {module_name} failed: {type(exc).__name__}: {exc}"
            ) from exc
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` would: modules of the current folder
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise ExportError(
                f"--factory {text!r}: cannot import module {module_name!r} ({exc}); "
                "is it installed or in the current folder?"
            ) from exc
        except Exception as exc:
            raise ExportError(
                f"--factory {text!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            candidates = sorted(
                n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
            )
            raise ExportError(
                f"--factory {text!r}: module {module_name!r} has no attribute {attr!r} "
                f"(callables there: {', '.join(candidates[:12]) or 'none'})"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ExportError(f"--factory {text!r}: {attr!r} is a {type(obj).__name__}, not callable")
    return obj


def _accepts_num_classes(factory: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.name == "num_classes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
    )


def _state_dict(weights: Path) -> Mapping[str, torch.Tensor]:
    if not weights.is_file():
        raise ExportError(f"weights file {str(weights)!r} does not exist")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(
            f"cannot read a state dict from {weights} ({type(exc).__name__}: {exc}); save it "
            "with torch.save(model.state_dict(), path) (a `segserve train` checkpoint goes "
            "with --checkpoint)"
        ) from exc
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ExportError(f"{weights} holds a {type(state).__name__}, not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def parse_classes(text: str) -> list[str]:
    """Class names from a file (one per line) or a comma-separated list."""
    path = Path(text)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ExportError(
            f"--classes {text!r} names no class (a file, one name per line, or a,b,c)"
        )
    if len(set(names)) != len(names):
        raise ExportError(f"--classes repeats a name: {names}")
    if len(names) > 256:
        raise ExportError(f"{len(names)} classes; uint8 label maps hold at most 256")
    return names


def parse_colors(text: str, count: int) -> list[tuple[int, int, int]]:
    """Colours from "R,G,B;R,G,B;..." or a file with one R,G,B per line."""
    path = Path(text)
    items = path.read_text().split() if path.is_file() else text.split(";")
    colors = []
    for item in (i.strip() for i in items if i.strip()):
        parts = item.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() and int(p) <= 255 for p in parts):
            raise ExportError(f"--colors entry {item!r} is not R,G,B in 0..255")
        colors.append((int(parts[0]), int(parts[1]), int(parts[2])))
    if len(colors) != count:
        raise ExportError(f"--colors has {len(colors)} colours for {count} classes")
    return colors


def from_factory(
    factory: str,
    weights: str | os.PathLike[str],
    *,
    classes: Sequence[str],
    input_size: tuple[int, int],
    colors: Sequence[tuple[int, int, int]] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    num_classes: int | None = None,
    description: str | None = None,
    val_miou: float | None = None,
    camvid_licence: bool = False,
    licence: str | None = None,
) -> ModelSpec:
    """A user's torch model: ``factory`` builds it, ``weights`` is its state dict."""
    names = list(classes)
    if num_classes is not None and num_classes != len(names):
        raise ExportError(f"--num-classes {num_classes} but --classes names {len(names)} classes")
    height, width = input_size
    if height <= 0 or width <= 0:
        raise ExportError(f"--input-size {height} {width} must be positive")
    build = resolve_factory(factory)
    try:
        model = build(num_classes=len(names)) if _accepts_num_classes(build) else build()
    except Exception as exc:
        raise ExportError(f"--factory {factory!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ExportError(
            f"--factory {factory!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    try:
        model.load_state_dict(_state_dict(Path(weights)))
    except RuntimeError as exc:
        raise ExportError(
            f"the weights in {weights} do not fit the model built by {factory}: {exc}"
        ) from exc
    model.eval()
    palette = list(colors) if colors is not None else default_palette(len(names))
    if len(palette) != len(names):
        raise ExportError(f"{len(palette)} colours for {len(names)} classes")
    if not camvid_licence and tuple(names) == camvid.CLASS_NAMES:
        camvid_licence = True  # CamVid's own classes: its terms apply to the weights
    text = description or f"user model {factory} (weights {Path(weights).name})"
    text = text.rstrip(".") + (
        f", {_count_parameters(model):.2f}M parameters, {len(names)} classes "
        f"({', '.join(names)}); input {height}x{width} (HxW), RGB."
    )
    text += f" Val mIoU {val_miou:.4f}." if val_miou is not None else " Val mIoU not measured."
    if camvid_licence:
        text += " " + CAMVID_LICENCE
    if licence:
        text += f" Licence: {licence.rstrip('.')}."
    metadata = {
        "source": f"{factory} with weights {weights}",
        "class_names": json.dumps(names),
        "class_colors": json.dumps([list(c) for c in palette]),
        "normalization": json.dumps(
            {"color_order": "RGB", "scale": 1 / 255, "mean": list(mean), "std": list(std)}
        ),
        "input_size": json.dumps([height, width]),
    }
    if val_miou is not None:
        metadata["val_miou"] = f"{val_miou:.4f}"
    if camvid_licence or licence:
        metadata["license"] = " ".join(
            t for t in (CAMVID_LICENCE if camvid_licence else "", licence or "") if t
        )
    return ModelSpec(
        model=model,
        class_names=names,
        colors=[(int(r), int(g), int(b)) for r, g, b in palette],
        height=height,
        width=width,
        mean=_triple(mean, "--mean"),
        std=_triple(std, "--std"),
        description=text,
        source=f"{factory} + {weights}",
        metadata=metadata,
        default_check_images=[DEFAULT_CAMVID / "val"],
    )


# ----------------------------------------------------------------------------------------------
# The entry
# ----------------------------------------------------------------------------------------------


def _numbers(values: Sequence[float]) -> str:
    return ",".join(repr(float(v)) for v in values)


def config_text(name: str, spec: ModelSpec, batching: BatchingOptions) -> str:
    """config.pbtxt of the entry, written through Triton's ModelConfig protobuf."""
    if batching.max_batch_size < 1:
        raise ExportError(f"max_batch_size {batching.max_batch_size} must be at least 1")
    bad = [p for p in batching.preferred_batch_sizes if not 1 <= p <= batching.max_batch_size]
    if bad:
        raise ExportError(f"preferred batch sizes {bad} are outside 1..{batching.max_batch_size}")
    raw = mc.ModelConfig(
        name=name, platform="onnxruntime_onnx", max_batch_size=batching.max_batch_size
    )
    raw.input.add(
        name="image",
        data_type=mc.TYPE_FP32,
        format=mc.ModelInput.FORMAT_NCHW,
        dims=[3, spec.height, spec.width],
    )
    raw.output.add(
        name="labels",
        data_type=mc.TYPE_UINT8,
        dims=[spec.height, spec.width],
        label_filename=LABELS_FILE,
    )
    dyn = raw.dynamic_batching
    dyn.SetInParent()
    dyn.preferred_batch_size.extend(sorted(set(batching.preferred_batch_sizes)))
    dyn.max_queue_delay_microseconds = batching.max_queue_delay_us
    dyn.default_queue_policy.max_queue_size = batching.max_queue_size
    raw.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    parameters = {
        "segserve.mean": _numbers(spec.mean),
        "segserve.std": _numbers(spec.std),
        "segserve.channel_order": spec.channel_order,
        "segserve.colors": ";".join(f"{r},{g},{b}" for r, g, b in spec.colors),
        "segserve.description": spec.description,
    }
    for key, value in parameters.items():
        raw.parameters[key].string_value = value
    header = (
        f"# Written by `segserve export` from {spec.source}.\n"
        "# Loads in Triton (onnxruntime backend) and in segserve; segserve.* parameters are "
        "segserve's metadata.\n"
    )
    return header + text_format.MessageToString(raw)


def _check_onnx_signature(path: Path, height: int, width: int) -> None:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    if "image" not in inputs or "labels" not in outputs:
        raise ExportError(f"{path} has inputs {list(inputs)} and outputs {list(outputs)}")
    in_dims = inputs["image"].type.tensor_type.shape.dim
    out = outputs["labels"].type.tensor_type
    if not in_dims or in_dims[0].dim_value or not in_dims[0].dim_param:
        raise ExportError(f"{path}: the input's batch axis is not dynamic")
    if out.elem_type != onnx.TensorProto.UINT8:
        raise ExportError(f"{path}: labels are {onnx.TensorProto.DataType.Name(out.elem_type)}")
    shape = [d.dim_value or d.dim_param for d in out.shape.dim]
    if len(shape) != 3 or shape[1:] != [height, width] or isinstance(shape[0], int):
        raise ExportError(f"{path}: labels shape {shape} is not [batch, {height}, {width}]")


def _image_files(sources: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files += sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif source.is_file():
            files.append(source)
        else:
            raise ExportError(f"check image path {str(source)!r} does not exist")
    return files


def check_batch(files: Sequence[Path], config: ModelConfig, count: int) -> np.ndarray:
    """Up to `count` of `files`, spread evenly, decoded and preprocessed as the server does."""
    picks = sorted(set(np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int)))
    preprocess = Preprocessor(config)
    limits = decode.ImageLimits(max_pixels=1 << 31, max_side=1 << 16)
    tensors = []
    for i in picks:
        try:
            decoded = decode.decode(
                files[i].read_bytes(),
                limits,
                order="BGR" if config.channel_order == "BGR" else "RGB",
                min_size=(config.input_width, config.input_height),
            )
        except SegserveError as exc:
            raise ExportError(f"check image {files[i]}: {exc}") from exc
        tensors.append(preprocess(decoded))
    return np.ascontiguousarray(np.stack(tensors), dtype=np.float32)


def _probe(spec: ModelSpec, batch: np.ndarray) -> None:
    """Fails early and clearly when the model's output does not fit the classes and size."""
    with torch.no_grad():
        try:
            out = spec.model.eval()(torch.from_numpy(batch[:1]))
        except Exception as exc:
            raise ExportError(
                f"the model fails on a (1, 3, {spec.height}, {spec.width}) image: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(out, torch.Tensor):
        raise ExportError(f"the model returns a {type(out).__name__}; it must return one tensor")
    want = (1, len(spec.class_names), spec.height, spec.width)
    if tuple(out.shape) != want:
        raise ExportError(
            f"the model returns scores of shape {tuple(out.shape)}; expected {want} "
            f"({len(spec.class_names)} classes at the input size)"
        )


def _install(stage: Path, target: Path, version: int) -> None:
    """Moves the staged entry into place: labels, the version folder, then config.pbtxt."""
    target.mkdir(parents=True, exist_ok=True)
    os.replace(stage / LABELS_FILE, target / LABELS_FILE)
    if (target / str(version)).exists():
        shutil.rmtree(target / str(version))
    os.replace(stage / str(version), target / str(version))
    os.replace(stage / CONFIG_FILE, target / CONFIG_FILE)


def export_entry(
    spec: ModelSpec,
    repository: str | os.PathLike[str],
    name: str,
    *,
    version: int = 1,
    batching: BatchingOptions | None = None,
    check_images: Sequence[Path] | None = None,
    check_frames: int = 8,
    opset: int = 17,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Writes, checks and installs `<repository>/<name>/`; raises ExportError on any failure."""
    if not name or name.startswith(".") or Path(name).name != name:
        raise ExportError(f"model name {name!r} must be a plain folder name")
    if version < 1:
        raise ExportError(f"version {version} must be at least 1")
    repository = Path(repository)
    target = repository / name
    if target.exists() and not force:
        raise ExportError(
            f"{target} already exists; --force replaces its config.pbtxt, labels.txt and "
            f"version {version} (other versions are kept)"
        )
    files: list[Path] = []
    if check_frames > 0:
        candidates = list(check_images or [p for p in spec.default_check_images if p.is_dir()])
        files = _image_files(candidates)
        if not files:
            raise ExportError(
                "no images to check the export against; give --check-images DIR "
                "(or --check-frames 0 to skip the check)"
            )
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=repository))
    try:
        stage = staging / name
        stage.mkdir()
        text = config_text(name, spec, batching or BatchingOptions())
        (stage / LABELS_FILE).write_text("\n".join(spec.class_names) + "\n")
        (stage / CONFIG_FILE).write_text(text)
        try:
            config = parse_config(text, stage)
        except ModelConfigError as exc:
            raise ExportError(f"the written config.pbtxt does not parse: {exc}") from exc
        batch = (
            check_batch(files, config, check_frames)
            if files
            else np.zeros((1, 3, spec.height, spec.width), np.float32)
        )
        _probe(spec, batch)
        onnx_path = stage / str(version) / MODEL_FILE
        metadata = {**spec.metadata, "description": spec.description}
        export_onnx(spec.model, onnx_path, spec.height, spec.width, opset, metadata)
        _check_onnx_signature(onnx_path, spec.height, spec.width)
        agreement = None
        if files:
            agreement = check_against_torch(spec.model, onnx_path, batch)
            log(
                f"onnxruntime vs torch: {agreement:.6f} of {batch.shape[0]} x "
                f"{spec.height} x {spec.width} pixels agree on frames from "
                f"{files[0].parent if len({f.parent for f in files}) == 1 else 'the check images'}"
            )
            if agreement < MIN_AGREEMENT:
                raise AgreementError(
                    f"onnxruntime agrees with torch on only {agreement:.4%} of the pixels "
                    f"(at least {MIN_AGREEMENT:.1%} needed); nothing was installed"
                )
        else:
            log("WARNING: the onnxruntime vs torch check was skipped (--check-frames 0)")
        _install(stage, target, version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        final = parse_config((target / CONFIG_FILE).read_text(), target)
    except ModelConfigError as exc:
        raise ExportError(f"{target / CONFIG_FILE} does not parse after install: {exc}") from exc
    return ExportResult(
        entry=target,
        version=version,
        onnx_path=target / str(version) / MODEL_FILE,
        config=final,
        agreement=agreement,
        check_frames=int(batch.shape[0]) if files else 0,
        check_pixels=int(batch.shape[0] * spec.height * spec.width) if files else 0,
    )


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser(prog: str = "segserve export") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Export a torch segmentation model into a model-repository entry "
        "(config.pbtxt, labels.txt, <version>/model.onnx), checked against torch.",
        epilog="Examples:\n"
        "  segserve export --checkpoint runs/deeplabv3plus/best.pt "
        "--repository model_repository --name deeplabv3plus_camvid\n"
        "  segserve export --factory mypkg.models:build --weights w.pt --classes names.txt "
        "--input-size 360 480 --repository model_repository --name roadseg",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a `segserve train` checkpoint (best.pt)")
    source.add_argument(
        "--factory",
        metavar="MODULE:FACTORY",
        help="your model: a callable returning an nn.Module (module path or file.py)",
    )
    p.add_argument("--weights", type=Path, help="state-dict file of the --factory model")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument(
        "--name", help="model name (folder); default <arch>_camvid for CamVid checkpoints"
    )
    p.add_argument("--version", type=int, default=1, help="version folder (default 1)")
    p.add_argument("--force", action="store_true", help="replace an existing entry's files")

    meta = p.add_argument_group("model metadata (--factory; --input-size also for checkpoints)")
    meta.add_argument("--classes", help="class names: a file (one per line) or a,b,c")
    meta.add_argument("--colors", help="class colours: R,G,B;R,G,B;... or a file of R,G,B lines")
    meta.add_argument(
        "--input-size", type=int, nargs=2, metavar=("H", "W"), help="model input size"
    )
    meta.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN, metavar="M")
    meta.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD, metavar="S")
    meta.add_argument("--num-classes", type=int, help="passed to the factory if it accepts it")
    meta.add_argument("--description", help="what the model is (first sentence of the note)")
    meta.add_argument("--val-miou", type=float, help="validation mIoU to state, if measured")
    meta.add_argument(
        "--camvid", action="store_true", help="the weights were trained on CamVid: add its licence"
    )
    meta.add_argument("--license", dest="licence", help="licence note for the weights")

    batching = p.add_argument_group("batching (config.pbtxt)")
    batching.add_argument("--max-batch-size", type=int, default=8)
    batching.add_argument("--preferred-batch-size", type=int, nargs="*", default=[])
    batching.add_argument("--max-queue-delay-us", type=int, default=2000)
    batching.add_argument("--max-queue-size", type=int, default=64, help="0: unbounded")

    check = p.add_argument_group("check against torch")
    check.add_argument(
        "--check-images",
        type=Path,
        nargs="+",
        help="image folders or files (default: CamVid val, from the checkpoint's --data or "
        f"{DEFAULT_CAMVID})",
    )
    check.add_argument(
        "--check-frames", type=int, default=8, help="frames compared (default 8; 0 skips)"
    )
    check.add_argument("--data", type=Path, help="CamVid root for the default check frames")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    return p


def _spec_from_args(args: argparse.Namespace, p: argparse.ArgumentParser) -> ModelSpec:
    size = (args.input_size[0], args.input_size[1]) if args.input_size else None
    if args.checkpoint is not None:
        for flag in ("weights", "classes", "colors", "num_classes"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag.replace('_', '-')} goes with --factory, not --checkpoint")
        return from_checkpoint(args.checkpoint, input_size=size, data_root=args.data)
    missing = [f for f in ("weights", "classes", "input_size") if getattr(args, f) is None]
    if missing:
        p.error("--factory needs " + ", ".join(f"--{m.replace('_', '-')}" for m in missing))
    classes = parse_classes(args.classes)
    assert size is not None
    return from_factory(
        args.factory,
        args.weights,
        classes=classes,
        input_size=size,
        colors=parse_colors(args.colors, len(classes)) if args.colors else None,
        mean=args.mean,
        std=args.std,
        num_classes=args.num_classes,
        description=args.description,
        val_miou=args.val_miou,
        camvid_licence=args.camvid,
        licence=args.licence,
    )


def main(argv: Sequence[str] | None = None, prog: str = "segserve export") -> int:
    p = build_parser(prog)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        spec = _spec_from_args(args, p)
        name = args.name
        if name is None:
            if args.checkpoint is None:
                p.error("--name is required with --factory")
            arch = spec.metadata.get("arch", "model")
            name = f"{arch}_camvid" if "CamVid" in spec.metadata.get("license", "") else arch
        result = export_entry(
            spec,
            args.repository,
            name,
            version=args.version,
            batching=BatchingOptions(
                max_batch_size=args.max_batch_size,
                preferred_batch_sizes=tuple(args.preferred_batch_size),
                max_queue_delay_us=args.max_queue_delay_us,
                max_queue_size=args.max_queue_size,
            ),
            check_images=args.check_images,
            check_frames=args.check_frames,
            opset=args.opset,
            force=args.force,
        )
    except AgreementError as exc:
        print(f"{prog}: check failed: {exc}", file=sys.stderr)
        return 1
    except ExportError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    size_mb = result.onnx_path.stat().st_size / 1e6
    config = result.config
    print(
        f"exported {config.name} version {result.version} to {result.entry} "
        f"(model.onnx {size_mb:.1f} MB, input {config.input_height}x{config.input_width}, "
        f"{len(config.classes)} classes, max_batch_size {config.batching.max_batch_size})"
    )
    print(f"config.pbtxt parses with segserve's parse_config; description: {config.description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
