"""The client library and CLI against a real server on loopback (the sync client runs in a thread)."""

from __future__ import annotations

import asyncio
import json

import cv2
import numpy as np
import pytest

from segserve_client import (
    AsyncSegserveClient,
    FrameFailed,
    Segmentation,
    SegserveClient,
    SegserveError,
)
from segserve_client.cli import main as client_main
from segserve_client.masks import decode_png
from tests.conftest import H, W, encode, quadrant_image
from tests.harness.synthetic_models import COLOUR_PALETTE, expected_colour_labels

EXPECTED = expected_colour_labels(quadrant_image())


@pytest.fixture(scope="module")
def target(server) -> str:
    return f"127.0.0.1:{server.port}"


async def test_sync_client(target):
    def run() -> None:
        with SegserveClient(target, timeout_s=30) as client:
            client.wait_until_ready(timeout_s=10, model="colour")
            result = client.segment(encode(quadrant_image()), "colour", include_pixel_counts=True)
            np.testing.assert_array_equal(result.labels, EXPECTED)
            assert sum(c.pixel_count for c in result.classes) == W * H
            for encoding in ("png", "raw", "srle"):
                again = client.segment(quadrant_image(), "colour", encodings=encoding)
                np.testing.assert_array_equal(again.labels, EXPECTED)
            bgr = client.segment(quadrant_image()[:, :, ::-1], "colour", pixel_format="bgr")
            np.testing.assert_array_equal(bgr.labels, EXPECTED)
            frames = [(i, quadrant_image() if i != 2 else b"junk") for i in range(5)]
            answers = list(client.stream(frames, "colour"))
            assert [frame_id for frame_id, _ in answers] == [0, 1, 2, 3, 4]
            assert isinstance(answers[2][1], FrameFailed)
            last = answers[4][1]
            assert isinstance(last, Segmentation)
            np.testing.assert_array_equal(last.labels, EXPECTED)
            info = client.get_model("colour")
            assert info.palette[: len(COLOUR_PALETTE)] == list(COLOUR_PALETTE)
            assert {m.name for m in client.list_models()} >= {"colour", "broken_config"}
            with pytest.raises(SegserveError) as err:
                client.segment(b"junk", "colour")
            assert err.value.code.name == "INVALID_ARGUMENT"

    await asyncio.to_thread(run)


async def test_async_client(target):
    async with AsyncSegserveClient(target, timeout_s=30) as client:
        results = await asyncio.gather(
            *(client.segment(quadrant_image(), "colour") for _ in range(6))
        )
        for result in results:
            np.testing.assert_array_equal(result.labels, EXPECTED)
        answers = [
            a async for a in client.stream(((i, quadrant_image()) for i in range(4)), "colour")
        ]
        assert [frame_id for frame_id, _ in answers] == [0, 1, 2, 3]
        with pytest.raises(SegserveError) as err:
            await client.segment(quadrant_image(), "no_such_model")
        assert err.value.code.name == "NOT_FOUND"


async def test_cli_segment_writes_mask_and_overlay(target, tmp_path, capsys):
    image = cv2.resize(quadrant_image(), (W * 5, H * 5), interpolation=cv2.INTER_NEAREST)
    source = tmp_path / "street.png"
    source.write_bytes(encode(image))
    mask, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    argv = ["segment", str(source), "--model", "colour", "-o", str(mask), "--overlay", str(overlay)]
    code = await asyncio.to_thread(client_main, [*argv, "--server", target, "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["width"], summary["height"]) == (W * 5, H * 5)
    labels, palette = decode_png(mask.read_bytes())
    coloured = cv2.imread(str(mask), cv2.IMREAD_COLOR_RGB)
    blended = cv2.imread(str(overlay), cv2.IMREAD_COLOR_RGB)
    assert coloured is not None and blended is not None
    assert labels.shape == (H * 5, W * 5)
    assert (labels[10, 10], labels[-10, -10]) == (1, 4) and palette is not None
    assert tuple(coloured[10, 10]) == COLOUR_PALETTE[1]  # the palette shows the class colour
    assert blended.shape == image.shape
    expected_pixel = (0.5 * np.array(image[10, 10]) + 0.5 * np.array(COLOUR_PALETTE[1])).round()
    np.testing.assert_allclose(blended[10, 10], expected_pixel, atol=1)


async def test_cli_models_and_errors(target, capsys):
    assert await asyncio.to_thread(client_main, ["models", "--server", target]) == 0
    out = capsys.readouterr().out
    assert "colour" in out and "FAILED" in out
    assert await asyncio.to_thread(client_main, ["model", "colour", "--server", target]) == 0
    assert "bright" in capsys.readouterr().out
    code = await asyncio.to_thread(client_main, ["model", "nope", "--server", target])
    assert code == 1
    assert "NOT_FOUND" in capsys.readouterr().err
