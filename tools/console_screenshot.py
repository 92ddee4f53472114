"""Takes docs/images/console.png: the browser console of a real server (the bundled models of
model_repository/) after a real CamVid val frame was dropped in, with live rates.

Needs the system Chromium (/usr/bin/chromium), Playwright (the test extra) and CamVid at
../shared/data/camvid (or $SEGSERVE_CAMVID). Not run in CI:

    .venv/bin/python tools/console_screenshot.py [--model deeplabv3plus_camvid] [-o PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from PIL import Image  # noqa: E402
from playwright.async_api import async_playwright  # noqa: E402

from segserve_server.server import Server  # noqa: E402
from segserve_server.settings import Settings  # noqa: E402
from tests.test_console import CHROMIUM, CHROMIUM_ARGS, drop_file  # noqa: E402

CAMVID = Path(os.environ.get("SEGSERVE_CAMVID", ROOT.parent / "shared" / "data" / "camvid"))
__all__ = ["main", "take"]


async def take(model: str, other: str, output: Path, data: bytes, name: str) -> int:
    """Serves model_repository/, drops image `data` (file `name`) into the console (model
    `model`; `other` gets requests too, for the live panel), writes the screenshot."""
    settings = Settings(
        model_repository=ROOT / "model_repository",
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        http_port=0,
        log_level="WARNING",
    )  # type: ignore[call-arg]
    server = Server(settings)
    await server.start()
    try:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            base = f"http://127.0.0.1:{server.http_port}"
            await page.goto(f"{base}/console/?model={model}&stats_ms=1000")
            await page.wait_for_selector(f'#models tr[data-model="{model}"][data-state="READY"]')
            await page.select_option("#model", model)
            # Frames over a few polls so that the live panel has rates and latency to show
            # (some for a second model, straight to the REST route).
            client = httpx.AsyncClient(base_url=base, timeout=60)
            for frames in range(1, 13):
                polls = int(await page.get_attribute("#live-panel", "data-polls") or 0)
                for _ in range(frames % 4):
                    response = await client.post(f"/v1/models/{other}/segment", content=data)
                    response.raise_for_status()
                for _ in range(1 + frames % 3):
                    answers = int(await page.get_attribute("#segment-panel", "data-answers") or 0)
                    await drop_file(page, data, name, "image/png")
                    await page.wait_for_function(
                        "n => Number(document.getElementById('segment-panel').dataset.answers) > n",
                        arg=answers,
                    )
                await page.wait_for_function(
                    "n => Number(document.getElementById('live-panel').dataset.polls) > n",
                    arg=polls,
                )
            await client.aclose()
            error = await page.is_visible("#error")
            if error:
                print(await page.inner_text("#error"), file=sys.stderr)
                return 1
            shot = await page.screenshot(full_page=True)
            await browser.close()
    finally:
        await server.stop(timeout_s=5)
    # A 256-colour palette keeps the file small (the UI is flat colours, the photo dithered).
    picture = Image.open(io.BytesIO(shot)).convert("RGB")
    small = io.BytesIO()
    picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(small, "PNG", optimize=True)
    await asyncio.to_thread(output.write_bytes, small.getvalue())
    print(f"wrote {output} ({small.tell()} bytes, {picture.width}x{picture.height})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deeplabv3plus_camvid")
    parser.add_argument("--other-model", default="unet_camvid")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs/images/console.png")
    parser.add_argument("--frame", type=Path, help="default: the first CamVid val frame")
    args = parser.parse_args()
    frame = args.frame or min((CAMVID / "val").glob("*.png"), default=None)
    if frame is None:
        print(f"no CamVid val frames under {CAMVID}", file=sys.stderr)
        return 2
    return asyncio.run(
        take(args.model, args.other_model, args.output, frame.read_bytes(), frame.name)
    )


if __name__ == "__main__":
    sys.exit(main())
