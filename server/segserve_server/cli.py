"""The `segserve` command: `serve`, `eval`, and with the `train` extra (torch) `train`, `export`.

    segserve serve  --model-repository model_repository       serve a repository over gRPC
    segserve eval   DATASET --model M [--server H:P | --offline]   IoU / mIoU of a served model
    segserve train  --model deeplabv3plus --out runs/x ...      train a CamVid model (torch)
    segserve export --checkpoint runs/x/best.pt --name N ...    write a repository entry (torch)

torch is imported only by `train` and `export`; `serve` and `eval` never load it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from segserve_server import __version__


def _port(text: str) -> int | str:
    """A port number, or "off" (kept as the string: the settings read it as disabled)."""
    return "off" if text.lower() == "off" else int(text)


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model repository over gRPC",
        description="Serve every model of a Triton-style model repository. Every flag is also "
        "an environment variable SEGSERVE_<FLAG> and a key of the --config TOML file; flags win "
        "over the environment, which wins over the file.",
    )
    p.add_argument("--config", type=Path, help="TOML file of settings (keys as the flags, _ for -)")
    p.add_argument("--model-repository", type=Path, help="model repository folder")
    p.add_argument("--host", help="bind address (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks one)")
    p.add_argument(
        "--metrics-port", type=_port, help="Prometheus /metrics port (default 9464; off disables)"
    )
    p.add_argument("--max-receive-message-bytes", type=int)
    p.add_argument("--max-image-pixels", type=int)
    p.add_argument("--worker-threads", type=int, help="decode/encode threads (default: CPUs)")
    p.add_argument("--ort-intra-op-threads", type=int, help="ONNX Runtime threads (0: auto)")
    p.add_argument("--drain-timeout-s", type=float, help="grace period on SIGTERM")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument(
        "--kserve-port",
        type=_port,
        help="KServe v2 / Triton gRPC port (default 8001; 0 picks one; off disables)",
    )
    p.add_argument(
        "--triton-url",
        dest="triton_urls",
        action="append",
        metavar="HOST:PORT",
        help="a Triton server for models on the Triton backend (repeatable)",
    )
    p.add_argument("--default-backend", choices=["onnxruntime", "triton"])


def _run_serve(args: argparse.Namespace) -> int:
    from segserve_server.server import serve
    from segserve_server.settings import load_settings

    overrides = {
        key: None if value == "off" else value
        for key, value in vars(args).items()
        if key not in ("command", "config", "handler") and value is not None
    }
    try:
        settings = load_settings(args.config, **overrides)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        print(f"segserve: invalid settings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(settings))
    return 0


# Subcommands with their own parsers: everything after the name is handed to them unchanged.
_DELEGATED = {
    "train": "train a CamVid segmentation model (needs the train extra: torch)",
    "export": "export a torch model into a model-repository entry (needs torch)",
    "eval": "IoU / mIoU of a model on a labelled image folder, served or offline",
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
        from segserve_server.training import evaluate

        return evaluate.main(argv, prog=prog)
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
