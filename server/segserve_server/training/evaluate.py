"""`segserve eval`: per-class IoU, mIoU and pixel accuracy of a served model on a labelled folder.

    segserve eval ../shared/data/camvid/val --model deeplabv3plus_camvid --server localhost:50051
    segserve eval ../shared/data/camvid/val --model deeplabv3plus_camvid --offline \\
        --model-repository model_repository

The data set is a folder of images and a folder of label PNGs with the same file names (a label
may also be `<stem>.png` for a JPEG image), each label pixel a class id; ids >= the model's class
count are ignored (CamVid's void is 11). DATASET is either the image folder itself, whose labels
are `--labels-dir` or, by default, the sibling `<folder>annot` (CamVid: val + valannot), or a root
holding `--images-dir` and `--labels-dir` (default val and valannot).

Through a server, every image goes as its file bytes, unchanged, through the client library
(a few requests in flight); the mask comes back at the image's size. `--offline` computes the
same in-process with ONNX Runtime and the server's own code: decode.decode,
preprocess.Preprocessor, the server's ONNX Runtime backend built from the model's config.pbtxt,
postprocess.label_map (to_label_map, then resize_labels). The two must agree (serving parity).
torch is not needed for either.

This module runs the evaluation (`evaluate_server`, `evaluate_offline`) and is the command line
(`main`); the data set rules are `eval_data`'s and the arithmetic is `scores`' (shared with
`segserve train`). Their public names are re-exported here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segserve_server.training.eval_data import (
    EvalError,
    Sample,
    list_samples,
    read_label,
    resolve_dataset,
)
from segserve_server.training.scores import EvalResult, Scores, confusion_matrix

__all__ = [
    "DEFAULT_SERVER",
    "EvalError",
    "EvalResult",
    "OfflineModel",
    "Sample",
    "Scores",
    "build_parser",
    "confusion_matrix",
    "evaluate_offline",
    "evaluate_server",
    "list_samples",
    "main",
    "read_label",
    "resolve_dataset",
    "run",
]

DEFAULT_SERVER = "localhost:50051"


class _Accumulator:
    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.ignored = 0
        self.frames = 0

    def add(self, sample: Sample, pred: np.ndarray, label: np.ndarray) -> None:
        if pred.shape != label.shape:
            raise EvalError(
                f"{sample.image.name}: mask is {pred.shape[1]}x{pred.shape[0]} but its label "
                f"{sample.label.name} is {label.shape[1]}x{label.shape[0]}"
            )
        self.confusion += confusion_matrix(pred, label, self.num_classes)
        self.ignored += int((label >= self.num_classes).sum())
        self.frames += 1


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=not enabled, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Through a server
# ----------------------------------------------------------------------------------------------


async def evaluate_server(
    samples: Sequence[Sample],
    model: str,
    target: str = DEFAULT_SERVER,
    *,
    version: int = 0,
    concurrency: int = 4,
    timeout_s: float = 60.0,
    progress: bool = False,
) -> EvalResult:
    """Sends every image's file bytes to the server at `target` and scores the masks."""
    from segserve_client import AsyncSegserveClient, SegserveError

    started = time.perf_counter()
    async with AsyncSegserveClient(target, timeout_s=timeout_s) as client:
        try:
            info = await client.get_model(model, version)
        except SegserveError as exc:
            raise EvalError(f"server {target}: model {model!r}: {exc}") from exc
        if info.state != "READY":
            raise EvalError(f"server {target}: model {model!r} is {info.state}: {info.reason}")
        names = [c.name for c in sorted(info.classes, key=lambda c: c.id)]
        acc = _Accumulator(len(names))
        pending = iter(samples)
        versions: set[int] = set()
        bar = _progress(len(samples), f"{model} @ {target}", progress)

        async def worker() -> None:
            for sample in pending:  # shared iterator: each sample goes to one worker
                data = await asyncio.to_thread(sample.image.read_bytes)
                try:
                    result = await client.segment(data, model, version=version)
                except SegserveError as exc:
                    raise EvalError(f"{sample.image}: the server answered {exc}") from exc
                label = await asyncio.to_thread(read_label, sample.label)
                acc.add(sample, np.asarray(result.labels), label)
                versions.add(result.model_version)
                bar.update(1)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(max(1, min(concurrency, len(samples)))):
                    group.create_task(worker())
        except ExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
        finally:
            bar.close()
    if len(versions) > 1:
        raise EvalError(f"model versions {sorted(versions)} answered during the evaluation")
    return EvalResult(
        model=model,
        model_version=versions.pop() if versions else info.version,
        mode="server",
        source=target,
        class_names=names,
        confusion=acc.confusion,
        frames=acc.frames,
        ignored_pixels=acc.ignored,
        seconds=time.perf_counter() - started,
    )


# ----------------------------------------------------------------------------------------------
# Offline: the server's own stages, in-process
# ----------------------------------------------------------------------------------------------


class OfflineModel:
    """One model version of a repository, run the way the server runs it, without a server."""

    def __init__(
        self, repository: str | Path, model: str, version: int = 0, threads: int = 0
    ) -> None:
        from segserve_server.backends.onnxruntime import OnnxRuntimeBackend
        from segserve_server.errors import ModelConfigError
        from segserve_server.pipeline import decode
        from segserve_server.pipeline.preprocess import Preprocessor
        from segserve_server.settings import load_settings
        from segserve_server.training.repository import ONNX_PLATFORMS, repository_entry

        repository = Path(repository)
        entry, config = repository_entry(repository, model, EvalError)
        loadable = entry.versions_to_load
        if version == 0:
            if not loadable:
                raise EvalError(f"model {model!r}: no version selected by its version_policy")
            version = max(loadable)
        elif version not in entry.versions:
            raise EvalError(f"model {model!r} has no version {version} ({sorted(entry.versions)})")
        if config.platform not in ONNX_PLATFORMS:
            raise EvalError(
                f"model {model!r} is a {config.platform!r} model; --offline runs ONNX models"
            )
        # The server's defaults, from the same settings (SEGSERVE_* variables apply as well),
        # and the server's own ONNX Runtime backend (session options, providers, signature check).
        self.settings = load_settings(
            None, model_repository=repository, ort_intra_op_threads=threads
        )
        model_path = entry.versions[version] / config.model_filename
        try:
            self.backend = OnnxRuntimeBackend(config, model_path, self.settings)
        except ModelConfigError as exc:
            raise EvalError(f"model {model!r} version {version} does not load: {exc}") from exc
        self.config = config
        self.version = version
        self.preprocess = Preprocessor(config)
        self.limits = decode.ImageLimits(
            self.settings.max_image_pixels, self.settings.max_image_side
        )

    def segment(self, data: bytes) -> np.ndarray:
        """The label map the server would send for these image bytes (ORIGINAL output size)."""
        from segserve_server.pipeline import decode, postprocess

        config = self.config
        min_size = (
            (config.input_width, config.input_height) if self.settings.jpeg_dct_scaling else None
        )
        decoded = decode.decode(
            data,
            self.limits,
            order="BGR" if config.channel_order == "BGR" else "RGB",
            min_size=min_size,
        )
        output = self.backend.infer(self.preprocess(decoded)[np.newaxis])[0]
        return postprocess.label_map(
            output, config, decoded.original_width, decoded.original_height
        )


def evaluate_offline(
    samples: Sequence[Sample],
    model: str,
    repository: str | Path = "model_repository",
    *,
    version: int = 0,
    threads: int = 0,
    progress: bool = False,
) -> EvalResult:
    """Scores the model of `repository` in-process, through the server's stages."""
    from segserve_server.errors import SegserveError

    started = time.perf_counter()
    runner = OfflineModel(repository, model, version, threads)
    names = [c.name for c in runner.config.classes]
    acc = _Accumulator(len(names))
    with _progress(len(samples), f"{model} offline", progress) as bar:
        for sample in samples:
            try:
                pred = runner.segment(sample.image.read_bytes())
            except SegserveError as exc:
                raise EvalError(f"{sample.image}: {exc}") from exc
            acc.add(sample, pred, read_label(sample.label))
            bar.update(1)
    runner.backend.close()
    return EvalResult(
        model=model,
        model_version=runner.version,
        mode="offline",
        source=str(repository),
        class_names=names,
        confusion=acc.confusion,
        frames=acc.frames,
        ignored_pixels=acc.ignored,
        seconds=time.perf_counter() - started,
    )


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser(prog: str = "segserve eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Per-class IoU, mIoU and pixel accuracy of a model on a labelled image folder, "
        "through a running segserve server or (--offline) in-process with the server's own code.",
        epilog="DATASET: the image folder (labels in --labels-dir, default the sibling "
        "<folder>annot, as CamVid's val/valannot) or a root holding --images-dir and "
        "--labels-dir (default val, valannot). Label pixels >= the model's class count are "
        "ignored (CamVid void = 11).",
    )
    p.add_argument("dataset", metavar="DATASET", help="image folder, or a data set root")
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--model-version", type=int, default=0, help="0: the serving one (default)")
    p.add_argument("--server", default=DEFAULT_SERVER, help=f"HOST:PORT (default {DEFAULT_SERVER})")
    p.add_argument(
        "--offline", action="store_true", help="no server: ONNX Runtime in-process, same stages"
    )
    p.add_argument(
        "--model-repository",
        type=Path,
        default=Path("model_repository"),
        help="repository of --offline (default model_repository)",
    )
    p.add_argument("--images-dir", help="image folder, relative to DATASET")
    p.add_argument("--labels-dir", help="label folder, relative to DATASET (or absolute)")
    p.add_argument("--limit", type=int, default=0, help="first N frames only (by file name)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (server)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (offline; 0: auto)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per request (server)")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="also write the numbers as JSON to FILE (no FILE or -: standard output)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace, samples: Sequence[Sample]) -> EvalResult:
    if args.offline:
        return evaluate_offline(
            samples,
            args.model,
            args.model_repository,
            version=args.model_version,
            threads=args.threads,
            progress=not args.no_progress,
        )
    return asyncio.run(
        evaluate_server(
            samples,
            args.model,
            args.server,
            version=args.model_version,
            concurrency=args.concurrency,
            timeout_s=args.timeout_s,
            progress=not args.no_progress,
        )
    )


def main(argv: Sequence[str] | None = None, prog: str = "segserve eval") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        images, labels = resolve_dataset(args.dataset, args.images_dir, args.labels_dir)
        result = run(args, list_samples(images, labels, args.limit))
    except EvalError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.json == "-":
        json.dump(result.to_json(images, labels), sys.stdout, indent=2)
        print()
        print(result.report(), file=sys.stderr)
    else:
        print(result.report())
        if args.json:
            Path(args.json).write_text(json.dumps(result.to_json(images, labels), indent=2) + "\n")
    return 0
