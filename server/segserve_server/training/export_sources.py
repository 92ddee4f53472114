"""Where `segserve export`'s model comes from: a `segserve train` checkpoint or a user's factory.

`from_checkpoint` reads a training checkpoint (architecture, weights, class names and colours,
normalisation, input size and val mIoU); `from_factory` builds a user's ``nn.Module`` with a
``module:function`` (or ``path/to/file.py:function``) factory and loads a state-dict file into it.
Both return the `ModelSpec` that the rest of the export writes and checks, with the description
and ONNX metadata of the entry. `parse_classes` and `parse_colors` read the command line's
``--classes`` and ``--colors``.

Needs torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segserve_server.model_repository import IMAGENET_MEAN, IMAGENET_STD, default_palette
from segserve_server.training import data as camvid
from segserve_server.training.export_config import ExportError, ModelSpec
from segserve_server.training.onnx_export import load_checkpoint

__all__ = [
    "ARCHITECTURES",
    "CAMVID_LICENCE",
    "DEFAULT_CAMVID",
    "from_checkpoint",
    "from_factory",
    "parse_classes",
    "parse_colors",
    "resolve_factory",
]

DEFAULT_CAMVID = Path("../shared/data/camvid")
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
    raw_splits = meta.get("train_splits", ["train"])
    splits = raw_splits.split(",") if isinstance(raw_splits, str) else [str(s) for s in raw_splits]
    if "val" in splits:  # final weights (training/recipe.py): nothing was held out
        schedule = (
            f"a fixed {epochs or epoch}-epoch schedule" if epochs or epoch else "a fixed schedule"
        )
        text += (
            f" Trained on {'CamVid ' if is_camvid else ''}{' + '.join(splits)} for {schedule},"
            " last epoch kept: val is in its training data, so no val figure estimates accuracy"
            " on unseen frames."
        )
    elif miou is not None:
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
    factory: Callable[..., Any] = obj
    return factory


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
        state: Any = torch.load(weights, map_location="cpu", weights_only=True)
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
    tensors: Mapping[str, torch.Tensor] = state  # checked above: tensors only
    return tensors


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
