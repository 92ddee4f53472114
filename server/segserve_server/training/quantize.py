"""`segserve quantize`: ONNX Runtime static INT8 quantization of a repository model, as a new version.

    segserve quantize deeplabv3plus_camvid --calibration ../shared/data/camvid/train \\
        [--frames 32] [--version V] [--method minmax|entropy|percentile] \\
        [--model-repository model_repository]

It reads the model's serving version (`--from-version`, default the latest), preprocesses
`--frames` calibration images of FOLDER (evenly spaced by file name) with the server's own code
(decode.decode, then preprocess.Preprocessor built from the model's config.pbtxt, so the ranges
are the ones serving sees), runs `quant_pre_process` (shape inference and graph optimisation;
`--no-preprocess` skips it) and `quantize_static` in QDQ format with per-channel INT8 weights and
UINT8 activations (U8S8: the fast path of ONNX Runtime's CPU kernels with AVX2 / AVX-512 VNNI).

The tail stays in float: everything from the score tensor that the graph's ArgMax reads to the
outputs (the bilinear up-sampling of the logits, the ArgMax, the confidence chain), and the
convolution that produces the logits, so the logits are never rounded to 8 bits before the
argmax and the softmax confidence. For a model whose output is the scores themselves, the same
holds for the output and its producer.

The result is written as version V (default: the highest existing version + 1) of the same
model: `<model>/<V>/model.onnx` plus `<V>/quantization.json` (what was done, and the label
agreement with the source version on the calibration frames). config.pbtxt is unchanged (the
outputs are the same), so a server serves the new version as the latest one (Triton's default
version_policy). A model with segserve.flip_average gets the flip-averaging variant of the
new version as well (training/flip.py). The folder is written under a hidden name and renamed at the end, so a server
that polls the repository never sees half a version. Before the rename the new model is loaded
by the server's own ONNX Runtime backend (signature check and warm-up).

Needs onnxruntime (its `quantization` package, imported only when quantizing), onnx and OpenCV;
not torch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from segserve_server.model_repository import ModelConfig, RepositoryEntry
from segserve_server.training.eval_data import IMAGE_SUFFIXES
from segserve_server.training.repository import (
    ONNX_PLATFORMS,
    QUANTIZATION_REPORT,
    repository_entry,
)

__all__ = [
    "DEFAULT_FRAMES",
    "METHODS",
    "QuantizeError",
    "QuantizeResult",
    "build_parser",
    "calibration_frames",
    "float_tail",
    "main",
    "quantize_model",
]

METHODS = ("minmax", "entropy", "percentile")
DEFAULT_FRAMES = 32
_MAX_FRAMES = 10_000
# Ops that keep values where they are between the logits producer and the ArgMax.
_PASS_THROUGH = {"Identity", "Resize", "Cast"}


class QuantizeError(Exception):
    """The quantization cannot run; the message says why and names the bad value."""


@dataclass(frozen=True)
class QuantizeResult:
    """What `quantize_model` wrote."""

    model: str
    source_version: int
    version: int
    path: Path
    frames: int
    method: str
    label_agreement: float
    float_nodes: int
    size_bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "source_version": self.source_version,
            "version": self.version,
            "format": "QDQ, per-channel INT8 weights, UINT8 activations (ONNX Runtime static)",
            "calibration_frames": self.frames,
            "calibration_method": self.method,
            "label_agreement_on_calibration_frames": round(self.label_agreement, 5),
            "float_tail_nodes": self.float_nodes,
            "size_bytes": self.size_bytes,
            "seconds": round(self.seconds, 1),
        }


def _entry(repository: Path, model: str) -> tuple[RepositoryEntry, ModelConfig]:
    entry, config = repository_entry(repository, model, QuantizeError)
    if config.platform not in ONNX_PLATFORMS:
        raise QuantizeError(
            f"model {model!r} is a {config.platform!r} model; quantize takes ONNX models"
        )
    return entry, config


def calibration_frames(folder: Path, count: int) -> list[Path]:
    """`count` images of `folder`, evenly spaced over its files sorted by name."""
    if not folder.is_dir():
        raise QuantizeError(f"calibration folder {str(folder)!r} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise QuantizeError(
            f"calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})"
        )
    if count > len(files):
        raise QuantizeError(f"--frames {count}: {folder} holds only {len(files)} images")
    picks = np.linspace(0, len(files) - 1, count).round().astype(int)
    return [files[i] for i in picks]


def _tensors(config: ModelConfig, frames: Sequence[Path]) -> list[np.ndarray]:
    """The model inputs (1, ...) the server would build from these image files."""
    from segserve_server.errors import SegserveError
    from segserve_server.pipeline import decode
    from segserve_server.pipeline.preprocess import Preprocessor

    preprocess = Preprocessor(config)
    limits = decode.ImageLimits(max_pixels=1 << 31, max_side=1 << 16)
    tensors = []
    for path in frames:
        try:
            decoded = decode.decode(
                path.read_bytes(), limits, order="BGR" if config.channel_order == "BGR" else "RGB"
            )
        except SegserveError as exc:
            raise QuantizeError(f"calibration image {path}: {exc}") from exc
        tensors.append(np.ascontiguousarray(preprocess(decoded))[np.newaxis])
    return tensors


def float_tail(model: onnx.ModelProto, config: ModelConfig) -> list[str]:
    """Names of the nodes kept in float: from the score tensor to the outputs, and the node
    that computes the scores (with anything between it and the ArgMax, such as a Resize)."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    if config.outputs_labels:
        tensor = config.output_name
        while (node := producer.get(tensor)) is not None and node.op_type != "ArgMax":
            if node.op_type not in _PASS_THROUGH:
                break
            tensor = node.input[0]
        if node is None or node.op_type != "ArgMax":
            raise QuantizeError(
                f"output {config.output_name!r} does not come from an ArgMax; cannot tell which "
                "tensor holds the scores"
            )
        scores = node.input[0]
    else:
        scores = config.output_name
    keep: set[str] = set()
    # Upstream: the scores' producer, through value-keeping ops, down to the first other op.
    tensor = scores
    while (node := producer.get(tensor)) is not None:
        keep.add(node.name)
        if node.op_type not in _PASS_THROUGH:
            break
        tensor = node.input[0]
    # Downstream: every node that reads the scores, or reads what they feed.
    frontier = {scores}
    while frontier:
        tensor = frontier.pop()
        for node in graph.node:
            if tensor in node.input and node.name not in keep:
                keep.add(node.name)
                frontier.update(node.output)
    return sorted(keep)


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Gives every unnamed node a unique name (nodes_to_exclude works by name)."""
    taken = {n.name for n in model.graph.node}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return model


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over prepared tensors."""

    def __init__(self, input_name: str, tensors: Sequence[np.ndarray]) -> None:
        self._input_name = input_name
        self._tensors = tensors
        self._iter: Iterator[np.ndarray] = iter(tensors)

    def get_next(self) -> dict[str, np.ndarray] | None:
        tensor = next(self._iter, None)
        return None if tensor is None else {self._input_name: tensor}

    def rewind(self) -> None:
        self._iter = iter(self._tensors)


def _agreement(
    config: ModelConfig, source: Path, quantized: Path, tensors: Sequence[np.ndarray]
) -> float:
    """Share of label pixels on which the quantized model agrees with the source model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    runs = [
        ort.InferenceSession(str(p), sess_options=options, providers=["CPUExecutionProvider"])
        for p in (source, quantized)
    ]
    agree = total = 0
    for tensor in tensors:
        a, b = (s.run([config.output_name], {config.input_name: tensor})[0] for s in runs)
        if not config.outputs_labels:
            a, b = a.argmax(axis=1), b.argmax(axis=1)
        agree += int((a == b).sum())
        total += a.size
    return agree / max(total, 1)


def quantize_model(
    repository: str | Path,
    model: str,
    calibration: str | Path,
    *,
    frames: int = DEFAULT_FRAMES,
    version: int = 0,
    from_version: int = 0,
    method: str = "minmax",
    preprocess: bool = True,
    log: Any = None,
) -> QuantizeResult:
    """Quantizes `model` of `repository` (see the module docstring); returns what it wrote."""
    started = time.monotonic()
    say = log or (lambda _message: None)
    repository = Path(repository)
    if method not in METHODS:
        raise QuantizeError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if not 1 <= frames <= _MAX_FRAMES:
        raise QuantizeError(f"--frames {frames} is not in 1..{_MAX_FRAMES}")
    if version < 0 or from_version < 0:
        raise QuantizeError(f"versions are positive numbers, not {min(version, from_version)}")
    entry, config = _entry(repository, model)
    if from_version == 0:
        loadable = entry.versions_to_load or sorted(entry.versions)
        from_version = max(loadable)
    elif from_version not in entry.versions:
        raise QuantizeError(
            f"model {model!r} has no version {from_version} (has {sorted(entry.versions)})"
        )
    if version == 0:
        version = max(entry.versions) + 1
    elif version in entry.versions or (entry.path / str(version)).exists():
        raise QuantizeError(f"model {model!r} already has a version {version}; pick another")
    if version <= from_version:
        say(f"note: version {version} is not above {from_version}; servers keep the latest")
    source = entry.versions[from_version] / config.model_filename
    if not source.is_file():
        raise QuantizeError(f"model file {source} is missing")
    paths = calibration_frames(Path(calibration), frames)
    say(f"preprocessing {len(paths)} calibration frames from {calibration}")
    tensors = _tensors(config, paths)

    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    staging = entry.path / f".{version}.quantizing"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with tempfile.TemporaryDirectory(prefix="segserve-quantize-") as tmp:
            named = Path(tmp) / "named.onnx"
            onnx.save(_named(onnx.load(str(source))), str(named))
            prepared = named
            if preprocess:
                say("quant_pre_process: shape inference and graph optimisation")
                prepared = Path(tmp) / "prepared.onnx"
                # ONNX's shape inference suffices for CNNs; the symbolic one costs 4 s of sympy.
                quant_pre_process(str(named), str(prepared), skip_symbolic_shape=True)
            float_nodes = float_tail(onnx.load(str(prepared)), config)
            say(f"quantizing ({method}, per-channel); {len(float_nodes)} tail nodes stay float")
            target = staging / config.model_filename
            calibrate = {
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[method]
            quantize_static(
                str(prepared),
                str(target),
                _Reader(config.input_name, tensors),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=float_nodes,
                calibrate_method=calibrate,
                extra_options={"CalibPercentile": 99.999} if method == "percentile" else {},
            )
            quantized = onnx.load(str(target))
            onnx.helper.set_model_props(
                quantized,
                {
                    **{p.key: p.value for p in quantized.metadata_props},
                    "segserve.quantized_from": f"{model} version {from_version}",
                    "segserve.quantization": f"static INT8 QDQ per-channel, {method}, "
                    f"{len(paths)} frames of {Path(calibration).name}",
                },
            )
            onnx.save(quantized, str(target))
            if config.flip_average:  # the version must have the variant the config selects
                from segserve_server.model_repository import flip_average_filename
                from segserve_server.training.flip import flip_average

                variant = flip_average(
                    quantized,
                    input_name=config.input_name,
                    output_name=config.output_name,
                    layout=config.input_layout,
                )
                onnx.save(variant, str(target.with_name(flip_average_filename(target.name))))
        _check_loads(config, target)
        agreement = _agreement(config, source, target, tensors)
        result = QuantizeResult(
            model=model,
            source_version=from_version,
            version=version,
            path=entry.path / str(version) / config.model_filename,
            frames=len(paths),
            method=method,
            label_agreement=agreement,
            float_nodes=len(float_nodes),
            size_bytes=target.stat().st_size,
            seconds=time.monotonic() - started,
        )
        (staging / QUANTIZATION_REPORT).write_text(json.dumps(result.to_json(), indent=2) + "\n")
        staging.rename(entry.path / str(version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _check_loads(config: ModelConfig, path: Path) -> None:
    """The server's own backend loads it: signature against config.pbtxt, a warm-up batch."""
    from segserve_server.backends.onnxruntime import OnnxRuntimeBackend
    from segserve_server.errors import ModelConfigError
    from segserve_server.settings import load_settings

    try:
        OnnxRuntimeBackend(config, path, load_settings(None, ort_intra_op_threads=1)).close()
    except ModelConfigError as exc:
        raise QuantizeError(f"the quantized model does not load: {exc}") from exc


def build_parser(prog: str = "segserve quantize") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="ONNX Runtime static INT8 quantization (QDQ, per-channel weights) of a "
        "repository model, calibrated on real frames, written as a new version of it.",
    )
    p.add_argument("model", metavar="MODEL", help="model name in the repository")
    p.add_argument(
        "--calibration", required=True, type=Path, metavar="FOLDER", help="calibration images"
    )
    p.add_argument(
        "--frames", type=int, default=DEFAULT_FRAMES, help=f"how many (default {DEFAULT_FRAMES})"
    )
    p.add_argument("--version", type=int, default=0, help="version to write (default latest + 1)")
    p.add_argument("--from-version", type=int, default=0, help="source version (default latest)")
    p.add_argument("--method", choices=METHODS, default="minmax", help="calibration method")
    p.add_argument("--no-preprocess", action="store_true", help="skip quant_pre_process")
    p.add_argument(
        "--model-repository",
        type=Path,
        default=Path("model_repository"),
        help="repository (default model_repository)",
    )
    return p


def main(argv: Sequence[str] | None = None, prog: str = "segserve quantize") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        result = quantize_model(
            args.model_repository,
            args.model,
            args.calibration,
            frames=args.frames,
            version=args.version,
            from_version=args.from_version,
            method=args.method,
            preprocess=not args.no_preprocess,
            log=lambda message: print(message, file=sys.stderr),
        )
    except QuantizeError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB): {result.model} version "
        f"{result.version} from version {result.source_version}, {result.frames} frames, "
        f"{result.method}; labels agree with version {result.source_version} on "
        f"{result.label_agreement:.2%} of calibration pixels"
    )
    return 0
