"""The client library without a segserve server: requests, answers, overlays, the CLI, imports.

The last part runs the clients against an in-process fake of the Segmentation service (canned
answers, no models) to check what goes over the wire; the real server is tested elsewhere.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from segserve.v1 import segserve_pb2 as pb
from segserve_client import (
    AsyncSegserveClient,
    FrameFailed,
    Segmentation,
    SegserveClient,
    SegserveError,
    cli,
)
from segserve_client.errors import status_code
from segserve_client.masks import MaskDecodeError, encode_png, encode_srle
from segserve_client.overlay import color_table, colorize, default_colors, overlay, resize_nearest
from segserve_client.types import (
    ModelInfo,
    ModelSummary,
    ReadinessWait,
    RequestFeed,
    SegmentOptions,
    image_proto,
    stream_result,
)

LABELS = np.zeros((6, 8), dtype=np.uint8)
LABELS[:3, 4:] = 1
LABELS[3:, :4] = 2
LABELS[3:, 4:] = 3
COLOURS = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)]
NAMES = ["background", "red", "green", "blue"]


def rgb_image(height: int = 6, width: int = 8) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_encoded_bytes_are_sent_as_they_are(kind: type) -> None:
    assert image_proto(kind(b"\xff\xd8jpeg")) == pb.Image(encoded=b"\xff\xd8jpeg")


def test_a_path_sends_the_file(tmp_path: Path) -> None:
    path = tmp_path / "frame.png"
    path.write_bytes(b"\x89PNG...")
    assert image_proto(path).encoded == b"\x89PNG..."
    assert image_proto(str(path)).encoded == b"\x89PNG..."
    with pytest.raises(FileNotFoundError):
        image_proto(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        image_proto(tmp_path / "empty.png")


@pytest.mark.parametrize(
    ("pixel_format", "expected"),
    [("rgb", pb.PIXEL_FORMAT_RGB8), ("bgr", pb.PIXEL_FORMAT_BGR8), ("BGR", pb.PIXEL_FORMAT_BGR8)],
)
def test_colour_arrays_are_raw_pixels(pixel_format: str, expected: int) -> None:
    image = rgb_image(5, 7)
    raw = image_proto(image, pixel_format).raw
    assert (raw.width, raw.height, raw.format) == (7, 5, expected)
    assert raw.pixels == image.tobytes()


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1)])
def test_grey_arrays_are_gray8(shape: tuple[int, ...]) -> None:
    image = np.arange(35, dtype=np.uint8).reshape(shape)
    raw = image_proto(image, "bgr").raw  # the colour order does not matter for grey
    assert (raw.width, raw.height, raw.format) == (7, 5, pb.PIXEL_FORMAT_GRAY8)
    assert raw.pixels == bytes(range(35))


def test_non_contiguous_arrays_are_sent_row_major() -> None:
    image = rgb_image(6, 10)[:, ::2]
    raw = image_proto(image).raw
    assert raw.width == 5
    assert raw.pixels == np.ascontiguousarray(image).tobytes()


@pytest.mark.parametrize(
    ("image", "pixel_format", "message"),
    [
        (np.zeros((4, 4, 3), np.float32), "rgb", "must be uint8"),
        (np.zeros((4, 4, 3), np.uint16), "rgb", "must be uint8"),
        (np.zeros((4, 4, 4), np.uint8), "rgb", r"\(H, W, 3\) colour or \(H, W\) grey"),
        (np.zeros((4, 4, 3, 1), np.uint8), "rgb", "got shape"),
        (np.zeros(12, np.uint8), "rgb", "got shape"),
        (np.zeros((0, 4, 3), np.uint8), "rgb", "empty"),
        (np.zeros((4, 4, 3), np.uint8), "rgba", "unknown pixel format 'rgba'"),
        (b"", "rgb", "empty"),
    ],
)
def test_bad_images_raise_value_error(image: object, pixel_format: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        image_proto(image, pixel_format)  # type: ignore[arg-type]


def test_other_types_raise_type_error() -> None:
    with pytest.raises(TypeError, match="not int"):
        image_proto(42)  # type: ignore[arg-type]


def test_segment_options_defaults() -> None:
    request = SegmentOptions.create("roadseg").request(b"jpeg")
    assert request.model == "roadseg" and request.model_version == 0
    assert list(request.encodings) == [pb.MASK_ENCODING_SRLE]
    assert request.output_size == pb.OUTPUT_SIZE_ORIGINAL
    assert not request.include_pixel_counts and not request.embed_palette


def test_segment_options_by_name_and_number() -> None:
    options = SegmentOptions.create(
        "roadseg",
        version=3,
        encodings=["PNG", pb.MASK_ENCODING_RAW, "srle"],
        output_size="model",
        include_pixel_counts=True,
        embed_palette=True,
        pixel_format="bgr",
    )
    request = options.request(rgb_image())
    assert request.model_version == 3
    assert list(request.encodings) == [
        pb.MASK_ENCODING_PNG,
        pb.MASK_ENCODING_RAW,
        pb.MASK_ENCODING_SRLE,
    ]
    assert request.output_size == pb.OUTPUT_SIZE_MODEL
    assert request.include_pixel_counts and request.embed_palette
    assert request.image.raw.format == pb.PIXEL_FORMAT_BGR8
    assert SegmentOptions.create("m", encodings="png").encodings == (pb.MASK_ENCODING_PNG,)
    assert SegmentOptions.create("m", output_size=2).output_size == pb.OUTPUT_SIZE_MODEL


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"encodings": ["srle", "srle"]}, "once"),
        ({"encodings": ["jpeg"]}, "unknown mask encoding 'jpeg'"),
        ({"encodings": [0]}, "unknown mask encoding 0"),
        ({"encodings": [True]}, "unknown mask encoding True"),
        ({"output_size": "huge"}, "unknown output size"),
        ({"version": -1}, "version"),
        ({"pixel_format": "yuv"}, "unknown pixel format"),
    ],
)
def test_bad_segment_options_raise(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SegmentOptions.create("m", **options)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model name"):
        SegmentOptions.create("")


def test_request_feed_keeps_the_error_of_a_bad_frame() -> None:
    options = SegmentOptions.create("m")
    feed = RequestFeed([(1, b"a"), (2, np.zeros((2, 2), np.float64)), (3, b"c")], options)
    assert [r.frame_id for r in feed.requests()] == [1]
    with pytest.raises(ValueError, match="uint8"):
        feed.raise_error()


async def test_request_feed_takes_async_frames() -> None:
    async def frames() -> AsyncIterator[tuple[int, bytes]]:
        for i in range(3):
            yield i, b"x"

    feed = RequestFeed(frames(), SegmentOptions.create("m"))
    assert [r.frame_id async for r in feed.arequests()] == [0, 1, 2]
    feed.raise_error()
    with pytest.raises(TypeError, match="async"):
        RequestFeed(frames(), SegmentOptions.create("m")).requests()


# ----------------------------------------------------------------------------------------------
# Answers
# ----------------------------------------------------------------------------------------------


def response_with(*masks: tuple[Any, bytes], width: int = 8, height: int = 6) -> pb.SegmentResponse:
    return pb.SegmentResponse(
        width=width,
        height=height,
        masks=[pb.EncodedMask(encoding=e, data=d) for e, d in masks],
        classes=[pb.ClassPresence(class_id=i, name=NAMES[i], pixel_count=12) for i in range(4)],
        model="colour",
        model_version=2,
        timings=pb.StageTimings(decode_us=1, infer_us=5, total_us=9, batch_size=4),
    )


ENCODED = {
    "srle": (pb.MASK_ENCODING_SRLE, encode_srle(LABELS)),
    "png": (pb.MASK_ENCODING_PNG, encode_png(LABELS)),
    "png-palette": (pb.MASK_ENCODING_PNG, encode_png(LABELS, palette=COLOURS)),
    "raw": (pb.MASK_ENCODING_RAW, LABELS.tobytes()),
}


@pytest.mark.parametrize("encoding", list(ENCODED))
def test_labels_decode_from_each_encoding(encoding: str) -> None:
    result = Segmentation.from_proto(response_with(ENCODED[encoding]))
    np.testing.assert_array_equal(result.labels, LABELS)
    assert result.labels.dtype == np.uint8
    assert not result.labels.flags.writeable
    assert result.labels is result.labels  # decoded once


def test_segmentation_fields() -> None:
    result = Segmentation.from_proto(response_with(ENCODED["raw"], ENCODED["srle"]))
    assert list(result.masks) == ["raw", "srle"]
    assert (result.width, result.height, result.model, result.model_version) == (8, 6, "colour", 2)
    assert [c.name for c in result.classes] == NAMES
    assert result.classes[1].class_id == 1 and result.classes[1].pixel_count == 12
    assert (result.timings.decode_us, result.timings.infer_us, result.timings.total_us) == (1, 5, 9)
    assert result.timings.batch_size == 4 and result.timings.queue_us == 0


def test_labels_decode_the_first_mask() -> None:
    broken = (pb.MASK_ENCODING_SRLE, b"SRL1 broken")
    first_good = Segmentation.from_proto(response_with(ENCODED["raw"], broken))
    np.testing.assert_array_equal(first_good.labels, LABELS)
    with pytest.raises(MaskDecodeError):
        _ = Segmentation.from_proto(response_with(broken, ENCODED["raw"])).labels


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(response_with(), id="no-mask"),
        pytest.param(response_with(ENCODED["srle"], width=6, height=8), id="srle-size"),
        pytest.param(response_with(ENCODED["png"], width=9), id="png-size"),
        pytest.param(response_with((pb.MASK_ENCODING_RAW, b"\0" * 47)), id="raw-length"),
        pytest.param(response_with((7, b"future")), id="unknown-encoding"),
    ],
)
def test_labels_that_do_not_fit_raise(response: pb.SegmentResponse) -> None:
    with pytest.raises(MaskDecodeError):
        _ = Segmentation.from_proto(response).labels


def test_stream_results() -> None:
    ok = pb.SegmentStreamResponse(frame_id=7, response=response_with(ENCODED["srle"]))
    frame_id, result = stream_result(ok)
    assert frame_id == 7 and isinstance(result, Segmentation)
    failed = pb.SegmentStreamResponse(frame_id=8, error=pb.FrameError(code=3, message="corrupt"))
    frame_id, error = stream_result(failed)
    assert frame_id == 8 and isinstance(error, FrameFailed)
    assert (error.frame_id, error.code, error.details) == (
        8,
        grpc.StatusCode.INVALID_ARGUMENT,
        "corrupt",
    )
    assert str(error) == "frame 8: INVALID_ARGUMENT: corrupt"
    with pytest.raises(FrameFailed):
        stream_result(failed, raise_errors=True)
    _, empty = stream_result(pb.SegmentStreamResponse(frame_id=9))
    assert isinstance(empty, FrameFailed) and empty.code == grpc.StatusCode.UNKNOWN


def test_status_codes_and_error_text() -> None:
    assert status_code(8) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code(99) == grpc.StatusCode.UNKNOWN
    error = SegserveError(grpc.StatusCode.NOT_FOUND, "no model 'x'")
    assert str(error) == "NOT_FOUND: no model 'x'" and error.details == "no model 'x'"
    assert isinstance(FrameFailed(1, grpc.StatusCode.INTERNAL, "boom"), SegserveError)


def model_info_proto(class_ids: tuple[int, ...] = (0, 1, 2, 3)) -> pb.ModelInfo:
    return pb.ModelInfo(
        name="fake",
        version=1,
        state=pb.MODEL_STATE_READY,
        platform="onnxruntime_onnx",
        backend="onnxruntime:CPUExecutionProvider",
        input_width=64,
        input_height=48,
        classes=[
            pb.ClassInfo(id=i, name=NAMES[i], red=r, green=g, blue=b)
            for i, (r, g, b) in zip(class_ids, COLOURS, strict=False)
        ],
        batching=pb.BatchingInfo(max_batch_size=8, preferred_batch_sizes=[4, 8]),
        outputs_labels=True,
    )


def test_model_info_and_palette() -> None:
    info = ModelInfo.from_proto(model_info_proto())
    assert info.state == "READY" and info.input_width == 64 and info.input_height == 48
    assert info.batching.preferred_batch_sizes == [4, 8]
    assert info.palette == COLOURS
    gaps = ModelInfo.from_proto(model_info_proto((0, 3)))
    assert gaps.palette == [(0, 0, 0), (0, 0, 0), (0, 0, 0), (255, 0, 0)]
    summary = ModelSummary.from_proto(
        pb.ModelSummary(name="m", versions=[1, 2], state=pb.MODEL_STATE_FAILED, reason="bad")
    )
    assert (summary.versions, summary.state, summary.reason) == ([1, 2], "FAILED", "bad")
    assert ModelSummary.from_proto(pb.ModelSummary(state=42)).state == "UNKNOWN_42"  # type: ignore[arg-type]


def models_answer(state: int) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        models=[pb.ModelSummary(name="m", state=state, reason="why")]  # type: ignore[arg-type]
    )


def test_readiness_decisions() -> None:
    wait = ReadinessWait("here:1", 5.0, "m")
    assert wait.next_delay(models_answer(pb.MODEL_STATE_READY)) is None
    delay = wait.next_delay(models_answer(pb.MODEL_STATE_LOADING))
    assert delay is not None and 0 < delay <= ReadinessWait.POLL_INTERVAL_S
    unavailable = SegserveError(grpc.StatusCode.UNAVAILABLE, "connection refused")
    assert wait.next_delay(unavailable) is not None
    with pytest.raises(SegserveError, match="failed to load: why") as failed:
        wait.next_delay(models_answer(pb.MODEL_STATE_FAILED))
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(SegserveError, match=r"no model 'other' \(models: m\)") as missing:
        ReadinessWait("here:1", 5.0, "other").next_delay(models_answer(pb.MODEL_STATE_READY))
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(SegserveError) as unimplemented:
        wait.next_delay(SegserveError(grpc.StatusCode.UNIMPLEMENTED, "no"))
    assert unimplemented.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert ReadinessWait("here:1", 5.0, None).next_delay(models_answer(0)) is None
    with pytest.raises(SegserveError, match="server at here:1 not ready") as late:
        ReadinessWait("here:1", 0.0, None).next_delay(unavailable)
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


# ----------------------------------------------------------------------------------------------
# Colours and overlays
# ----------------------------------------------------------------------------------------------


def test_default_colors_are_the_voc_map() -> None:
    colors = default_colors(5)
    assert colors.shape == (5, 3) and colors.dtype == np.uint8
    assert colors.tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert len({tuple(c) for c in default_colors(256).tolist()}) == 256
    with pytest.raises(ValueError):
        default_colors(257)


def test_colorize() -> None:
    image = colorize(LABELS, COLOURS)
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [0, 0, 0] and image[0, 7].tolist() == [255, 0, 0]
    assert image[5, 0].tolist() == [0, 255, 0] and image[5, 7].tolist() == [0, 0, 255]
    beyond = colorize(np.full((2, 2), 9, np.uint8), COLOURS)  # ids past the given colours
    assert beyond[0, 0].tolist() == default_colors(10)[9].tolist()
    np.testing.assert_array_equal(colorize(LABELS), default_colors(256)[LABELS])
    with pytest.raises(ValueError):
        colorize(LABELS.astype(np.int32), COLOURS)
    with pytest.raises(ValueError):
        color_table([(1, 2)])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        color_table([(0, 0, 256)])


def test_overlay_blends() -> None:
    image = rgb_image()
    np.testing.assert_array_equal(overlay(image, LABELS, COLOURS, alpha=0.0), image)
    np.testing.assert_array_equal(
        overlay(image, LABELS, COLOURS, alpha=1.0), colorize(LABELS, COLOURS)
    )
    half = overlay(image, LABELS, COLOURS)
    expected = np.rint((image.astype(np.float64) + colorize(LABELS, COLOURS)) / 2)
    assert np.abs(half.astype(np.int16) - expected).max() <= 1
    assert half.shape == (6, 8, 3) and half.dtype == np.uint8
    grey = overlay(image[:, :, 0], LABELS, COLOURS, alpha=0.0)
    np.testing.assert_array_equal(grey, np.repeat(image[:, :, :1], 3, axis=2))


def test_overlay_resizes_a_model_sized_map() -> None:
    small = LABELS[::2, ::2]  # (3, 4)
    np.testing.assert_array_equal(
        resize_nearest(small, 6, 8), np.repeat(np.repeat(small, 2, 0), 2, 1)
    )
    assert resize_nearest(LABELS, 3, 4).tolist() == [[0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert overlay(rgb_image(12, 16), LABELS).shape == (12, 16, 3)


@pytest.mark.parametrize(
    ("image", "alpha"),
    [
        (np.zeros((6, 8, 3), np.float32), 0.5),
        (np.zeros((6, 8, 4), np.uint8), 0.5),
        (rgb_image(), 1.5),
    ],
)
def test_overlay_rejects(image: np.ndarray, alpha: float) -> None:
    with pytest.raises(ValueError):
        overlay(image, LABELS, COLOURS, alpha=alpha)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["segment"],
        ["segment", "x.jpg"],
        ["segment", "x.jpg", "--model", "m", "--encoding", "jpeg"],
        ["segment", "x.jpg", "--model", "m", "--output-size", "huge"],
        ["segment", "x.jpg", "--model", "m", "--timeout", "0"],
        ["segment", "x.jpg", "--model", "m", "--timeout", "soon"],
        ["model"],
        ["model", "m", "--model-version", "-1"],
        ["models", "extra"],
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert "usage: segserve-client" in capsys.readouterr().err


def test_cli_missing_image_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["segment", str(tmp_path / "none.jpg"), "--model", "m"]) == 2
    assert capsys.readouterr().err.startswith("error: no such image file:")


def test_cli_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


def test_cli_server_default_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.SERVER_ENV, raising=False)
    assert cli.build_parser().parse_args(["models"]).server == "localhost:50051"
    monkeypatch.setenv(cli.SERVER_ENV, "gpu-box:6000")
    args = cli.build_parser().parse_args(["segment", "a.jpg", "-m", "x", "--timeout", "2.5"])
    assert (args.server, args.timeout, args.encoding, args.output_size) == (
        "gpu-box:6000",
        2.5,
        "srle",
        "original",
    )
    assert cli.build_parser().parse_args(["models", "--server", "h:1"]).server == "h:1"


@pytest.fixture
def closed_port() -> str:
    """An address where nothing listens: calls fail with UNAVAILABLE at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_cli_rpc_failure_exits_1(closed_port: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "--server", closed_port, "--timeout", "5"]) == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


def test_clients_raise_segserve_error_without_a_server(closed_port: str) -> None:
    with SegserveClient(closed_port, timeout_s=5) as client:
        with pytest.raises(SegserveError) as failed:
            client.segment(b"jpeg", "m")
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(SegserveError) as late:
            client.wait_until_ready(0.3)
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(SegserveError):
            list(client.stream([(1, b"jpeg")], "m"))


async def test_async_client_raises_segserve_error_without_a_server(closed_port: str) -> None:
    async with AsyncSegserveClient(closed_port, timeout_s=5) as client:
        with pytest.raises(SegserveError) as failed:
            await client.list_models()
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(SegserveError) as late:
            await client.wait_until_ready(0.3, model="m")
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


BLOCKED_IMPORTS = """
import sys

BLOCKED = {"cv2", "onnxruntime", "prometheus_client", "pydantic_settings", "tritonclient",
           "segserve_server"}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the client library must not need it")
        return None

sys.meta_path.insert(0, Blocker())

import numpy as np
import segserve_client, segserve_client.client, segserve_client.aio, segserve_client.cli
from segserve_client import masks, overlay, types

labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
response = types.pb.SegmentResponse(width=4, height=3, masks=[
    types.pb.EncodedMask(encoding=types.pb.MASK_ENCODING_SRLE, data=masks.encode_srle(labels))])
assert (types.Segmentation.from_proto(response).labels == labels).all()
assert overlay.overlay(np.zeros((3, 4, 3), np.uint8), labels).shape == (3, 4, 3)
try:
    overlay.load_image_rgb("street.jpg")
except ImportError as exc:
    assert "pip install opencv-python-headless" in str(exc), exc
else:
    raise AssertionError("load_image_rgb worked without OpenCV")
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
assert not loaded, loaded
print("client imports ok")
"""


def test_client_imports_without_server_dependencies(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORTS],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "client imports ok" in done.stdout
