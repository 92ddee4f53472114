"""The browser console (adapters/console/) in a real headless Chromium driven by Playwright,
against a real server's HTTP port: the model list with states, an image dropped in gets its
overlay (canvas pixels in the class colours) and the server's pixel counts, the confidence map
only for a model with one, a bad file's readable error, live rates from /v1/stats, the token.

Chromium is the system package (/usr/bin/chromium; `make test` installs it with apt-get where it
can); without it, or without Playwright, these tests skip and say why."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from segserve_server.server import Server
from tests.conftest import encode, make_settings, quadrant_image
from tests.harness.synthetic_models import (
    COLOUR_PALETTE,
    write_confidence_entry,
    write_entry,
)

CHROMIUM = Path(os.environ.get("SEGSERVE_CHROMIUM", "/usr/bin/chromium"))
# The flags of a browser that reaches nothing but the server under test.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "console-test-token-0123456789"
# Model input size, and the (larger) size of the images sent: masks come back at image size.
MH, MW = 48, 64
IH, IW = 96, 128
STAGES = ("decode", "preprocess", "queue", "infer", "postprocess", "encode", "total")
# Generous waits for the browser (events as gates; a backstop, not a timing assertion).
WAIT_MS = 30_000

if not CHROMIUM.is_file():
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install chromium, or `make test` as root)",
        allow_module_level=True,
    )
async_api = pytest.importorskip("playwright.async_api", reason="Playwright is not installed")

pytestmark = pytest.mark.timeout(90)


def write_console_repository(root: Path) -> Path:
    write_entry(root, "colour", MH, MW, max_batch_size=4)
    write_confidence_entry(root, "colour_confident", MH, MW, max_batch_size=4)
    broken = root / "broken_config"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('name: "broken_config" input [')
    return root


def http_base(server: Server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


async def start_server(root: Path, **overrides: object) -> Server:
    server = Server(make_settings(root, metrics_port=None, http_port=0, **overrides))
    await server.start()
    return server


@pytest.fixture(scope="module")
def console_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_console_repository(tmp_path_factory.mktemp("console-repository"))


@pytest.fixture(scope="module")
async def base_url(console_repository: Path) -> AsyncIterator[str]:
    server = await start_server(console_repository)
    yield http_base(server)
    await server.stop(timeout_s=5)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    async with async_api.async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        await chromium.close()


async def open_console(browser: Any, url: str) -> tuple[Any, Any, list[str]]:
    """A fresh context and page on the console with fast polls; its page errors (and requests
    to anywhere but `url`) are collected."""
    context = await browser.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(WAIT_MS)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # Nothing but the server itself is asked for anything (no CDN, no fonts).
    page.on(
        "request",
        lambda request: (
            None
            if request.url.startswith((f"{url}/", "data:", "blob:"))
            else errors.append(f"request to {request.url}")
        ),
    )
    await page.goto(f"{url}/console/?stats_ms=250&models_ms=500")
    return context, page, errors


@pytest.fixture
async def page(browser: Any, base_url: str) -> AsyncIterator[Any]:
    context, page, errors = await open_console(browser, base_url)
    await page.wait_for_selector('#models tr[data-model="colour"][data-state="READY"]')
    yield page
    await context.close()
    assert not errors, errors


async def answers(page: Any) -> int:
    return int(await page.get_attribute("#segment-panel", "data-answers") or 0)


async def wait_answers(page: Any, count: int) -> None:
    """Until the page has finished `count` segment requests (answer or error shown)."""
    await page.wait_for_function(
        "n => Number(document.getElementById('segment-panel').dataset.answers || 0) >= n", arg=count
    )


async def drop_file(page: Any, data: bytes, name: str, mime: str) -> None:
    """A real drop event on the drop zone, its DataTransfer holding a File built in the page."""
    await page.evaluate(
        """([b64, name, mime]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: mime }));
            const zone = document.getElementById("drop-zone");
            for (const type of ["dragenter", "dragover", "drop"]) {
                zone.dispatchEvent(
                    new DragEvent(type, { dataTransfer: transfer, bubbles: true, cancelable: true })
                );
            }
        }""",
        [base64.b64encode(data).decode(), name, mime],
    )


async def set_opacity(page: Any, value: float) -> None:
    await page.evaluate(
        """v => {
            const slider = document.getElementById("opacity");
            slider.value = String(v);
            slider.dispatchEvent(new Event("input", { bubbles: true }));
        }""",
        value,
    )


async def canvas_pixel(page: Any, canvas: str, x: int, y: int) -> list[int]:
    return list(
        await page.evaluate(
            """([id, x, y]) => Array.from(
                document.getElementById(id).getContext("2d").getImageData(x, y, 1, 1).data
            )""",
            [canvas, x, y],
        )
    )


async def server_answer(base_url: str, model: str, body: bytes, **query: str) -> httpx.Response:
    params = {"format": "json", "encodings": "png", "pixel_counts": "true", **query}
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        return await client.post(f"/v1/models/{model}/segment", params=params, content=body)


async def test_the_page_lists_the_models_with_their_states(page, base_url):
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        listed = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
    await page.wait_for_selector('#models tr[data-model="broken_config"]')
    rows = await page.eval_on_selector_all(
        "#models tbody tr",
        "rows => rows.map(r => [r.dataset.model, r.dataset.state,"
        " Array.from(r.cells).map(c => c.innerText.trim())])",
    )
    seen = {name: (state, cells) for name, state, cells in rows}
    assert set(seen) == set(listed)
    for name, model in listed.items():
        state, cells = seen[name]
        assert state == model["state"]
        assert cells[1].startswith(model["state"])
        if model["reason"]:
            assert model["reason"] in cells[1]
        assert cells[5] == ("yes" if model["has_confidence"] else "no")
    assert seen["colour"][0] == seen["colour_confident"][0] == "READY"
    assert seen["broken_config"][0] == "FAILED" and listed["broken_config"]["reason"]
    assert seen["colour"][1][2] == "1" and seen["colour"][1][3] == f"{MW}×{MH}"
    # Only READY models can be chosen to segment with.
    options = await page.eval_on_selector_all(
        "#model option", "os => os.map(o => [o.value, o.disabled])"
    )
    assert dict(options) == {"broken_config": True, "colour": False, "colour_confident": False}
    assert "127.0.0.1" in await page.inner_text("#server-info")


async def test_a_dropped_image_gets_its_overlay_and_the_servers_pixel_counts(page, base_url):
    image = quadrant_image(IH, IW)
    png = encode(image)
    await page.select_option("#model", "colour")
    assert await page.is_hidden("#confidence-toggle")
    await set_opacity(page, 1.0)
    before = await answers(page)
    await drop_file(page, png, "quadrants.png", "image/png")
    await wait_answers(page, before + 1)
    assert await page.is_hidden("#error")
    assert await page.is_visible("#overlay")
    size = await page.eval_on_selector("#overlay", "c => [c.width, c.height]")
    assert size == [IW, IH]
    # Quadrants red, green, blue, white are classes 1-4: at full opacity their class colours.
    centres = {1: (IW // 4, IH // 4), 2: (3 * IW // 4, IH // 4), 3: (IW // 4, 3 * IH // 4)}
    centres[4] = (3 * IW // 4, 3 * IH // 4)
    for class_id, (x, y) in centres.items():
        assert await canvas_pixel(page, "overlay", x, y) == [*COLOUR_PALETTE[class_id], 255]
    # Half opacity blends the image's own colour in (red 255 under class colour 220).
    await set_opacity(page, 0.5)
    red = await canvas_pixel(page, "overlay", IW // 4, IH // 4)
    expected = [
        round(0.5 * a + 0.5 * b) for a, b in zip((255, 0, 0), COLOUR_PALETTE[1], strict=True)
    ]
    assert all(abs(a - b) <= 1 for a, b in zip(red[:3], expected, strict=True)), red

    answer = (await server_answer(base_url, "colour", png)).json()
    shares = await page.eval_on_selector_all(
        "#shares tbody tr",
        "rows => rows.map(r => [Number(r.dataset.classId), Number(r.dataset.pixels),"
        " r.cells[2].innerText, r.cells[4].innerText])",
    )
    counts = answer["pixel_counts"]
    assert {c: n for c, n, _, _ in shares} == {c: n for c, n in enumerate(counts) if n}
    assert sum(n for _, n, _, _ in shares) == IW * IH
    for class_id, pixels, name, share in shares:
        assert name == answer["classes"][class_id]
        assert share == f"{100 * pixels / (IW * IH):.2f} %"
    assert sorted(c for c, *_ in shares) == [1, 2, 3, 4]
    stages = await page.eval_on_selector_all(
        "#timings tbody tr", "rs => rs.map(r => r.dataset.stage)"
    )
    assert stages == [s for s in STAGES if s in answer["timings_ms"]] + ["round_trip"]
    assert {"infer", "total"} <= set(stages)


async def test_the_confidence_map_is_offered_only_for_a_model_with_one(page):
    ramp = np.zeros((IH, IW, 3), np.uint8)
    ramp[:, :, 0] = np.linspace(0, 255, IW).astype(np.uint8)
    ramp[:, :, 1] = ramp[:, ::-1, 0]
    await page.select_option("#model", "colour_confident")
    assert await page.is_visible("#confidence-toggle")
    before = await answers(page)
    await page.set_input_files(
        "#file", files=[{"name": "ramp.png", "mimeType": "image/png", "buffer": encode(ramp)}]
    )
    await wait_answers(page, before + 1)
    assert await page.is_hidden("#error")
    assert await page.is_visible("#confidence")
    assert "mean" in await page.inner_text("#confidence-caption")
    assert await page.eval_on_selector("#confidence", "c => [c.width, c.height]") == [IW, IH]
    # Sure at the flat red end, unsure where red and green blend: different ramp colours.
    assert await canvas_pixel(page, "confidence", 2, IH // 2) != await canvas_pixel(
        page, "confidence", IW // 2, IH // 2
    )
    await page.uncheck("#show-confidence")
    assert await page.is_hidden("#confidence-figure")
    await page.check("#show-confidence")
    assert await page.is_visible("#confidence-figure")
    await page.select_option("#model", "colour")
    assert await page.is_hidden("#confidence-toggle")
    assert await page.is_hidden("#confidence-figure")


async def test_a_bad_file_shows_the_servers_message_and_status(page, base_url):
    junk = b"this is not an image, just some text"
    expected = await server_answer(base_url, "colour", junk)
    assert expected.status_code == 400
    body = expected.json()
    await page.select_option("#model", "colour")
    before = await answers(page)
    await page.set_input_files(
        "#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": junk}]
    )
    await wait_answers(page, before + 1)
    assert await page.is_visible("#error")
    text = await page.inner_text("#error")
    assert text == f"HTTP 400 {body['code']}: {body['error']}"
    assert body["code"] == "INVALID_ARGUMENT"
    assert await page.is_hidden("#result")


async def test_the_live_panel_shows_request_rates_and_latency(page, base_url):
    """Requests keep coming until the panel shows a rate and a p50 for them (the gate)."""
    png = encode(quadrant_image(IH, IW))
    shown = asyncio.Event()

    async def keep_asking() -> int:
        sent = 0
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            while not shown.is_set():
                response = await client.post(
                    "/v1/models/colour/segment", params={"format": "json"}, content=png
                )
                assert response.status_code == 200
                sent += 1
        return sent

    asking = asyncio.create_task(keep_asking())
    try:
        shown_cells = await page.wait_for_function(
            """() => {
                const row = document.querySelector('#live tr[data-model="colour"]');
                const cells = row && Array.from(row.cells).map(c => c.innerText);
                return cells && Number(row.dataset.rate) > 0 && cells[3] !== "—" && cells;
            }"""
        )
        cells = await shown_cells.json_value()
    finally:
        shown.set()
        sent = await asking
    assert sent > 0
    rate, errors, p50, p99, total = (float(c.replace(",", "")) for c in cells[1:6])
    assert rate > 0 and errors == 0 and 0 < p50 <= p99 and total >= 1
    # The sparkline has drawn something.
    drawn = await page.eval_on_selector(
        '#live tr[data-model="colour"] canvas',
        "c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(v => v > 0)",
    )
    assert drawn


async def test_a_server_with_tokens_needs_the_token_field(browser, console_repository):
    server = await start_server(console_repository, auth_tokens=f"console={TOKEN}")
    context, page, errors = await open_console(browser, http_base(server))
    try:
        await page.wait_for_function(
            "() => document.getElementById('models-panel').dataset.refreshes >= 1"
        )
        status = await page.inner_text("#status")
        assert "HTTP 401" in status and "UNAUTHENTICATED" in status
        assert await page.locator("#models tbody tr").count() == 0
        await page.fill("#token", TOKEN)
        await page.dispatch_event("#token", "change")
        await page.wait_for_selector('#models tr[data-model="colour"][data-state="READY"]')
        await page.wait_for_selector("#status", state="hidden")
        assert await page.evaluate("sessionStorage.getItem('segserve.token')") == TOKEN
    finally:
        await context.close()
        await server.stop(timeout_s=5)
    assert not errors, errors
