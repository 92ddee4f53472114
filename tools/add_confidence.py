"""Adds a `confidence` output to an exported segmentation model that has its argmax in the graph.

The graph edit is `segserve_server.training.confidence` (see there for the recipe); this is its
command line.

Usage:
  python tools/add_confidence.py MODEL.onnx --out NEW.onnx
  python tools/add_confidence.py MODEL.onnx --in-place       # replaces MODEL.onnx
Options: --labels NAME (the argmax output, default labels), --name NAME (default confidence),
--recipe {split,sumexp}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import onnx

from segserve_server.training.confidence import (
    RECIPES,
    ConfidenceError,
    add_confidence,
    class_count,
    find_argmax,
)

__all__ = ["RECIPES", "ConfidenceError", "add_confidence", "class_count", "find_argmax", "main"]


def _save(model: onnx.ModelProto, path: Path) -> None:
    """Writes through a temporary file in the same folder, so a failed write leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        if path.exists():
            mode = path.stat().st_mode & 0o777
        else:  # what open() would give a new file (mkstemp makes it 0600)
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(temporary, mode)
        onnx.save(model, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="the model.onnx to read")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="where to write the new model")
    target.add_argument("--in-place", action="store_true", help="replace MODEL itself")
    parser.add_argument("--labels", default="labels", help="the ArgMax output (default labels)")
    parser.add_argument("--name", default="confidence", help="the new output (default confidence)")
    parser.add_argument("--recipe", choices=RECIPES, default="split", help="default split")
    args = parser.parse_args(argv)

    out: Path = args.model if args.in_place else args.out
    if not args.in_place and out.resolve() == args.model.resolve():
        parser.error("--out is MODEL itself; pass --in-place to replace it")
    try:
        model = onnx.load(args.model)
        new = add_confidence(model, labels=args.labels, name=args.name, recipe=args.recipe)
    except (OSError, ConfidenceError, onnx.checker.ValidationError) as exc:
        print(f"add_confidence: {args.model}: {exc}", file=sys.stderr)
        return 1
    _save(new, out)
    argmax = find_argmax(new, args.labels)
    print(
        f"wrote {out}: output {args.name!r} ({args.recipe}) from {argmax.input[0]!r}, "
        f"next to {argmax.name or 'ArgMax'!r}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
