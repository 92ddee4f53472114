"""Export trained segmentation models to ONNX with the argmax inside the graph.

The exported graph has one input ``image`` (float32, N x 3 x H x W, already
normalised, dynamic batch axis) and one output ``labels`` (uint8, N x H x W):
class logits are reduced with ArgMax over the class axis and cast to uint8, so
the service never ships logits around.

Command line (exports a training checkpoint and checks it against torch on
CamVid val frames)::

    PYTHONPATH=server python -m segserve_server.training.onnx_export \\
        runs/deeplabv3plus/best.pt model_repository/deeplabv3plus/1/model.onnx
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "LabelsHead",
    "check_against_torch",
    "export_onnx",
    "load_checkpoint",
    "main",
]


class LabelsHead(nn.Module):
    """Wrap a logits model so that it returns uint8 class labels (N, H, W)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(image)
        return logits.argmax(dim=1).to(torch.uint8)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    height: int,
    width: int,
    opset: int = 17,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` (put in eval mode, on CPU) as ONNX to ``path``; returns the path.

    Uses the TorchScript-based exporter with a dynamic batch axis.  ``metadata``
    is stored as ONNX ``metadata_props``; the output shape is fixed to
    (batch, height, width).  The file is written under a temporary
    name first and then moved into place.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = LabelsHead(model).cpu().eval()
    dummy = torch.zeros(1, 3, height, width, dtype=torch.float32)
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad():
        torch.onnx.export(
            head,
            (dummy,),
            str(tmp),
            input_names=["image"],
            output_names=["labels"],
            dynamic_axes={"image": {0: "batch"}, "labels": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load(str(tmp))
    # The tracer leaves the output's H, W symbolic; they are fixed, so say so.
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    dims[1].dim_value, dims[2].dim_value = height, width
    if metadata:
        onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return path


def check_against_torch(
    model: nn.Module, onnx_path: str | os.PathLike[str], images: np.ndarray | torch.Tensor
) -> float:
    """Fraction of pixels where onnxruntime's labels equal torch's argmax.

    ``images`` is a normalised float32 batch (N, 3, H, W) at the exported size.
    """
    import onnxruntime as ort

    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    with torch.no_grad():
        ref = model.cpu().eval()(x).argmax(dim=1).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(["labels"], {"image": x.numpy()})
    if out.dtype != np.uint8 or out.shape != ref.shape:
        raise ValueError(f"unexpected ONNX output {out.dtype} {out.shape}, want uint8 {ref.shape}")
    return float((out == ref).mean())


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by ``train.py`` (``best.pt`` or ``last.pt``) in eval mode.

    Returns the model and the checkpoint's metadata (everything but tensors).
    """
    from .models import build_model

    ck = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(ck["arch"], ck["num_classes"])
    model.load_state_dict(ck["model"])
    skip = {"model", "optimizer", "scheduler", "numpy_rng", "torch_rng", "history"}
    return model.eval(), {k: v for k, v in ck.items() if k not in skip}


def main(argv: list[str] | None = None) -> int:
    from . import data

    p = argparse.ArgumentParser(description="Export a training checkpoint to ONNX and check it.")
    p.add_argument("checkpoint")
    p.add_argument("onnx")
    p.add_argument("--data", default="../shared/data/camvid", help="CamVid root (for the check)")
    p.add_argument("--check", type=int, default=4, help="val frames to compare (0: skip)")
    p.add_argument("--opset", type=int, default=17)
    args = p.parse_args(argv)

    torch.set_num_threads(2)
    model, meta = load_checkpoint(args.checkpoint)
    height, width = meta["input_size"]
    props: dict[str, str] = {
        k: json.dumps(meta[k])
        for k in ("arch", "class_names", "class_colors", "normalization", "input_size", "epoch")
        if k in meta
    }
    props["val_miou"] = f"{meta.get('val_miou', meta.get('best_miou', float('nan'))):.4f}"
    props["license"] = meta.get("license", "")
    export_onnx(model, args.onnx, height, width, args.opset, props)
    size_mb = Path(args.onnx).stat().st_size / 1e6
    print(f"wrote {args.onnx} ({size_mb:.1f} MB), {meta['arch']} at {height}x{width}")
    if args.check:
        frames, labels = data.load_split(args.data, "val")
        pairs = [
            data.resize_pair(f, lb, (height, width)) for f, lb in zip(frames, labels, strict=True)
        ]
        x = data.normalize(np.stack([im for im, _ in pairs[: args.check]]))
        agree = check_against_torch(model, args.onnx, x)
        print(f"onnxruntime vs torch label agreement on {len(x)} val frames: {agree:.6f}")
        if agree < 0.999:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
