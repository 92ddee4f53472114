"""DICOM in, DICOM Segmentation out (the `formats` extra), over real gRPC to a real server.

Every DICOM file is written here with pydicom (CT 16-bit with rescale and window, MONOCHROME1,
8-bit RGB secondary capture, RLE and JPEG baseline compressed, JPEG Lossless that the installed
codecs cannot decode); the SEG that comes back is read by highdicom. The model is the synthetic
colour-classes model (tests/harness): a grey pixel above about 0.48 of full scale is "bright"
(class 4) from 0.8 of full scale, "dark" (class 0) below 1/6 (between, a tie the first colour,
"red", wins), so the window applied decides the classes.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest

from segserve.v1 import segserve_pb2 as pb
from segserve_client.masks import decode_srle
from tests.conftest import ROOT, H, W, quadrant_image

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

DARK, BRIGHT = 0, 4
# Stored values: left half 1024 (0 HU), right half 1124 (100 HU); intercept -1024.
LEFT_HU, RIGHT_HU = 0, 100


def dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    sop_class: str = CTImageStorage,
    window: tuple[float, float] | None = (50.0, 100.0),
    rescale: tuple[float, float] | None = (1.0, -1024.0),
    signed: bool = False,
) -> Dataset:
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "P1", "Test^P", "", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240101", "120000", ""
    ds.ReferringPhysicianName, ds.StudyID = "", "1"
    ds.Modality = "CT" if sop_class == CTImageStorage else "OT"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelSpacing = [0.5, 0.5]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = 1
    ds.PixelData = pixels.tobytes()
    return ds


def save(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def ct_pixels(height: int = H, width: int = W) -> np.ndarray:
    pixels = np.full((height, width), 1024 + LEFT_HU, dtype=np.uint16)
    pixels[:, width // 2 :] = 1024 + RIGHT_HU
    return pixels


def halves(left: int, right: int, height: int = H, width: int = W) -> np.ndarray:
    labels = np.full((height, width), left, dtype=np.uint8)
    labels[:, width // 2 :] = right
    return labels


async def segment(stub, data: bytes, **fields) -> pb.SegmentResponse:
    request = pb.SegmentRequest(model="colour", image=pb.Image(encoded=data), **fields)
    return await stub.Segment(request, timeout=30)


def srle(response: pb.SegmentResponse) -> np.ndarray:
    (mask,) = [m for m in response.masks if m.encoding == pb.MASK_ENCODING_SRLE]
    return decode_srle(mask.data)


async def test_ct_uses_rescale_and_the_files_window(stub):
    # Window 50/100 after the -1024 intercept: 0 HU -> 0 (dark), 100 HU -> 255 (bright).
    response = await segment(stub, save(dataset(ct_pixels())))
    assert (response.width, response.height) == (W, H)
    np.testing.assert_array_equal(srle(response), halves(DARK, BRIGHT))


async def test_the_requests_window_overrides_the_files(stub):
    # Window 200/200: both 0 and 100 HU are below 100 -> dark; window -100/100: both bright.
    data = save(dataset(ct_pixels()))
    low = await segment(stub, data, window_center=200, window_width=200)
    np.testing.assert_array_equal(srle(low), halves(DARK, DARK))
    high = await segment(
        stub, data, window_center=-100, window_width=100, scaling=pb.SAMPLE_SCALING_WINDOW
    )
    np.testing.assert_array_equal(srle(high), halves(BRIGHT, BRIGHT))


async def test_without_a_window_minmax_and_monochrome1_inverts(stub):
    data = save(dataset(ct_pixels(), window=None))
    np.testing.assert_array_equal(srle(await segment(stub, data)), halves(DARK, BRIGHT))
    inverted = save(dataset(ct_pixels(), window=None, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(srle(await segment(stub, inverted)), halves(BRIGHT, DARK))


async def test_shift_scales_the_stored_values(stub):
    # >> 8 of 16-bit stored values: 1024 -> 4 and 1124 -> 4: all dark, whatever the window.
    data = save(dataset(ct_pixels()))
    response = await segment(stub, data, scaling=pb.SAMPLE_SCALING_SHIFT)
    np.testing.assert_array_equal(srle(response), halves(DARK, DARK))


async def test_signed_pixels(stub):
    pixels = ct_pixels().astype(np.int16) - 1024  # stored as HU directly
    data = save(dataset(pixels, rescale=None, signed=True))
    np.testing.assert_array_equal(srle(await segment(stub, data)), halves(DARK, BRIGHT))


def rgb_secondary_capture(rgb: np.ndarray) -> Dataset:
    return dataset(
        rgb,
        photometric="RGB",
        sop_class=SecondaryCaptureImageStorage,
        window=None,
        rescale=None,
    )


async def test_rgb_8_bit_segments_as_the_png_would(stub):
    rgb = quadrant_image()
    response = await segment(stub, save(rgb_secondary_capture(rgb)))
    np.testing.assert_array_equal(
        srle(response), np.array([[1, 2], [3, 4]]).repeat(H // 2, 0).repeat(W // 2, 1)
    )


async def test_rle_and_jpeg_baseline_transfer_syntaxes_decode(stub):
    ds = dataset(ct_pixels())
    ds.compress(RLELossless)
    np.testing.assert_array_equal(srle(await segment(stub, save(ds))), halves(DARK, BRIGHT))
    # JPEG baseline (decoded through Pillow): an 8-bit grey JPEG encapsulated by pydicom.
    import cv2
    from pydicom.encaps import encapsulate

    grey = halves(20, 240).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    ds = dataset(grey, window=None, rescale=None, sop_class=SecondaryCaptureImageStorage)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg.tobytes()])
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    response = await segment(stub, save(ds), scaling=pb.SAMPLE_SCALING_UNSPECIFIED)
    np.testing.assert_array_equal(srle(response), halves(DARK, BRIGHT))


async def test_a_transfer_syntax_without_a_codec_is_failed_precondition(stub):
    from pydicom.encaps import encapsulate

    ds = dataset(ct_pixels())
    ds.file_meta.TransferSyntaxUID = JPEGLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(64)])
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await segment(stub, save(ds))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "JPEG Lossless" in caught.value.details()
    assert "pylibjpeg" in caught.value.details()


async def test_the_dicom_seg_references_the_source_and_names_the_classes(stub):
    ds = dataset(ct_pixels())
    response = await segment(
        stub,
        save(ds),
        encodings=[pb.MASK_ENCODING_DICOM_SEG, pb.MASK_ENCODING_SRLE],
    )
    assert [m.encoding for m in response.masks] == [
        pb.MASK_ENCODING_DICOM_SEG,
        pb.MASK_ENCODING_SRLE,
    ]
    seg = hd.seg.segread(io.BytesIO(response.masks[0].data))
    assert seg.SOPClassUID == hd.UID("1.2.840.10008.5.1.4.1.1.66.4")  # Segmentation Storage
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == ds.SeriesInstanceUID
    assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert seg.StudyInstanceUID == ds.StudyInstanceUID
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["dark", "bright"]  # classes present
    assert seg.number_of_segments == 2
    labelmap = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID], combine_segments=True
    )[0]
    # Segment numbers 1, 2 are classes 0 (dark) and 4 (bright), in ascending class id.
    np.testing.assert_array_equal(labelmap, halves(1, 2))
    np.testing.assert_array_equal(srle(response), halves(DARK, BRIGHT))


async def test_seg_of_a_secondary_capture(stub):
    ds = rgb_secondary_capture(quadrant_image())
    response = await segment(stub, save(ds), encodings=[pb.MASK_ENCODING_DICOM_SEG])
    seg = hd.seg.segread(io.BytesIO(response.masks[0].data))
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["red", "green", "blue", "bright"]


@pytest.mark.parametrize(
    ("image", "fields", "fragment"),
    [
        ("png", {"encodings": [pb.MASK_ENCODING_DICOM_SEG]}, "needs a DICOM (Part 10) input"),
        (
            "dicom",
            {"encodings": [pb.MASK_ENCODING_DICOM_SEG], "output_size": pb.OUTPUT_SIZE_MODEL},
            "needs OUTPUT_SIZE_ORIGINAL",
        ),
        ("dicom", {"window_width": -1}, "window_width -1.0 is negative"),
        ("png", {"scaling": 9}, "scaling 9 is not one of"),
        ("multiframe", {}, "has 2 frames"),
        ("corrupt", {}, "DICOM file has no image"),
    ],
)
async def test_bad_dicom_requests(stub, image, fields, fragment):
    from tests.conftest import encode

    if image == "png":
        data = encode(quadrant_image())
    elif image == "multiframe":
        ds = dataset(np.concatenate([ct_pixels(), ct_pixels()]))
        ds.Rows, ds.NumberOfFrames = H, 2
        data = save(ds)
    elif image == "corrupt":
        data = bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f" + bytes(8)  # a bogus length
    else:
        data = save(dataset(ct_pixels()))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await segment(stub, data, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in caught.value.details()
    assert len(caught.value.details()) < 1200


async def test_header_bomb_is_refused_before_decoding(stub):
    ds = dataset(ct_pixels()[:1, :1])
    ds.Rows, ds.Columns = 60_000, 60_000  # 2 bytes of pixels claim 3.6 gigapixels
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await segment(stub, save(ds))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "60000x60000" in caught.value.details()


BLOCKED = textwrap.dedent(
    """
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"pydicom", "highdicom", "tifffile", "imagecodecs"}:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
    sys.meta_path.insert(0, Block())
    from segserve_server.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


async def test_without_the_extra_dicom_and_tiff_name_it(repository, tmp_path):
    """A real `segserve serve` whose interpreter cannot import the formats extra."""
    import asyncio
    import re
    import time

    import tifffile

    script = tmp_path / "blocked.py"
    script.write_text(BLOCKED)
    process = subprocess.Popen(
        [sys.executable, str(script), "serve", "--model-repository", str(repository),
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
         "--ort-intra-op-threads", "1"],
        stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert process.stderr is not None
        port = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not port:
            line = await asyncio.to_thread(process.stderr.readline)
            if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                port = int(match.group(1))
            elif not line and process.poll() is not None:
                break
        assert port, "segserve serve did not start"
        tiff = io.BytesIO()
        tifffile.imwrite(tiff, quadrant_image())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            from segserve.v1 import segserve_pb2_grpc as pb_grpc

            stub = pb_grpc.SegmentationStub(channel)
            for data, what in ((save(dataset(ct_pixels())), "DICOM"), (tiff.getvalue(), "TIFF")):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await segment(stub, data)
                assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, what
                assert "segserve[formats]" in caught.value.details(), what
                assert what in caught.value.details()
            # Everything else still serves.
            from tests.conftest import encode

            assert (await segment(stub, encode(quadrant_image()))).width == W
    finally:
        process.terminate()
        process.wait(timeout=30)
