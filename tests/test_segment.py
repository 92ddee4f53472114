"""Segment, ListModels and GetModel against a real server on loopback, with real ONNX models."""

from __future__ import annotations

import asyncio
from typing import TypedDict, Unpack

import cv2
import grpc
import numpy as np
import pytest

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_client.masks import decode_png, decode_srle
from segserve_server.server import Server
from tests.conftest import H, W, encode, make_settings, quadrant_image
from tests.harness.synthetic_models import COLOUR_PALETTE, expected_colour_labels

EXPECTED_QUADRANTS = expected_colour_labels(quadrant_image())


class SegmentFields(TypedDict, total=False):
    """SegmentRequest's fields besides model and image."""

    model_version: int
    encodings: list[pb.MaskEncoding]
    output_size: pb.OutputSize
    include_pixel_counts: bool
    embed_palette: bool


def request(
    model: str = "colour", image: bytes | None = None, **fields: Unpack[SegmentFields]
) -> pb.SegmentRequest:
    data = encode(quadrant_image()) if image is None else image
    return pb.SegmentRequest(model=model, image=pb.Image(encoded=data), **fields)


async def test_png_at_model_size_gives_exact_labels(stub):
    response = await stub.Segment(request(include_pixel_counts=True))
    labels = decode_srle(response.masks[0].data)
    assert response.masks[0].encoding == pb.MASK_ENCODING_SRLE
    assert (response.width, response.height) == (W, H)
    np.testing.assert_array_equal(labels, EXPECTED_QUADRANTS)
    assert [c.name for c in response.classes] == ["red", "green", "blue", "bright"]
    assert sum(c.pixel_count for c in response.classes) == W * H
    assert response.model == "colour" and response.model_version == 1


async def test_jpeg_mask_comes_back_at_the_image_size(stub):
    rgb = cv2.resize(quadrant_image(), (640, 480), interpolation=cv2.INTER_NEAREST)
    response = await stub.Segment(request(image=encode(rgb, ".jpg")))
    labels = decode_srle(response.masks[0].data)
    assert labels.shape == (480, 640)
    assert labels.max() < 5
    # Away from the quadrant borders (JPEG ringing), each quadrant is its colour's class.
    assert (labels[100, 100], labels[100, 500], labels[400, 100], labels[400, 500]) == (1, 2, 3, 4)
    timings = response.timings
    assert timings.total_us >= timings.infer_us > 0
    assert timings.decode_us > 0 and timings.encode_us > 0 and timings.batch_size >= 1


async def test_every_encoding_decodes_to_the_same_map(stub):
    encodings = [pb.MASK_ENCODING_PNG, pb.MASK_ENCODING_RAW, pb.MASK_ENCODING_SRLE]
    response = await stub.Segment(request(encodings=encodings, embed_palette=True))
    assert [m.encoding for m in response.masks] == encodings
    png, palette = decode_png(response.masks[0].data)
    raw = np.frombuffer(response.masks[1].data, dtype=np.uint8).reshape(H, W)
    srle = decode_srle(response.masks[2].data)
    for labels in (png, raw, srle):
        np.testing.assert_array_equal(labels, EXPECTED_QUADRANTS)
    assert palette == [tuple(c) for c in COLOUR_PALETTE]
    # A viewer shows the palette's colours: OpenCV expands the indexed PNG to them.
    shown = cv2.imdecode(np.frombuffer(response.masks[0].data, np.uint8), cv2.IMREAD_COLOR_RGB)
    np.testing.assert_array_equal(shown, np.array(COLOUR_PALETTE, np.uint8)[EXPECTED_QUADRANTS])


async def test_png_without_palette_is_greyscale_class_ids(stub):
    response = await stub.Segment(request(encodings=[pb.MASK_ENCODING_PNG]))
    decoded = cv2.imdecode(np.frombuffer(response.masks[0].data, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(decoded, EXPECTED_QUADRANTS)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".webp", ".jpg"])
async def test_each_image_format(stub, ext):
    rgb = cv2.resize(quadrant_image(), (W * 4, H * 4), interpolation=cv2.INTER_NEAREST)
    params = {"quality": 100} if ext == ".jpg" else {}
    response = await stub.Segment(request(image=encode(rgb, ext, **params)))
    labels = decode_srle(response.masks[0].data)
    assert labels.shape == (H * 4, W * 4)
    assert (labels[20, 20], labels[20, -20], labels[-20, 20], labels[-20, -20]) == (1, 2, 3, 4)


@pytest.mark.parametrize(
    ("pixel_format", "convert"),
    [
        (pb.PIXEL_FORMAT_RGB8, lambda rgb: rgb),
        (pb.PIXEL_FORMAT_BGR8, lambda rgb: rgb[:, :, ::-1]),
    ],
)
async def test_raw_pixels_match_encoded(stub, pixel_format, convert):
    pixels = np.ascontiguousarray(convert(quadrant_image()))
    raw = pb.RawImage(pixels=pixels.tobytes(), width=W, height=H, format=pixel_format)
    response = await stub.Segment(pb.SegmentRequest(model="colour", image=pb.Image(raw=raw)))
    np.testing.assert_array_equal(decode_srle(response.masks[0].data), EXPECTED_QUADRANTS)


async def test_raw_gray_pixels(stub):
    gray = np.zeros((H, W), dtype=np.uint8)
    gray[:, W // 2 :] = 255
    raw = pb.RawImage(pixels=gray.tobytes(), width=W, height=H, format=pb.PIXEL_FORMAT_GRAY8)
    response = await stub.Segment(pb.SegmentRequest(model="colour", image=pb.Image(raw=raw)))
    labels = decode_srle(response.masks[0].data)
    assert set(np.unique(labels[:, : W // 2])) == {0} and set(np.unique(labels[:, W // 2 :])) == {4}


async def test_output_size_model(stub):
    rgb = cv2.resize(quadrant_image(), (W * 3, H * 3), interpolation=cv2.INTER_NEAREST)
    response = await stub.Segment(
        request(image=encode(rgb), output_size=pb.OUTPUT_SIZE_MODEL, include_pixel_counts=True)
    )
    assert (response.width, response.height) == (W, H)
    assert decode_srle(response.masks[0].data).shape == (H, W)


async def test_logits_model_and_versions(stub):
    latest = await stub.Segment(request("colour_logits"))
    assert latest.model_version == 2  # version 3 exists but version_policy selects 1 and 2
    first = await stub.Segment(request("colour_logits", model_version=1))
    assert first.model_version == 1
    np.testing.assert_array_equal(decode_srle(first.masks[0].data), EXPECTED_QUADRANTS)
    for version in (3, 9):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Segment(request("colour_logits", model_version=version))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert f"version {version}" in err.value.details()


async def test_real_street_scene(stub, camvid_frame):
    response = await stub.Segment(request(image=camvid_frame, include_pixel_counts=True))
    labels = decode_srle(response.masks[0].data)
    assert labels.shape == (360, 480)
    assert labels.max() < 5
    assert sum(c.pixel_count for c in response.classes) == 360 * 480


async def test_list_models_reports_failures_and_keeps_serving(stub):
    listing = await stub.ListModels(pb.ListModelsRequest())
    assert listing.limits.max_request_bytes == 64 * 1024 * 1024
    assert listing.limits.max_image_side == 16384 and listing.limits.max_image_pixels > 0
    models = {m.name: m for m in listing.models}
    assert models["colour"].state == pb.MODEL_STATE_READY
    assert models["colour_logits"].versions == [1, 2, 3]
    assert models["colour_logits"].serving_version == 2
    assert models["broken_config"].state == pb.MODEL_STATE_FAILED
    assert "does not parse" in models["broken_config"].reason
    assert models["missing_file"].state == pb.MODEL_STATE_FAILED
    assert "model.onnx" in models["missing_file"].reason
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Segment(request("missing_file"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "missing" in err.value.details()


async def test_get_model(stub):
    info = await stub.GetModel(pb.GetModelRequest(name="colour"))
    assert (info.input_width, info.input_height) == (W, H)
    assert [c.name for c in info.classes] == ["dark", "red", "green", "blue", "bright"]
    assert (info.classes[1].red, info.classes[1].green, info.classes[1].blue) == COLOUR_PALETTE[1]
    assert info.outputs_labels and info.state == pb.MODEL_STATE_READY
    assert info.batching.max_batch_size == 8 and info.batching.max_queue_size == 64
    assert info.backend == "onnxruntime:CPUExecutionProvider"
    logits = await stub.GetModel(pb.GetModelRequest(name="colour_logits", version=1))
    assert logits.version == 1 and not logits.outputs_labels
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetModel(pb.GetModelRequest(name="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_batches_form_under_concurrency(stub):
    """colour_batch4 runs only full batches of 4: four concurrent requests share one batch."""
    responses = await asyncio.gather(*(stub.Segment(request("colour_batch4")) for _ in range(4)))
    assert [r.timings.batch_size for r in responses] == [4, 4, 4, 4]
    for response in responses:
        np.testing.assert_array_equal(decode_srle(response.masks[0].data), EXPECTED_QUADRANTS)


async def test_many_concurrent_requests_all_answer(stub):
    responses = await asyncio.gather(*(stub.Segment(request()) for _ in range(24)))
    assert all(1 <= r.timings.batch_size <= 8 for r in responses)
    for response in responses:
        np.testing.assert_array_equal(decode_srle(response.masks[0].data), EXPECTED_QUADRANTS)


async def test_default_cpu_lanes_configuration(repository):
    """The production default (ort_intra_op_threads 0: one single-threaded lane per core, a lone
    request on all cores) gives the same masks as the configured sessions the other tests use."""
    server = Server(make_settings(repository, ort_intra_op_threads=0, metrics_port=None))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            lanes = pb_grpc.SegmentationStub(channel)
            answers = await asyncio.gather(*(lanes.Segment(request()) for _ in range(6)))
            frames = [pb.SegmentStreamRequest(frame_id=i, request=request()) for i in range(5)]
            streamed = [a async for a in lanes.SegmentStream(iter(frames))]
        for answer in [*answers, *(s.response for s in streamed)]:
            np.testing.assert_array_equal(decode_srle(answer.masks[0].data), EXPECTED_QUADRANTS)
        assert [s.frame_id for s in streamed] == list(range(5))
    finally:
        await server.stop(timeout_s=5)


async def test_a_model_that_answers_the_wrong_shape_is_internal_and_the_stream_goes_on(stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Segment(request("misshapen"))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "shape" in err.value.details() and "config declares" in err.value.details()
    frames = [
        pb.SegmentStreamRequest(frame_id=i, request=request("misshapen" if i == 1 else "colour"))
        for i in range(3)
    ]
    answers = [a async for a in stub.SegmentStream(iter(frames))]
    assert [a.WhichOneof("result") for a in answers] == ["response", "error", "response"]
    assert answers[1].error.code == grpc.StatusCode.INTERNAL.value[0]
