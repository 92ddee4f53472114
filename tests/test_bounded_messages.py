"""Client-supplied values echoed in error messages are bounded, on both ports, so the client
sees the real status code (not RESOURCE_EXHAUSTED for oversized metadata); KServe's
model_version "-1" means the serving version, as in Triton."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.grpc import aio as ta
from tritonclient.utils import InferenceServerException

from segserve.v1 import segserve_pb2 as pb
from segserve_server.adapters.kserve_tensors import parse_version
from segserve_server.errors import MAX_MESSAGE_CHARS, InvalidArgument, bounded
from tests.conftest import H, W, encode, quadrant_image

LONG = "m" * 20_000
LIMIT = MAX_MESSAGE_CHARS + 100  # the cut message and its note


def test_bounded_cuts_and_says_how_much():
    assert bounded("short") == "short"
    cut = bounded("start " + "x" * 5000 + " the reason")
    assert len(cut) < LIMIT and "(4017 characters left out)" in cut
    assert cut.startswith("start ") and cut.endswith(" the reason")
    assert len(InvalidArgument("y" * 50_000).message) < LIMIT


async def test_a_huge_model_name_is_not_found_with_a_bounded_message(stub):
    request = pb.SegmentRequest(model=LONG, image=pb.Image(encoded=encode(quadrant_image())))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Segment(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(err.value.details() or "") < LIMIT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetModel(pb.GetModelRequest(name=LONG), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_thousands_of_encodings_are_invalid_argument_with_a_bounded_message(stub):
    request = pb.SegmentRequest(
        model="colour",
        image=pb.Image(encoded=encode(quadrant_image())),
        encodings=[pb.MASK_ENCODING_PNG] * 2500,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Segment(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "repeat" in (err.value.details() or "")
    assert len(err.value.details() or "") < LIMIT


async def test_a_stream_frame_error_is_bounded_too(stub):
    frame = pb.SegmentStreamRequest(
        frame_id=1,
        request=pb.SegmentRequest(model=LONG, image=pb.Image(encoded=encode(quadrant_image()))),
    )
    (answer,) = [a async for a in stub.SegmentStream(iter([frame]))]
    assert answer.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert len(answer.error.message) < LIMIT


async def test_the_kserve_port_bounds_them_too(server):
    pixels = np.zeros((1, 3, H, W), np.float32)
    tensor = tg.InferInput("image", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    async with ta.InferenceServerClient(f"127.0.0.1:{server.kserve_port}") as client:
        with pytest.raises(InferenceServerException) as err:
            await client.infer(LONG, [tensor])
        assert "NOT_FOUND" in str(err.value.status())
        assert len(err.value.message()) < LIMIT
        result = await client.infer("colour", [tensor], model_version="-1")
        assert result.as_numpy("labels").shape == (1, H, W)
        assert await client.is_model_ready("colour", "-1")


def test_version_minus_one_is_the_serving_one():
    assert parse_version("-1") == parse_version("") == 0
    assert parse_version("2") == 2
    with pytest.raises(InvalidArgument, match="not a version number"):
        parse_version("-2")
