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

This module is that pipeline (`export_entry`) and its command line (`main`); the parts:

    export_sources   the ModelSpec of a checkpoint or of a factory + state dict (torch)
    export_config    ModelSpec, BatchingOptions, ExportError and the config.pbtxt text
    export_checks    probe, ONNX signature, check frames and the onnxruntime-vs-torch agreement
    onnx_export      the ONNX graph itself (argmax + uint8 cast inside)

Their public names are re-exported here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from segserve_server.errors import ModelConfigError
from segserve_server.model_repository import (
    CONFIG_FILE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelConfig,
    parse_config,
)
from segserve_server.training.export_checks import (
    MIN_AGREEMENT,
    AgreementError,
    check_agreement,
    check_batch,
    check_onnx_signature,
    image_files,
    probe_model,
)
from segserve_server.training.export_config import (
    LABELS_FILE,
    MODEL_FILE,
    BatchingOptions,
    ExportError,
    ModelSpec,
    config_text,
)
from segserve_server.training.export_sources import (
    DEFAULT_CAMVID,
    from_checkpoint,
    from_factory,
    parse_classes,
    parse_colors,
    resolve_factory,
)
from segserve_server.training.onnx_export import export_onnx

__all__ = [
    "MIN_AGREEMENT",
    "AgreementError",
    "BatchingOptions",
    "ExportError",
    "ExportResult",
    "ModelSpec",
    "build_parser",
    "check_batch",
    "config_text",
    "export_entry",
    "from_checkpoint",
    "from_factory",
    "main",
    "parse_classes",
    "parse_colors",
    "resolve_factory",
]


@dataclass(frozen=True)
class ExportResult:
    entry: Path
    version: int
    onnx_path: Path
    config: ModelConfig
    agreement: float | None  # None: the check was skipped
    check_frames: int
    check_pixels: int


def _install(stage: Path, target: Path, version: int) -> None:
    """Moves the staged entry into place: labels, the version folder, then config.pbtxt."""
    target.mkdir(parents=True, exist_ok=True)
    os.replace(stage / LABELS_FILE, target / LABELS_FILE)
    if (target / str(version)).exists():
        shutil.rmtree(target / str(version))
    os.replace(stage / str(version), target / str(version))
    os.replace(stage / CONFIG_FILE, target / CONFIG_FILE)


def _add_confidence_output(path: Path) -> None:
    """The second output every exported model carries: per-pixel confidence next to the argmax
    (training.confidence), for review routing; labels stay as exported."""
    import onnx

    from segserve_server.training.confidence import add_confidence

    onnx.save(add_confidence(onnx.load(str(path))), str(path))


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
        files = image_files(candidates)
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
        probe_model(spec, batch)
        onnx_path = stage / str(version) / MODEL_FILE
        metadata = {**spec.metadata, "description": spec.description}
        export_onnx(spec.model, onnx_path, spec.height, spec.width, opset, metadata)
        _add_confidence_output(onnx_path)
        check_onnx_signature(onnx_path, spec.height, spec.width)
        agreement: float | None = None
        if files:
            agreement = check_agreement(spec, onnx_path, batch, files, log)
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
