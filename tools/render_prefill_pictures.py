"""Renders the picture of docs/annotation.md: one CamVid val frame pre-filled by
`segserve-client prefill` in each tool's format (COCO, Label Studio, CVAT), each import file
decoded back, checked to give the same label map (the formats are lossless), and drawn over the
frame: what the annotator starts from in any of the tools. Reads the frame from
../shared/data/camvid (or $SEGSERVE_CAMVID); writes docs/images/prefill.jpg.

Usage: .venv/bin/python tools/render_prefill_pictures.py [--frame 0016E5_07959.png]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from segserve_client.cli import main as client_main
from segserve_client.exports import read_label_maps
from segserve_client.overlay import overlay
from segserve_server.model_repository import scan_repository
from segserve_server.server import Server
from segserve_server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
MODEL = "deeplabv3plus_camvid"
FILES = {"coco": "instances.json", "labelstudio": "tasks.json", "cvat": "annotations.zip"}


async def render(frame: Path, out_dir: Path) -> None:
    settings = Settings(
        model_repository=ROOT / "model_repository",
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        kserve_port=None,
        log_level="WARNING",
    )
    server = Server(settings)
    await server.start()
    config = next(e.config for e in scan_repository(ROOT / "model_repository") if e.name == MODEL)
    assert config is not None
    names = {c.name: c.id for c in config.classes}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            images = Path(scratch) / "images"
            images.mkdir()
            shutil.copy(frame, images / frame.name)
            picture = cv2.cvtColor(cv2.imread(str(frame)), cv2.COLOR_BGR2RGB)
            decoded = []
            for fmt, name in FILES.items():
                target = Path(scratch) / name
                argv = ["prefill", str(images), "--model", MODEL, "--format", fmt, "-o",
                        str(target), "--server", f"127.0.0.1:{server.port}"]  # fmt: skip
                code = await asyncio.to_thread(client_main, argv)
                if code != 0:
                    raise SystemExit(f"prefill --format {fmt} exited {code}")
                decoded.append(read_label_maps(target, names)[frame.stem])
            for fmt, labels in zip(FILES, decoded, strict=True):
                if not np.array_equal(labels, decoded[0]):
                    raise SystemExit(f"the {fmt} file decodes to another label map")
            drawn = overlay(picture, decoded[0].astype(np.uint8), config.palette, alpha=0.55)
            path = out_dir / "prefill.jpg"
            cv2.imwrite(str(path), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 80])  # fmt: skip
            print(f"wrote {path}: the {', '.join(FILES.values())} files decode to this map")
    finally:
        await server.stop(timeout_s=5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frame", default="0016E5_07959.png")
    args = parser.parse_args()
    camvid = Path(os.environ.get("SEGSERVE_CAMVID", ROOT.parent / "shared" / "data" / "camvid"))
    frame = camvid / "val" / args.frame
    if not frame.is_file():
        print(f"no CamVid frame at {frame}", file=sys.stderr)
        return 1
    asyncio.run(render(frame, ROOT / "docs" / "images"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
