"""16-bit PNG and TIFF: an explicit scaling per request (SHIFT, the default, as before; MINMAX;
WINDOW), over real gRPC to a real server. Images are written here (OpenCV, tifffile)."""

from __future__ import annotations

import cv2
import grpc
import numpy as np
import pytest

from segserve.v1 import segserve_pb2 as pb
from segserve_client.masks import decode_srle
from tests.conftest import H, W, quadrant_image
from tests.harness.synthetic_models import expected_colour_labels

QUADRANT_LABELS = expected_colour_labels(quadrant_image())


def png16(rgb16: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", rgb16[:, :, ::-1] if rgb16.ndim == 3 else rgb16)
    assert ok
    return data.tobytes()


async def segment(stub, data: bytes, **fields) -> np.ndarray:
    request = pb.SegmentRequest(model="colour", image=pb.Image(encoded=data), **fields)
    response = await stub.Segment(request, timeout=30)
    return decode_srle(response.masks[0].data)


async def test_default_shift_is_what_the_8_bit_conversion_gave(stub):
    rgb16 = quadrant_image().astype(np.uint16) * 257  # full-range 16-bit
    data = png16(rgb16)
    default = await segment(stub, data)
    np.testing.assert_array_equal(default, QUADRANT_LABELS)
    shift = await segment(stub, data, scaling=pb.SAMPLE_SCALING_SHIFT)
    np.testing.assert_array_equal(shift, default)
    # The same decode as OpenCV's own 8-bit conversion (what segserve did before).
    from segserve_server.pipeline import decode

    limits = decode.ImageLimits(10**8, 10**5)
    ours = decode.decode(data, limits).pixels
    theirs = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    np.testing.assert_array_equal(ours, theirs)


async def test_low_range_16_bit_needs_minmax_or_a_window(stub):
    rgb12 = quadrant_image().astype(np.uint16) * 16  # 12-bit data in a 16-bit PNG: 0..4080
    data = png16(rgb12)
    assert set(np.unique(await segment(stub, data))) == {0}  # >> 8: all below 16, dark
    minmax = await segment(stub, data, scaling=pb.SAMPLE_SCALING_MINMAX)
    np.testing.assert_array_equal(minmax, QUADRANT_LABELS)
    window = await segment(
        stub, data, scaling=pb.SAMPLE_SCALING_WINDOW, window_center=2040, window_width=4081
    )
    np.testing.assert_array_equal(window, QUADRANT_LABELS)


async def test_the_server_default_scaling_is_a_setting(repository):
    """sixteen_bit_scaling "minmax": requests that set no scaling stretch 12-bit data; a
    request's own SHIFT still wins."""
    from segserve.v1 import segserve_pb2_grpc as pb_grpc
    from segserve_server.server import Server
    from tests.conftest import make_settings

    data = png16(quadrant_image().astype(np.uint16) * 16)  # 12-bit data: 0..4080
    server = Server(make_settings(repository, sixteen_bit_scaling="minmax", metrics_port=None))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.SegmentationStub(channel)
            np.testing.assert_array_equal(await segment(stub, data), QUADRANT_LABELS)
            shift = await segment(stub, data, scaling=pb.SAMPLE_SCALING_SHIFT)
            assert set(np.unique(shift)) == {0}
    finally:
        await server.stop()


async def test_16_bit_grey_png_window(stub):
    grey = np.full((H, W), 1000, np.uint16)
    grey[:, W // 2 :] = 3000
    data = png16(grey)
    low = await segment(
        stub, data, scaling=pb.SAMPLE_SCALING_WINDOW, window_center=2000, window_width=1000
    )
    expected = np.zeros((H, W), np.uint8)
    expected[:, W // 2 :] = 4
    np.testing.assert_array_equal(low, expected)
    high = await segment(
        stub, data, scaling=pb.SAMPLE_SCALING_WINDOW, window_center=500, window_width=100
    )
    np.testing.assert_array_equal(high, np.full((H, W), 4, np.uint8))


async def test_16_bit_tiff_scales_like_the_png(stub):
    tifffile = pytest.importorskip("tifffile")
    import io

    rgb12 = quadrant_image().astype(np.uint16) * 16
    out = io.BytesIO()
    tifffile.imwrite(out, rgb12, photometric="rgb", compression="lzw")
    data = out.getvalue()
    for scaling in (pb.SAMPLE_SCALING_UNSPECIFIED, pb.SAMPLE_SCALING_MINMAX):
        assert np.array_equal(
            await segment(stub, data, scaling=scaling),
            await segment(stub, png16(rgb12), scaling=scaling),
        )


async def test_8_bit_images_ignore_the_scaling(stub):
    ok, data = cv2.imencode(".png", quadrant_image()[:, :, ::-1])
    assert ok
    answer = await segment(stub, data.tobytes(), scaling=pb.SAMPLE_SCALING_MINMAX)
    np.testing.assert_array_equal(answer, QUADRANT_LABELS)


async def test_window_without_a_width_is_invalid(stub):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await segment(stub, png16(np.zeros((H, W), np.uint16)), scaling=pb.SAMPLE_SCALING_WINDOW)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs window_width > 0" in caught.value.details()
