"""The `segserve` command: `serve`; with the `eval` extra `eval`; with the `train` extra (torch) `train` and `export`.

    segserve serve  --model-repository model_repository       serve a repository over gRPC
    segserve eval   DATASET --model M [--server H:P | --offline]   IoU / mIoU of a served model
    segserve train  --model deeplabv3plus --out runs/x ...      train a CamVid model (torch)
    segserve export --checkpoint runs/x/best.pt --name N ...    write a repository entry (torch)
    segserve quantize MODEL --calibration FOLDER ...          INT8 version of a model (onnx)
    segserve flip-average MODEL                              its flip-averaging variant (onnx)
    segserve build-engine MODEL [--precision fp16|int8]      TensorRT version of a model (gpu)

torch is imported only by `train` and `export`; `serve` and `eval` never load it. `serve`'s flags are
the Settings fields (settings_cli).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from segserve_server import __version__

__all__ = ["EXIT_DRAIN_TIMEOUT", "EXIT_OK", "EXIT_USAGE", "main"]

# `segserve serve`'s exit codes (docs/configuration.md, "Draining").
EXIT_OK = 0
"""Stopped by SIGTERM/SIGINT, and every call accepted was answered."""
EXIT_DRAIN_TIMEOUT = 1
"""The drain's drain_timeout_s ran out with calls still running: they were answered UNAVAILABLE
("drain timeout ... ran out") or, past that, cancelled."""
EXIT_USAGE = 2
"""Invalid flags or settings."""


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from segserve_server.settings_cli import add_settings_flags

    p = sub.add_parser(
        "serve",
        help="serve a model repository over gRPC",
        description="Serve every model of a Triton-style model repository. Every flag is also "
        "an environment variable SEGSERVE_<FLAG> and a key of the --config TOML file; flags win "
        "over the environment, which wins over the file.",
    )
    p.add_argument("--config", type=Path, help="TOML file of settings (keys as the flags, _ for -)")
    add_settings_flags(p)


def _run_serve(args: argparse.Namespace) -> int:
    from segserve_server.logs import configure_logging
    from segserve_server.server import serve
    from segserve_server.settings import load_settings
    from segserve_server.settings_cli import overrides_of

    try:
        settings = load_settings(args.config, **overrides_of(args))
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        print(f"segserve: invalid settings: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.log_format)
    return EXIT_OK if asyncio.run(serve(settings)) else EXIT_DRAIN_TIMEOUT


# Subcommands with their own parsers: everything after the name is handed to them unchanged.
_DELEGATED = {
    "train": "train a CamVid segmentation model (needs the train extra: torch)",
    "export": "export a torch model into a model-repository entry (needs torch)",
    "eval": "IoU / mIoU of a model on a labelled image folder, served or offline",
    "quantize": "static INT8 quantization of a repository model, as a new version",
    "flip-average": "write a model's test-time flip-averaging variant (model.flip.onnx)",
    "build-engine": "TensorRT engine of a repository model, as a new version (gpu extra)",
}


def _needs_torch(command: str) -> int:
    print(
        f"segserve {command}: needs torch, which serving does not: pip install 'segserve[train]'",
        file=sys.stderr,
    )
    return 2


def _run_delegated(command: str, argv: list[str]) -> int:
    prog = f"segserve {command}"
    if command == "eval":
        try:
            import tqdm  # noqa: F401
        except ImportError:
            print(
                "segserve eval: needs the eval extra, which serving does not: "
                "pip install 'segserve[eval]'",
                file=sys.stderr,
            )
            return 2
        from segserve_server.training import evaluate

        return evaluate.main(argv, prog=prog)
    if command == "build-engine":  # imports tensorrt and torch itself, naming the gpu extra
        from segserve_server.training import engine

        return engine.main(argv, prog=prog)
    if command in ("quantize", "flip-average"):
        try:
            import onnx  # noqa: F401
        except ImportError:
            print(f"{prog}: needs onnx: pip install 'segserve[train]'", file=sys.stderr)
            return 2
        from segserve_server.training import flip, quantize

        return (quantize.main if command == "quantize" else flip.main)(argv, prog=prog)
    try:
        import torch  # noqa: F401
    except ImportError:
        return _needs_torch(command)
    if command == "export":
        from segserve_server.training import export

        return export.main(argv, prog=prog)
    from segserve_server.training import train

    saved = sys.argv[0]
    sys.argv[0] = prog  # train's parser names itself after argv[0]
    try:
        return train.main(argv)
    finally:
        sys.argv[0] = saved


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="segserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"segserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    for command, summary in _DELEGATED.items():
        sub.add_parser(command, help=summary, add_help=False)
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in _DELEGATED:
        return _run_delegated(arguments[0], arguments[1:])
    args = parser.parse_args(arguments)
    if args.command == "serve":
        return _run_serve(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
