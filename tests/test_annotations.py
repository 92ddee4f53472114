"""The annotation tools' formats through the real server (SegmentRequest.annotations), decoded
by the tools' own code: pycocotools, cvat-sdk and Label Studio's converter."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from segserve.v1 import segserve_pb2 as pb
from segserve_client.formats.polygons import Region, rasterize
from tests.conftest import encode

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")

ALL = [
    pb.ANNOTATION_FORMAT_COCO_RLE,
    pb.ANNOTATION_FORMAT_CVAT_MASK,
    pb.ANNOTATION_FORMAT_LABEL_STUDIO_RLE,
    pb.ANNOTATION_FORMAT_POLYGONS,
]


def street(height: int = 120, width: int = 200) -> np.ndarray:
    """Shapes of the colour model's classes at a size other than the model's: a ring with a
    hole, a diagonal band, blobs, so that masks, boxes and holes all matter."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    ring = ((yy - 60) ** 2 + (xx - 60) ** 2 < 40**2) & ((yy - 60) ** 2 + (xx - 60) ** 2 > 15**2)
    image[ring] = (255, 0, 0)
    image[np.abs(yy - (xx - 80) * 0.6) < 8] = (0, 255, 0)
    image[(yy > 90) & (xx > 150)] = (0, 0, 255)
    image[(yy < 20) & (xx > 170)] = (255, 255, 255)
    return image


async def segment(stub, formats, tolerance: float = 0.0) -> pb.SegmentResponse:
    request = pb.SegmentRequest(
        model="colour",
        image=pb.Image(encoded=encode(street())),
        encodings=[pb.MASK_ENCODING_RAW],
        annotations=formats,
        polygon_tolerance_px=tolerance,
    )
    return await stub.Segment(request, timeout=30)


async def test_every_format_decodes_with_the_tools_own_code(stub):
    from cvat_sdk.masks import decode_mask
    from label_studio_converter import brush
    from pycocotools import mask as coco

    response = await segment(stub, ALL)
    height, width = response.height, response.width
    labels = np.frombuffer(response.masks[0].data, np.uint8).reshape(height, width)
    present = sorted(int(c) for c in np.unique(labels))
    assert [a.class_id for a in response.annotations] == present
    assert len(present) >= 4
    names = {c.class_id: c.name for c in response.classes}
    for annotation in response.annotations:
        truth = labels == annotation.class_id
        assert annotation.name == names[annotation.class_id]
        rle = {"size": [height, width], "counts": annotation.coco_rle_counts.encode()}
        np.testing.assert_array_equal(coco.decode(rle).astype(bool), truth)
        assert annotation.area == int(truth.sum()) == int(coco.area(rle))
        assert list(annotation.bbox) == [int(v) for v in coco.toBbox(rle)]
        cvat = decode_mask(list(annotation.cvat_mask), image_width=width, image_height=height)
        np.testing.assert_array_equal(cvat, truth)
        rgba = np.asarray(brush.decode_rle(list(annotation.label_studio_rle)), np.uint8)
        np.testing.assert_array_equal(rgba.reshape(height, width, 4)[:, :, 3] == 255, truth)
        regions = [
            Region(
                outer=np.asarray(r.outer.xy).reshape(-1, 2).tolist(),
                holes=[np.asarray(h.xy).reshape(-1, 2).tolist() for h in r.holes],
            )
            for r in annotation.polygons
        ]
        np.testing.assert_array_equal(rasterize(regions, height, width), truth)  # tolerance 0
    ring = next(a for a in response.annotations if a.class_id == 1)
    assert any(region.holes for region in ring.polygons)


async def test_formats_not_asked_for_stay_empty_and_none_asked_means_no_annotations(stub):
    response = await segment(stub, [pb.ANNOTATION_FORMAT_COCO_RLE])
    assert response.annotations and all(a.coco_rle_counts for a in response.annotations)
    assert not any(a.cvat_mask or a.label_studio_rle or a.polygons for a in response.annotations)
    assert not (await segment(stub, [])).annotations


async def test_polygon_tolerance_simplifies(stub):
    exact = await segment(stub, [pb.ANNOTATION_FORMAT_POLYGONS], 0.0)
    simple = await segment(stub, [pb.ANNOTATION_FORMAT_POLYGONS], 2.0)

    def points(response: pb.SegmentResponse) -> int:
        return sum(len(r.outer.xy) for a in response.annotations for r in a.polygons)

    assert points(simple) < points(exact)


@pytest.mark.parametrize(
    ("formats", "tolerance", "fragment"),
    [
        ([9], 0.0, "annotation format 9"),
        ([pb.ANNOTATION_FORMAT_COCO_RLE, pb.ANNOTATION_FORMAT_COCO_RLE], 0.0, "repeat"),
        ([pb.ANNOTATION_FORMAT_POLYGONS], -1.0, "polygon_tolerance_px -1.0"),
        ([pb.ANNOTATION_FORMAT_POLYGONS], float("nan"), "polygon_tolerance_px nan"),
    ],
)
async def test_bad_annotation_requests_are_invalid_argument(stub, formats, tolerance, fragment):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await segment(stub, formats, tolerance)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (err.value.details() or "")


async def test_the_client_library_asks_for_and_decodes_annotations(server):
    from pycocotools import mask as coco

    from segserve_client import AsyncSegserveClient

    async with AsyncSegserveClient(f"127.0.0.1:{server.port}", timeout_s=30) as client:
        result = await client.segment(
            street(), "colour", encodings="raw", annotations=("coco_rle", "cvat_mask", "polygons")
        )
        with pytest.raises(ValueError, match="annotation format"):
            await client.segment(street(), "colour", annotations=("shapefile",))
    labels = result.labels
    assert [a.class_id for a in result.annotations] == sorted(int(c) for c in np.unique(labels))
    for annotation in result.annotations:
        truth = labels == annotation.class_id
        np.testing.assert_array_equal(annotation.mask(result.height, result.width), truth)
        rle = annotation.coco_rle(result.height, result.width)
        np.testing.assert_array_equal(
            coco.decode({**rle, "counts": rle["counts"].encode()}).astype(bool), truth
        )
        np.testing.assert_array_equal(
            rasterize(annotation.polygons, result.height, result.width), truth
        )
        assert annotation.name and annotation.area == int(truth.sum())
