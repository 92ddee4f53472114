"""Train a CamVid segmentation model from scratch on the CPU, resumably.

Example (the bundled models' exact commands are in ``tools/train_bundled.sh``)::

    PYTHONPATH=server python -m segserve_server.training.train \\
        --data ../shared/data/camvid --model deeplabv3plus --epochs 200 \\
        --out runs/deeplabv3plus --resume

Every epoch writes ``<out>/last.pt`` (model, optimiser, scheduler, RNG state,
epoch, history, best val mIoU, normalisation, class names/colours, serving
input size, the full arguments, the recipe and a data fingerprint) atomically,
``<out>/best.pt`` when val mIoU improves, and appends one JSON line to
``<out>/log.jsonl``; ``<out>/run.json`` holds the arguments.  A killed run
continues from ``last.pt`` when restarted with ``--resume`` (on another machine
too: nothing in it depends on paths), and the same result comes out as without
the kill; a checkpoint of another recipe is refused, naming the differences
(:mod:`.recipe`).  Validation runs in float32 on the full val split at the
serving size (``--size``), void pixels ignored.

``--train-splits train,val`` (final weights): nothing is held out, so there is
no val selection: the run trains its fixed ``--epochs`` and writes the last
epoch as ``<out>/final.pt`` (``"selection": "last epoch"`` in its metadata).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from . import data, recipe
from .losses import SegLoss
from .models import MODELS, build_model
from .scores import Scores, confusion_matrix

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is optional
    tqdm = None

__all__ = [
    "atomic_save",
    "build_parser",
    "evaluate",
    "lr_factor",
    "main",
    "metadata",
    "param_groups",
    "parse_args",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/camvid", help="CamVid root directory")
    p.add_argument("--model", choices=sorted(MODELS), help="required unless --recipe-from")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--warmup-epochs", type=float, default=3.0)
    p.add_argument("--crop", type=int, nargs=2, default=(256, 320), metavar=("H", "W"))
    p.add_argument("--scale", type=float, nargs=2, default=(0.6, 1.6), metavar=("MIN", "MAX"))
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=data.NATIVE_SIZE,
        metavar=("H", "W"),
        help="serving/validation input size (default: native 360 480)",
    )
    p.add_argument(
        "--class-weight", choices=("sqrt-median", "median", "none"), default="sqrt-median"
    )
    p.add_argument("--out", required=True, help="checkpoint/log directory")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt if any")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bfloat16 autocast for training steps (validation stays float32)",
    )
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="use only N frames per split (smoke tests)")
    recipe.add_recipe_args(p)
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments; ``--recipe-from CKPT`` makes that checkpoint's recipe the defaults."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.recipe_from:
        ck = torch.load(args.recipe_from, map_location="cpu", weights_only=False)
        known = vars(args).keys()
        p.set_defaults(**{k: v for k, v in recipe.recipe_of(ck["args"]).items() if k in known})
        args = p.parse_args(argv)
    if args.model is None:
        p.error("--model is required (or --recipe-from a checkpoint)")
    return args


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay for biases and BatchNorm parameters."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, size: tuple[int, int], bs: int = 4
) -> np.ndarray:
    """Confusion matrix over a split at input ``size`` (labels resized with nearest)."""
    model.eval()
    conf = np.zeros((data.NUM_CLASSES, data.NUM_CLASSES), dtype=np.int64)
    for i in range(0, len(images), bs):
        pairs = [
            data.resize_pair(im, lb, size)
            for im, lb in zip(images[i : i + bs], labels[i : i + bs], strict=True)
        ]
        x = torch.from_numpy(data.normalize(np.stack([p[0] for p in pairs])))
        pred = model(x.contiguous(memory_format=torch.channels_last)).argmax(1).numpy()
        conf += confusion_matrix(pred, np.stack([p[1] for p in pairs]), data.NUM_CLASSES)
    return conf


def metadata(args: argparse.Namespace) -> dict[str, Any]:
    """What the service needs to run the model, stored in every checkpoint."""
    return {
        "arch": args.model,
        "num_classes": data.NUM_CLASSES,
        "class_names": list(data.CLASS_NAMES),
        "class_colors": [list(c) for c in data.CLASS_COLORS],
        "ignore_index": data.IGNORE_INDEX,
        "input_size": list(args.size),  # (height, width) at serving time
        "normalization": {
            "color_order": "RGB",
            "scale": 1.0 / 255.0,
            "mean": list(data.MEAN),
            "std": list(data.STD),
        },
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "recipe": recipe.recipe_of(args),
        "train_splits": list(recipe.splits_of(args)),
        "selection": "best val mIoU"
        if recipe.holds_out_val(args)
        else "last epoch of a fixed schedule (val trained on: no val selection)",
        "license": "trained on CamVid (CC BY-NC 4.0, Brostow et al. 2009): non-commercial use",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = (args.size[0], args.size[1])

    splits, held_out = recipe.splits_of(args), recipe.holds_out_val(args)
    fingerprint = recipe.data_fingerprint(args.data, splits, args.limit)
    last = out / "last.pt"
    ck: dict[str, Any] | None = None
    if args.resume and last.exists():  # checked before anything is loaded or written
        ck = torch.load(last, map_location="cpu", weights_only=False)
        defaults = vars(build_parser().parse_args(["--model", args.model, "--out", "."]))
        try:
            recipe.check_resume(ck, args, defaults, fingerprint)
        except recipe.RecipeMismatch as exc:
            print(f"{out}: {exc}", file=sys.stderr, flush=True)
            return 2
    train_x, train_y = data.load_splits(args.data, splits, args.limit)
    val_x: np.ndarray | None = None
    val_y: np.ndarray | None = None
    if held_out:
        val_x, val_y = data.load_split(args.data, "val", args.limit)
    weights = data.class_weights(train_y, args.class_weight)
    augment = data.Augment(
        crop=(args.crop[0], args.crop[1]),
        scale=(args.scale[0], args.scale[1]),
        jitter=args.jitter,
        rare_p=args.rare_crop_p,
        rare_weights=recipe.parse_class_weights(args.rare_classes),
        hue_deg=args.hue,
        blur_p=args.blur_p,
        noise=args.noise,
    )

    torch.manual_seed(args.seed)
    model = build_model(args.model, data.NUM_CLASSES)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    steps_per_epoch = len(train_x) // args.batch_size
    total = steps_per_epoch * args.epochs
    warmup = max(1, round(args.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total))
    rng = np.random.default_rng(args.seed)
    start, best, history = 0, -1.0, []

    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        rng.bit_generator.state = ck["numpy_rng"]
        torch.set_rng_state(ck["torch_rng"])
        start, history = ck["epoch"], ck["history"]
        best = -1.0 if ck["best_miou"] is None else ck["best_miou"]
        if (out / "best.pt").exists():  # it may be newer than last.pt if killed in between
            best = max(best, torch.load(out / "best.pt", weights_only=False)["val_miou"])
        scored = f"best val mIoU {best:.4f}" if best >= 0 else "no val scored"
        print(f"resumed from {last} after epoch {start} ({scored})", flush=True)
    # The log mirrors the checkpoint's history, so a kill between the two writes loses nothing.
    with open(out / "log.jsonl.tmp", "w") as f:
        f.writelines(json.dumps(h) + "\n" for h in history)
    os.replace(out / "log.jsonl.tmp", out / "log.jsonl")
    run_info = {"args": metadata(args)["args"], "recipe": recipe.recipe_of(args)}
    run_info |= {"argv": sys.argv[1:] if argv is None else argv, "data": fingerprint}
    (out / "run.json").write_text(json.dumps(run_info, indent=1) + "\n")
    if not held_out:
        print(
            f"training on {'+'.join(splits)}: val is trained on, so there is no val selection; "
            f"a fixed {args.epochs}-epoch schedule, the last epoch saved as {out / 'final.pt'}",
            flush=True,
        )

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.model}: {n_params / 1e6:.2f}M params, {len(train_x)} train ({'+'.join(splits)})"
        f" / {len(val_x) if val_x is not None else 0} val, "
        f"{steps_per_epoch} steps/epoch, epochs {start + 1}..{args.epochs}, "
        f"class weights {[round(float(w), 2) for w in weights]}",
        flush=True,
    )
    criterion = SegLoss(
        torch.from_numpy(weights),
        data.IGNORE_INDEX,
        ohem_keep=args.ohem_keep,
        ohem_min_kept=args.ohem_min_kept,
        lovasz_weight=args.lovasz_weight,
        dice_weight=args.dice_weight,
        lovasz_pixels=args.lovasz_pixels,
    )
    interactive = sys.stderr.isatty()
    stop = min(args.epochs, args.stop_after) if args.stop_after > 0 else args.epochs

    for epoch in range(start + 1, stop + 1):
        model.train()
        t0 = time.time()
        order = rng.permutation(len(train_x))
        steps = range(steps_per_epoch)
        bar = None
        if tqdm is not None:
            bar = tqdm(
                steps,
                desc=f"epoch {epoch}/{args.epochs}",
                mininterval=1 if interactive else 60,
                dynamic_ncols=True,
                leave=interactive,
            )
            steps = bar
        run_loss = 0.0
        for step in steps:
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            batch = [augment(train_x[i], train_y[i], rng) for i in idx]
            x = torch.from_numpy(np.stack([b[0] for b in batch])).contiguous(
                memory_format=torch.channels_last
            )
            y = torch.from_numpy(np.stack([b[1] for b in batch]))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(x)
            loss = criterion(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += loss.item()
            if bar is not None:
                bar.set_postfix(
                    loss=f"{run_loss / (step + 1):.4f}",
                    lr=f"{sched.get_last_lr()[0]:.2e}",
                    refresh=False,
                )
        if bar is not None:
            bar.close()
        train_s = time.time() - t0
        record: dict[str, Any] = {
            "epoch": epoch,
            "loss": run_loss / steps_per_epoch,
            "lr": sched.get_last_lr()[0],
            "train_s": round(train_s, 1),
        }
        scored = epoch % args.eval_every == 0 or epoch == args.epochs
        if val_x is not None and val_y is not None and scored:
            t1 = time.time()
            scores = Scores.from_confusion(evaluate(model, val_x, val_y, size))
            iou, miou = scores.iou, scores.miou  # the definition `segserve eval` reports
            record.update(
                val_miou=miou,
                val_iou={n: round(float(v), 4) for n, v in zip(data.CLASS_NAMES, iou, strict=True)},
                eval_s=round(time.time() - t1, 1),
            )
            if miou > best:
                best = miou
                record["best"] = True
                atomic_save(
                    {
                        "model": model.state_dict(),
                        "epoch": epoch,
                        "val_miou": miou,
                        "val_iou": record["val_iou"],
                        **metadata(args),
                    },
                    out / "best.pt",
                )
        history.append(record)
        atomic_save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "numpy_rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch,
                "best_miou": best if held_out else None,
                "history": history,
                "data_fingerprint": fingerprint,
                **metadata(args),
            },
            last,
        )
        if not held_out and epoch == args.epochs:
            final = {"model": model.state_dict(), "epoch": epoch, **metadata(args)}
            atomic_save(final | {"data_fingerprint": fingerprint}, out / "final.pt")
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        msg = f"epoch {epoch}/{args.epochs} loss {record['loss']:.4f} train {train_s:.0f}s"
        if "val_miou" in record:
            per_class = " ".join(f"{n}={v:.2f}" for n, v in record["val_iou"].items())
            msg += f" | val mIoU {record['val_miou']:.4f} (best {best:.4f}) eval {record['eval_s']:.0f}s | {per_class}"
        print(msg, flush=True)
    if stop < args.epochs:
        print(f"stopped after epoch {stop} of {args.epochs} (--stop-after); --resume goes on")
    elif held_out:
        print(f"done: best val mIoU {best:.4f}; checkpoints in {out}", flush=True)
    else:
        print(f"done: {args.epochs} epochs on {'+'.join(splits)}; {out / 'final.pt'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
