"""`segserve build-engine`: a TensorRT engine (`model.plan`) of a repository's ONNX model, as a
new version that Triton's `tensorrt_plan` platform and segserve's TensorRT backend both serve.

    segserve build-engine deeplabv3plus_camvid [--model-repository model_repository] \\
        [--precision fp16|fp32|int8] [--calibration FOLDER --frames 32] \\
        [--from-version N] [--version V] [--timing-cache PATH] [--workspace-bytes B] \\
        [--instances N] [--device cuda:0]

FP16 by default (FP32 I/O, FP16 kernels where TensorRT finds them faster); INT8 calibrates with
the entropy calibrator on `--frames` images of FOLDER preprocessed by the server's own code. One
optimisation profile: batch 1 to max_batch_size, tuned for the largest preferred batch size.
The timing cache (`--timing-cache`, default ~/.cache/segserve/tensorrt-timing.cache) is read
before and written after the build, so rebuilds on the same GPU take seconds.

The source is the latest unquantized version (no quantization.json, no QuantizeLinear or
DequantizeLinear nodes), or `--from-version`, which may not name a quantized one: `segserve
quantize` writes UINT8 (asymmetric) QDQ, which TensorRT's ONNX parser refuses (symmetric INT8
only), and an "FP16" engine of it would not be FP16. For INT8, build the FP32 version with
`--precision int8 --calibration FOLDER`.

It writes version V (default: the highest + 1) as `<model>/<V>/model.plan` with
`<V>/build.json` (what was built, how long it took) and `<V>/source_config.pbtxt` (config.pbtxt
as it was: copy it back to return to the ONNX versions), then rewrites config.pbtxt for the
`tensorrt_plan` platform: version_policy `specific: [V]` (the ONNX versions stay on disk,
unloaded: one config serves every version of a model), KIND_GPU instances, no ONNX Runtime
accelerators, `segserve.pipeline: "device"`; the inputs, outputs, batching and classes are
unchanged, so Triton serves the folder as it is. The version is written under a hidden name,
loaded by segserve's TensorRT backend (warm-up) and only then renamed into place.

Needs the gpu extra (tensorrt 10.x, torch with CUDA, onnx) and a GPU: TensorRT 11 removed the
FP16 and INT8 builder flags (weakly typed networks) this uses. An engine runs only on the
TensorRT version and GPU model it was built with. Untested on hardware in CI (no GPU there): docs/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from segserve_server.errors import SegserveError
from segserve_server.model_repository import (
    CONFIG_FILE,
    ModelConfig,
    RepositoryEntry,
    parse_config,
)
from segserve_server.training.repository import (
    ONNX_PLATFORMS,
    QUANTIZATION_REPORT,
    repository_entry,
)

__all__ = [
    "DEFAULT_TIMING_CACHE",
    "PLAN_FILE",
    "PRECISIONS",
    "EngineError",
    "EngineOptions",
    "build_parser",
    "build_serialized_engine",
    "main",
    "next_version",
    "plan_config_text",
    "quantization_reason",
    "source_entry",
    "source_version",
    "write_engine_version",
]

PLAN_FILE = "model.plan"
PRECISIONS = ("fp16", "fp32", "int8")
DEFAULT_TIMING_CACHE = Path.home() / ".cache" / "segserve" / "tensorrt-timing.cache"
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


class EngineError(Exception):
    """The build cannot go on; the message says why and what to change."""


@dataclass(frozen=True)
class EngineOptions:
    precision: str = "fp16"
    calibration: Path | None = None
    frames: int = 32
    timing_cache: Path = DEFAULT_TIMING_CACHE
    workspace_bytes: int = 4 << 30
    opt_batch: int | None = None
    instances: int = 1
    device: str = "cuda:0"


def source_entry(repository: Path, model: str) -> tuple[RepositoryEntry, ModelConfig]:
    """The model's entry and config; EngineError unless it is a valid ONNX model."""
    entry, config = repository_entry(repository, model, EngineError)
    if config.platform not in ONNX_PLATFORMS:
        raise EngineError(
            f"model {model!r} is a {config.platform!r} model; build-engine takes ONNX"
        )
    return entry, config


def _qdq_nodes(path: Path) -> int:
    """QuantizeLinear / DequantizeLinear nodes in the graph, subgraphs and functions included."""
    try:
        import onnx
    except ImportError as exc:
        raise EngineError(
            f"build-engine reads the ONNX graph with onnx ({exc}): pip install 'segserve[gpu]'"
        ) from exc
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # a truncated or foreign file: say which
        raise EngineError(f"cannot read {path} as ONNX: {exc}") from exc
    graphs = [model.graph]
    count = sum(node.op_type in _QDQ_OPS for f in model.functions for node in f.node)
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            count += node.op_type in _QDQ_OPS
            for attribute in node.attribute:
                graphs.extend(attribute.graphs)
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
    return count


def quantization_reason(folder: Path, model_filename: str) -> str | None:
    """Why the version in `folder` is quantized (its quantization.json, Q/DQ nodes), or None."""
    if (folder / QUANTIZATION_REPORT).is_file():
        return f"{folder.name}/{QUANTIZATION_REPORT} says it is quantized"
    path = folder / model_filename
    if not path.is_file():
        raise EngineError(f"version {folder.name} has no {model_filename}")
    nodes = _qdq_nodes(path)
    return f"its graph has {nodes} QuantizeLinear/DequantizeLinear nodes" if nodes else None


def source_version(entry: RepositoryEntry, config: ModelConfig, requested: int | None) -> int:
    """`requested`, or the latest unquantized version; EngineError for a quantized `requested`
    (TensorRT's parser: "Non-zero zero point is not supported") or if all are quantized."""
    if requested is not None:
        if requested not in entry.versions:
            raise EngineError(f"model {entry.name!r} has no version {requested}")
        reason = quantization_reason(entry.versions[requested], config.model_filename)
        if reason is not None:
            raise EngineError(
                f"version {requested} of model {entry.name!r} is a quantized (QDQ) model: "
                f"{reason}. TensorRT needs symmetric INT8 QDQ (zero point 0), and segserve "
                "quantize writes UINT8 activations with non-zero zero points; build the FP32 "
                "version instead (--from-version of an unquantized one), with --precision int8 "
                "--calibration FOLDER for an INT8 engine"
            )
        return requested
    skipped = []
    for version in sorted(entry.versions, reverse=True):
        folder = entry.versions[version]
        if not (folder / config.model_filename).is_file():  # e.g. a plan version, config reset
            skipped.append(f"{version} (no {config.model_filename})")
            continue
        reason = quantization_reason(folder, config.model_filename)
        if reason is None:
            return version
        skipped.append(f"{version} ({reason})")
    raise EngineError(
        f"model {entry.name!r} has no unquantized version to build from: "
        f"{'; '.join(skipped) or 'no versions'}; TensorRT needs the FP32 model"
    )


def next_version(entry: RepositoryEntry, requested: int | None = None) -> int:
    """`requested`, or the highest version + 1; EngineError if it exists already."""
    version = requested if requested is not None else max(entry.versions, default=0) + 1
    if version < 1:
        raise EngineError(f"--version {version} is not a positive version number")
    if version in entry.versions or (entry.path / str(version)).exists():
        raise EngineError(f"version {version} of model {entry.name!r} exists already")
    return version


def plan_config_text(config: ModelConfig, version: int, *, instances: int, device: str) -> str:
    """config.pbtxt of the model for Triton's tensorrt_plan platform, serving only `version`."""
    raw = mc.ModelConfig()
    raw.CopyFrom(config.raw)
    raw.platform = "tensorrt_plan"
    raw.backend = ""
    raw.default_model_filename = PLAN_FILE
    raw.ClearField("optimization")
    raw.version_policy.Clear()
    raw.version_policy.specific.versions.append(version)
    index = int(device.partition(":")[2] or 0)
    del raw.instance_group[:]
    raw.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=instances, gpus=[index])
    raw.parameters["segserve.pipeline"].string_value = "device"
    raw.parameters["segserve.device"].string_value = f"cuda:{index}"
    for key in ("segserve.backend", "segserve.triton_urls"):
        if key in raw.parameters:
            del raw.parameters[key]
    return str(text_format.MessageToString(raw))


def _calibration_tensors(config: ModelConfig, options: EngineOptions) -> list[np.ndarray]:
    from segserve_server.pipeline import decode
    from segserve_server.pipeline.preprocess import Preprocessor
    from segserve_server.training.quantize import QuantizeError, calibration_frames

    if options.calibration is None:
        raise EngineError("--precision int8 needs --calibration FOLDER (images like the traffic)")
    try:
        frames = calibration_frames(options.calibration, options.frames)
    except QuantizeError as exc:
        raise EngineError(str(exc)) from exc
    preprocess = Preprocessor(config)
    limits = decode.ImageLimits(max_pixels=1 << 31, max_side=1 << 16)
    order = "BGR" if config.channel_order == "BGR" else "RGB"
    tensors = []
    for path in frames:
        try:
            image = decode.decode(path.read_bytes(), limits, order=order)  # type: ignore[arg-type]
        except SegserveError as exc:
            raise EngineError(f"calibration image {path}: {exc}") from exc
        tensors.append(np.ascontiguousarray(preprocess(image))[np.newaxis])
    return tensors


def _tensorrt() -> Any:
    try:
        import tensorrt
        import torch
    except ImportError as exc:
        raise EngineError(
            f"build-engine needs the gpu extra ({exc}): pip install 'segserve[server,gpu]'"
        ) from exc
    if not torch.cuda.is_available():
        raise EngineError("build-engine needs a CUDA GPU; torch sees none")
    if not hasattr(tensorrt.BuilderFlag, "FP16"):
        raise EngineError(
            f"TensorRT {tensorrt.__version__} has no FP16/INT8 builder flags (removed in 11); "
            "install the gpu extra's tensorrt 10.x"
        )
    return tensorrt


def build_serialized_engine(
    onnx_path: Path, config: ModelConfig, options: EngineOptions
) -> tuple[bytes, dict[str, Any]]:
    """The serialized engine of the ONNX model, and what build.json records about it."""
    trt = _tensorrt()
    import torch

    from segserve_server.backends.tensorrt import profile_shapes

    if options.precision not in PRECISIONS:
        raise EngineError(f"--precision {options.precision!r} is not one of {PRECISIONS}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {errors[:500]}")
    build = builder.create_builder_config()
    build.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    smallest, opt, largest = profile_shapes(config, options.opt_batch)
    profile = builder.create_optimization_profile()
    profile.set_shape(config.input_name, smallest, opt, largest)
    build.add_optimization_profile(profile)
    cache_bytes = options.timing_cache.read_bytes() if options.timing_cache.is_file() else b""
    cache = build.create_timing_cache(cache_bytes)
    build.set_timing_cache(cache, ignore_mismatch=True)
    if options.precision in ("fp16", "int8"):
        build.set_flag(trt.BuilderFlag.FP16)
    calibrator = None
    if options.precision == "int8":
        build.set_flag(trt.BuilderFlag.INT8)
        calibrator = _calibrator(trt, torch, _calibration_tensors(config, options))
        build.int8_calibrator = calibrator
        build.set_calibration_profile(profile)
    started = time.monotonic()
    with torch.cuda.device(torch.device(options.device)):
        serialized = builder.build_serialized_network(network, build)
    if serialized is None:
        raise EngineError(f"TensorRT could not build an engine of {onnx_path} (see its log)")
    options.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    options.timing_cache.write_bytes(bytes(build.get_timing_cache().serialize()))
    info = {
        "precision": options.precision,
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(torch.device(options.device)),
        "profile": {"min": smallest, "opt": opt, "max": largest},
        "workspace_bytes": options.workspace_bytes,
        "timing_cache": str(options.timing_cache),
        "calibration_frames": options.frames if calibrator is not None else 0,
        "build_s": round(time.monotonic() - started, 1),
    }
    return bytes(serialized), info


def _calibrator(trt: Any, torch: Any, tensors: list[np.ndarray]) -> Any:
    """An entropy calibrator over the preprocessed frames, one frame per batch."""

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self._pending = list(tensors)
            self._current: Any = None

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            if not self._pending:
                return None
            self._current = torch.from_numpy(self._pending.pop(0)).cuda()
            return [int(self._current.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return None

        def write_calibration_cache(self, cache: bytes) -> None:
            return None

    return Calibrator()


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_engine_version(
    entry: RepositoryEntry,
    config: ModelConfig,
    version: int,
    plan: bytes,
    info: dict[str, Any],
    *,
    options: EngineOptions,
    check: bool = True,
) -> Path:
    """Writes `<model>/<version>/` (model.plan, build.json, source_config.pbtxt) under a hidden
    name, checks that it loads (`check`), renames it into place and rewrites config.pbtxt."""
    config_path = entry.path / CONFIG_FILE
    previous = config_path.read_text()
    text = plan_config_text(config, version, instances=options.instances, device=options.device)
    new_config = parse_config(text, entry.path)  # the config segserve will read: must parse
    stage = entry.path / f".{version}.building"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        (stage / PLAN_FILE).write_bytes(plan)
        (stage / "source_config.pbtxt").write_text(previous)
        (stage / "build.json").write_text(json.dumps({"version": version, **info}, indent=2))
        if check:
            from segserve_server.backends.tensorrt import TensorRTBackend

            try:
                TensorRTBackend(new_config, stage / PLAN_FILE).close()
            except SegserveError as exc:
                raise EngineError(f"the built engine does not load: {exc}") from exc
        target = entry.path / str(version)
        stage.rename(target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _write_atomic(config_path, text)
    return target


def build_parser(prog: str = "segserve build-engine") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="the model's folder name in the repository")
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument(
        "--from-version", type=int, help="the ONNX version to build (default: latest unquantized)"
    )
    p.add_argument("--version", type=int, help="the version to write (default: highest + 1)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16")
    p.add_argument("--calibration", type=Path, help="image folder for --precision int8")
    p.add_argument("--frames", type=int, default=32, help="calibration images used (int8)")
    p.add_argument("--timing-cache", type=Path, default=DEFAULT_TIMING_CACHE)
    p.add_argument("--workspace-bytes", type=int, default=4 << 30)
    p.add_argument("--opt-batch", type=int, help="batch size the profile is tuned for")
    p.add_argument("--instances", type=int, default=1, help="instance_group count (contexts)")
    p.add_argument("--device", default="cuda:0", help="the GPU to build on and serve from")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "segserve build-engine") -> int:
    args = build_parser(prog).parse_args(argv)
    options = EngineOptions(
        precision=args.precision,
        calibration=args.calibration,
        frames=args.frames,
        timing_cache=args.timing_cache,
        workspace_bytes=args.workspace_bytes,
        opt_batch=args.opt_batch,
        instances=max(1, args.instances),
        device=args.device,
    )
    try:
        entry, config = source_entry(args.model_repository, args.model)
        source = source_version(entry, config, args.from_version)
        onnx_path = entry.versions[source] / config.model_filename
        version = next_version(entry, args.version)
        plan, info = build_serialized_engine(onnx_path, config, options)
        info["source_version"] = source
        target = write_engine_version(entry, config, version, plan, info, options=options)
    except EngineError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    print(f"{prog}: wrote {target / PLAN_FILE} ({len(plan)} bytes, {info['build_s']} s)")
    return 0
