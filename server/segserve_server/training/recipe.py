"""A training run's recipe: its flags, what a resume must match, and the stage-1 winner.

The recipe is every `segserve train` argument except the operational ones (:data:`OPERATIONAL`:
where the data and checkpoints live, threads, resume, how often val is scored, where to stop this
invocation).  Each checkpoint stores the full arguments, the recipe and a fingerprint of the
frames trained on (file names and sizes, no paths), so a run resumes after a kill and on another
machine whose data sits elsewhere; `check_resume` refuses a checkpoint whose recipe or data
differs, naming the differences.

``--train-splits train,val`` trains the final weights on train + val: no split is held out, so
there is no honest val selection; the run trains its fixed ``--epochs`` and keeps the last epoch
(``final.pt``).  `--recipe-from` takes the recipe of a stage-1 checkpoint as the defaults.

``python -m segserve_server.training.recipe best RUN_DIR...`` prints the run directory with the
best val mIoU among finished runs (exit 1 if one is unfinished): stage 2 of
``tools/train_bundled.sh`` trains with that run's recipe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import data

__all__ = [
    "OPERATIONAL",
    "RARE_CLASSES",
    "RecipeMismatch",
    "add_recipe_args",
    "best_run",
    "check_resume",
    "data_fingerprint",
    "holds_out_val",
    "main",
    "parse_class_weights",
    "recipe_of",
    "splits_of",
]

#: Arguments that do not change what is trained.
OPERATIONAL = frozenset(
    {"data", "out", "resume", "threads", "eval_every", "recipe_from", "stop_after"}
)
#: The weak classes on unseen CamVid sequences (IoU 0.19-0.27): the default rare-crop weights.
RARE_CLASSES = "Pole:1,SignSymbol:1,Fence:1,Pedestrian:1,Bicyclist:1"
_MAX_SHOWN = 6  # differences named in one message


class RecipeMismatch(ValueError):
    """A checkpoint's recipe or data differs from this run's."""


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The flags of the recipe features (splits, rare crops, photometric, loss terms)."""
    p.add_argument(
        "--train-splits",
        default="train",
        help="comma-separated splits trained on; with val among them nothing is held out: "
        "no val selection, a fixed --epochs schedule, the last epoch saved as final.pt",
    )
    p.add_argument(
        "--rare-crop-p",
        type=float,
        default=0.0,
        help="probability of a crop centred on a pixel of a rare class (0: uniform crops)",
    )
    p.add_argument(
        "--rare-classes",
        default=RARE_CLASSES,
        help="NAME:WEIGHT,... relative odds of the class a rare crop centres on (others 0)",
    )
    p.add_argument(
        "--jitter", type=float, default=0.25, help="brightness/contrast/saturation +- fraction"
    )
    p.add_argument("--hue", type=float, default=0.0, help="max hue rotation, degrees")
    p.add_argument("--blur-p", type=float, default=0.0, help="Gaussian blur probability")
    p.add_argument("--noise", type=float, default=0.0, help="max Gaussian noise sigma (0..255)")
    p.add_argument(
        "--ohem-keep",
        type=float,
        default=1.0,
        help="fraction of the hardest valid pixels CE averages over (1: plain CE)",
    )
    p.add_argument("--ohem-min-kept", type=int, default=0, help="OHEM keeps at least this many")
    p.add_argument("--lovasz-weight", type=float, default=0.0, help="weight of Lovász-softmax")
    p.add_argument(
        "--lovasz-pixels",
        type=int,
        default=65536,
        help="valid pixels per batch Lovász is computed on, drawn at random (0: all)",
    )
    p.add_argument("--dice-weight", type=float, default=0.0, help="weight of the soft dice term")
    p.add_argument(
        "--recipe-from", default=None, help="a checkpoint whose recipe sets the defaults"
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="stop after this epoch in this invocation (the schedule stays --epochs)",
    )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def recipe_of(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The recipe part of a run's arguments (JSON-ready)."""
    items = vars(args).items() if isinstance(args, argparse.Namespace) else args.items()
    return {k: _plain(v) for k, v in sorted(items) if k not in OPERATIONAL}


def splits_of(args: argparse.Namespace) -> tuple[str, ...]:
    splits = tuple(s.strip() for s in str(args.train_splits).split(",") if s.strip())
    if not splits or len(set(splits)) != len(splits):
        raise ValueError(f"--train-splits {args.train_splits!r}: give distinct split names")
    return splits


def holds_out_val(args: argparse.Namespace) -> bool:
    """True when val is not trained on, so val selection is honest."""
    return "val" not in splits_of(args)


def parse_class_weights(text: str) -> tuple[float, ...]:
    """``NAME:WEIGHT,...`` -> one weight per class id (unnamed classes 0)."""
    weights = [0.0] * data.NUM_CLASSES
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition(":")
        if name not in data.CLASS_NAMES:
            raise ValueError(f"rare class {name[:40]!r} is not one of {list(data.CLASS_NAMES)}")
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            raise ValueError(f"rare class weight {value[:40]!r} is not a number") from None
        if weight < 0:
            raise ValueError(f"rare class weight {weight} for {name} is negative")
        weights[data.CLASS_NAMES.index(name)] = weight
    return tuple(weights)


def data_fingerprint(root: str | Path, splits: Sequence[str], limit: int = 0) -> dict[str, Any]:
    """Per split: frame count and a SHA-256 of the frame and label file names and sizes."""
    out: dict[str, Any] = {}
    for split in splits:
        digest = hashlib.sha256()
        files = data.split_files(root, split, limit)
        for f in files:
            label = Path(root) / f"{split}annot" / f.name
            size = label.stat().st_size if label.exists() else -1
            digest.update(f"{f.name}:{f.stat().st_size}:{size}\n".encode())
        out[split] = {"frames": len(files), "sha256": digest.hexdigest()[:16]}
    return out


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume(
    checkpoint: Mapping[str, Any],
    args: argparse.Namespace,
    defaults: Mapping[str, Any],
    fingerprint: Mapping[str, Any],
) -> None:
    """Raise RecipeMismatch unless ``checkpoint`` was trained with this recipe on this data.

    A key the checkpoint lacks (an older recipe) counts as its default value.
    """
    saved = recipe_of(checkpoint.get("args", {}))
    current = recipe_of(args)
    base = recipe_of(defaults)
    diffs = [
        f"{key}: checkpoint {_short(saved.get(key, base.get(key)))}, now {_short(value)}"
        for key, value in current.items()
        if saved.get(key, base.get(key)) != value
    ]
    diffs += [
        f"{key}: checkpoint {_short(saved[key])}, now absent"
        for key in saved.keys() - current.keys()
    ]
    old = checkpoint.get("data_fingerprint")
    if old is not None and old != dict(fingerprint):
        diffs.append(f"data: checkpoint {_short(old)}, now {_short(fingerprint)}")
    if diffs:
        shown = "; ".join(diffs[:_MAX_SHOWN])
        more = f" (and {len(diffs) - _MAX_SHOWN} more)" if len(diffs) > _MAX_SHOWN else ""
        raise RecipeMismatch(
            f"refusing to resume: the checkpoint's recipe differs: {shown}{more}; "
            "start a new --out or re-run with the checkpoint's flags"
        )


def best_run(run_dirs: Sequence[str | Path]) -> tuple[Path, float]:
    """The finished run with the highest val mIoU in its log.jsonl, and that mIoU."""
    best: tuple[Path, float] | None = None
    for run in map(Path, run_dirs):
        log = run / "log.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        info = json.loads((run / "run.json").read_text())
        epochs = int(info["args"]["epochs"])
        if not records or not epochs or records[-1]["epoch"] < epochs:
            raise RuntimeError(f"{run} is unfinished ({len(records)} epochs logged)")
        scored = [float(r["val_miou"]) for r in records if "val_miou" in r]
        if not scored:
            raise RuntimeError(f"{run} logged no val mIoU (trained on val?)")
        if best is None or max(scored) > best[1]:
            best = (run, max(scored))
    if best is None:
        raise RuntimeError("no run directories given")
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m segserve_server.training.recipe")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("best", help="print the finished run with the best val mIoU")
    b.add_argument("runs", nargs="+")
    args = p.parse_args(argv)
    try:
        run, miou = best_run(args.runs)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        print(f"recipe best: {exc}", file=sys.stderr)
        return 1
    print(f"best: {run} (val mIoU {miou:.4f})", file=sys.stderr)
    print(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
