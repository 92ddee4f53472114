"""The checks an export must pass before `segserve export` installs anything.

* `probe_model`: torch's output fits the classes and the input size (fails early and clearly);
* `check_onnx_signature`: the written graph has an ``image`` input with a dynamic batch axis and
  a uint8 ``labels`` output of (batch, H, W);
* `check_agreement`: ONNX Runtime's labels equal torch's argmax on at least `MIN_AGREEMENT` of
  the pixels of real frames, which `check_batch` decodes and preprocesses with the server's own
  code (`pipeline.decode`, `pipeline.preprocess.Preprocessor`), as they would be served.

Needs torch and onnx (and onnxruntime, through `onnx_export.check_against_torch`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from segserve_server.errors import SegserveError
from segserve_server.model_repository import ModelConfig
from segserve_server.pipeline import decode
from segserve_server.pipeline.preprocess import Preprocessor
from segserve_server.training.export_config import ExportError, ModelSpec
from segserve_server.training.onnx_export import check_against_torch

__all__ = [
    "IMAGE_SUFFIXES",
    "MIN_AGREEMENT",
    "AgreementError",
    "check_agreement",
    "check_batch",
    "check_onnx_signature",
    "image_files",
    "probe_model",
]

MIN_AGREEMENT = 0.999
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class AgreementError(ExportError):
    """ONNX Runtime disagrees with torch on more pixels than allowed."""


def check_onnx_signature(path: Path, height: int, width: int) -> None:
    """Raises ExportError unless `path` maps image (batch, 3, H, W) to uint8 labels (batch, H, W)."""
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


def image_files(sources: Sequence[Path]) -> list[Path]:
    """The images of `sources`: folders (their image files, sorted) and single files."""
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


def probe_model(spec: ModelSpec, batch: np.ndarray) -> None:
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


def check_agreement(
    spec: ModelSpec,
    onnx_path: Path,
    batch: np.ndarray,
    files: Sequence[Path],
    log: Callable[[str], None],
) -> float:
    """ONNX Runtime vs torch on `batch` (made from `files`); AgreementError below MIN_AGREEMENT."""
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
    return agreement
