"""TIFF / GeoTIFF in, georeferenced GeoTIFF masks out (the `formats` extra), over real gRPC.

The GeoTIFFs are written here with tifffile (the GeoTIFF tags by number: ModelPixelScale,
ModelTiepoint or ModelTransformation, GeoKeyDirectory, GeoAsciiParams); the masks that come
back are read by tifffile, whose transform and CRS must be the source's. A large real image is
a CamVid frame tiled at run time (never copied into the repo).
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest

from segserve.v1 import segserve_pb2 as pb
from segserve_client.masks import decode_srle
from tests.conftest import H, W, quadrant_image
from tests.harness.synthetic_models import expected_colour_labels

tifffile = pytest.importorskip("tifffile")

# WGS 84 geographic (EPSG:4326), raster type PixelIsArea.
GEOKEYS = (1, 1, 0, 3, 1024, 0, 1, 2, 1025, 0, 1, 1, 2048, 0, 1, 4326)
UTM_KEYS = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633)  # UTM zone 33N
ORIGIN = (13.40, 52.52)  # top-left corner X (lon), Y (lat)
PIXEL = (1e-4, 1e-4)
QUADRANT_LABELS = np.array([[1, 2], [3, 4]], np.uint8).repeat(H // 2, 0).repeat(W // 2, 1)


def geo_tags(keys=GEOKEYS, transformation=None):
    tags = [(34735, 3, len(keys), keys, True), (34737, 2, 0, "WGS 84|", True)]
    if transformation is not None:
        tags.append((34264, 12, 16, tuple(transformation), True))
    else:
        tags += [
            (33550, 12, 3, (PIXEL[0], PIXEL[1], 0.0), True),
            (33922, 12, 6, (0.0, 0.0, 0.0, ORIGIN[0], ORIGIN[1], 0.0), True),
        ]
    return tags


def geotiff(pixels: np.ndarray, *, tags=None, **options) -> bytes:
    out = io.BytesIO()
    photometric = "rgb" if pixels.ndim == 3 and pixels.shape[2] == 3 else "minisblack"
    tifffile.imwrite(
        out,
        pixels,
        photometric=options.pop("photometric", photometric),
        extratags=geo_tags() if tags is None else tags,
        **options,
    )
    return out.getvalue()


async def segment(stub, data: bytes, **fields) -> pb.SegmentResponse:
    request = pb.SegmentRequest(model="colour", image=pb.Image(encoded=data), **fields)
    return await stub.Segment(request, timeout=60)


def mask(response, encoding=pb.MASK_ENCODING_SRLE):
    (found,) = [m.data for m in response.masks if m.encoding == encoding]
    return found


def read_geotiff(data: bytes):
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        tags = {
            code: page.tags[code].value
            for code in (33550, 33922, 34264, 34735, 34737)
            if code in page.tags
        }
        return page.asarray(), tags, tif.is_geotiff, page.geotiff_tags


async def test_rgb_geotiff_round_trips_its_georeference(stub):
    source = geotiff(quadrant_image(), compression="zlib")
    response = await segment(
        stub, source, encodings=[pb.MASK_ENCODING_GEOTIFF, pb.MASK_ENCODING_SRLE]
    )
    np.testing.assert_array_equal(decode_srle(mask(response)), QUADRANT_LABELS)
    labels, tags, is_geotiff, geokeys = read_geotiff(mask(response, pb.MASK_ENCODING_GEOTIFF))
    np.testing.assert_array_equal(labels, QUADRANT_LABELS)
    assert is_geotiff and labels.dtype == np.uint8
    assert tags[34735] == GEOKEYS and tags[34737] == "WGS 84|"
    assert tags[33550] == (PIXEL[0], PIXEL[1], 0.0)
    assert tags[33922] == (0.0, 0.0, 0.0, ORIGIN[0], ORIGIN[1], 0.0)
    assert geokeys["GeographicTypeGeoKey"] == 4326  # tifffile's own reading of the CRS


async def test_model_size_mask_keeps_the_ground_covered(stub):
    big = quadrant_image(H * 4, W * 4)
    source = geotiff(big)
    response = await segment(
        stub, source, encodings=[pb.MASK_ENCODING_GEOTIFF], output_size=pb.OUTPUT_SIZE_MODEL
    )
    labels, tags, _, _ = read_geotiff(mask(response, pb.MASK_ENCODING_GEOTIFF))
    assert labels.shape == (H, W)
    assert tags[33550] == pytest.approx((PIXEL[0] * 4, PIXEL[1] * 4, 0.0))
    assert tags[33922] == (0.0, 0.0, 0.0, ORIGIN[0], ORIGIN[1], 0.0)


async def test_transformation_matrix_and_map_coordinate_polygons(stub):
    # A UTM raster with 10 m pixels, rotated by nothing but given as ModelTransformation.
    matrix = (10.0, 0.0, 0.0, 500_000.0, 0.0, -10.0, 0.0, 5_800_000.0, 0, 0, 0, 0, 0, 0, 0, 1.0)
    source = geotiff(quadrant_image(), tags=geo_tags(UTM_KEYS, matrix))
    response = await segment(
        stub,
        source,
        encodings=[pb.MASK_ENCODING_GEOTIFF],
        annotations=[pb.ANNOTATION_FORMAT_POLYGONS],
        map_coordinates=True,
    )
    _, tags, _, geokeys = read_geotiff(mask(response, pb.MASK_ENCODING_GEOTIFF))
    assert tags[34264] == matrix and geokeys["ProjectedCSTypeGeoKey"] == 32633
    for annotation in response.annotations:
        for region in annotation.polygons:
            xy = np.array(region.outer.xy, float).reshape(-1, 2)
            mapped = np.array(region.outer.map_xy).reshape(-1, 2)
            np.testing.assert_allclose(mapped[:, 0], 500_000.0 + 10.0 * xy[:, 0])
            np.testing.assert_allclose(mapped[:, 1], 5_800_000.0 - 10.0 * xy[:, 1])
    assert sum(len(a.polygons) for a in response.annotations) == 4


async def test_sixteen_bit_multiband_with_band_selection_and_scaling(stub):
    # Four 12-bit bands (blue, green, red, near-infrared, as satellites order them); the
    # quadrant's RGB in bands 3, 2, 1 at 12 bits, NIR noise in band 4.
    rgb = quadrant_image().astype(np.uint16) * 16  # 0..4080
    nir = np.random.default_rng(1).integers(0, 4096, (H, W), dtype=np.uint16)
    bands = np.dstack([rgb[:, :, 2], rgb[:, :, 1], rgb[:, :, 0], nir])
    source = geotiff(np.moveaxis(bands, -1, 0), planarconfig="separate")  # (S, H, W)
    chosen = await segment(stub, source, bands=[3, 2, 1], scaling=pb.SAMPLE_SCALING_MINMAX)
    np.testing.assert_array_equal(decode_srle(mask(chosen)), QUADRANT_LABELS)
    # SHIFT (the 16-bit default) of 12-bit data: everything below 16 of 255, all dark.
    shifted = await segment(stub, source, bands=[3, 2, 1])
    assert set(np.unique(decode_srle(mask(shifted)))) == {0}
    window = await segment(
        stub, source, bands=[3, 2, 1], scaling=pb.SAMPLE_SCALING_WINDOW,
        window_center=2040, window_width=4081,
    )  # fmt: skip
    np.testing.assert_array_equal(decode_srle(mask(window)), QUADRANT_LABELS)


async def test_float_band_defaults_to_minmax(stub):
    values = np.zeros((H, W), np.float32)
    values[:, W // 2 :] = 0.25  # e.g. reflectance: min..max -> 0..255
    response = await segment(stub, geotiff(values, tags=[]), bands=[1])
    expected = np.zeros((H, W), np.uint8)
    expected[:, W // 2 :] = 4
    np.testing.assert_array_equal(decode_srle(mask(response)), expected)


@pytest.mark.parametrize(
    ("fields", "source", "fragment"),
    [
        ({"bands": [5]}, "geo", "bands [5] asked for; the TIFF has 3 band(s)"),
        ({"bands": [1, 2]}, "geo", "is not one band or three"),
        ({"bands": [0]}, "geo", "is not one band or three"),
        ({"scaling": pb.SAMPLE_SCALING_WINDOW}, "geo16", "needs window_width > 0"),
        ({"encodings": [pb.MASK_ENCODING_GEOTIFF]}, "plain", "needs a georeferenced TIFF"),
        ({"encodings": [pb.MASK_ENCODING_GEOTIFF]}, "png", "needs a GeoTIFF input image"),
        ({"map_coordinates": True}, "png", "map_coordinates needs a GeoTIFF"),
        ({}, "truncated", "TIFF"),
        ({}, "bomb", "70000x10 pixels; the largest side"),
    ],
)
async def test_bad_tiff_requests(stub, fields, source, fragment):
    from tests.conftest import encode

    data = {
        "geo": lambda: geotiff(quadrant_image()),
        "geo16": lambda: geotiff(quadrant_image().astype(np.uint16)),
        "plain": lambda: geotiff(quadrant_image(), tags=[]),
        "png": lambda: encode(quadrant_image()),
        "truncated": lambda: geotiff(quadrant_image(), compression="zlib")[:200],
        "bomb": lambda: geotiff(np.zeros((10, 70_000), np.uint8), tags=[]),
    }[source]()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await segment(stub, data, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert fragment in caught.value.details()
    assert len(caught.value.details()) < 1200


async def test_large_real_geotiff_from_camvid(stub, camvid_frame):
    """A CamVid frame tiled 4x4 (1920x1440) as a deflate GeoTIFF: the GeoTIFF mask is the
    SRLE one, with the source's georeference, and both are the model's answer on the image
    (resized to the model's input as the server does, labels resized back nearest)."""
    import cv2

    frame = cv2.imdecode(np.frombuffer(camvid_frame, np.uint8), cv2.IMREAD_COLOR_RGB)
    assert frame is not None
    large = np.tile(frame, (4, 4, 1))
    source = geotiff(large, compression="zlib")
    response = await segment(
        stub, source, encodings=[pb.MASK_ENCODING_GEOTIFF, pb.MASK_ENCODING_SRLE]
    )
    labels, tags, _, _ = read_geotiff(mask(response, pb.MASK_ENCODING_GEOTIFF))
    assert labels.shape == large.shape[:2] and tags[34735] == GEOKEYS
    np.testing.assert_array_equal(labels, decode_srle(mask(response)))
    small = cv2.resize(large, (W, H), interpolation=cv2.INTER_LINEAR)
    expected = cv2.resize(
        expected_colour_labels(small), large.shape[1::-1], interpolation=cv2.INTER_NEAREST
    )
    assert (labels == expected).mean() > 0.99  # float rounding may flip a near-tie pixel


def test_many_band_tiffs_are_refused_by_their_decoded_size():
    """A small deflate TIFF of many bands decodes to far more than width x height suggests:
    refused from the IFD by the bytes it would decode, before any band is decoded."""
    from segserve_server.errors import InvalidArgument
    from segserve_server.pipeline.decode import ImageLimits
    from segserve_server.pipeline.formats_geotiff import MAX_BYTES_PER_PIXEL, decode_tiff
    from segserve_server.pipeline.scaling import DecodeOptions

    bands = 64
    data = geotiff(
        np.zeros((128, 128, bands), np.uint16),
        compression="zlib",
        photometric="minisblack",
        planarconfig="contig",
    )
    assert len(data) < 64 * 1024  # compresses to a few KiB
    limits = ImageLimits(128 * 128 * 4, 16384)  # the pixels pass; their bytes do not
    with pytest.raises(InvalidArgument) as refused:
        decode_tiff(data, limits, DecodeOptions())
    assert f"{bands} band(s)" in str(refused.value) and "max_image_pixels" in str(refused.value)
    decoded = decode_tiff(
        data, ImageLimits(128 * 128 * bands * 2 // MAX_BYTES_PER_PIXEL + 1, 16384), DecodeOptions()
    )
    assert decoded.pixels.shape[:2] == (128, 128)
