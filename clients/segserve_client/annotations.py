"""The annotation tools' per-class formats in an answer (SegmentRequest.annotations): what the
server sent for each class present, and the masks they decode to."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from segserve.v1 import segserve_pb2 as pb
from segserve_client.formats.coco import CocoRle, decode_coco_rle
from segserve_client.formats.cvat import decode_cvat_mask
from segserve_client.formats.labelstudio import decode_labelstudio_rle
from segserve_client.formats.polygons import Region

__all__ = ["ANNOTATION_FORMATS", "ClassAnnotation"]

ANNOTATION_FORMATS: dict[str, pb.AnnotationFormat] = {
    "coco_rle": pb.ANNOTATION_FORMAT_COCO_RLE,
    "cvat_mask": pb.ANNOTATION_FORMAT_CVAT_MASK,
    "label_studio_rle": pb.ANNOTATION_FORMAT_LABEL_STUDIO_RLE,
    "polygons": pb.ANNOTATION_FORMAT_POLYGONS,
}


def _points(ring: pb.Ring) -> list[list[int]]:
    xy = list(ring.xy)
    return [[xy[i], xy[i + 1]] for i in range(0, len(xy) - 1, 2)]


@dataclass(frozen=True)
class ClassAnnotation:
    """One class of the label map in the formats asked for; those not asked for are empty.

    `coco_rle(height, width)` is the dict pycocotools takes; `cvat_mask` the points of CVAT's
    mask shape; `label_studio_rle` the brush tool's `value.rle` list; `polygons` the regions
    ({"outer": [[x, y], ...], "holes": [...]}).
    """

    class_id: int
    name: str
    area: int
    bbox: tuple[int, int, int, int]  # x, y, width, height
    coco_rle_counts: str = ""
    cvat_mask: list[int] = field(default_factory=list)
    label_studio_rle: list[int] = field(default_factory=list)
    polygons: list[Region] = field(default_factory=list)

    def coco_rle(self, height: int, width: int) -> CocoRle:
        return {"size": [height, width], "counts": self.coco_rle_counts}

    def mask(self, height: int, width: int) -> np.ndarray:
        """The class's (height, width) bool mask, from the first lossless format present."""
        if self.coco_rle_counts:
            return np.ascontiguousarray(decode_coco_rle(self.coco_rle(height, width)))
        if self.cvat_mask:
            return decode_cvat_mask(self.cvat_mask, height, width)
        if self.label_studio_rle:
            return decode_labelstudio_rle(self.label_studio_rle, height, width) > 0
        raise ValueError(f"class {self.class_id} came with no lossless format to decode")

    @classmethod
    def from_proto(cls, annotation: pb.ClassAnnotation) -> ClassAnnotation:
        x, y, w, h = [*annotation.bbox, 0, 0, 0, 0][:4]
        return cls(
            class_id=annotation.class_id,
            name=annotation.name,
            area=annotation.area,
            bbox=(x, y, w, h),
            coco_rle_counts=annotation.coco_rle_counts,
            cvat_mask=list(annotation.cvat_mask),
            label_studio_rle=list(annotation.label_studio_rle),
            polygons=[
                Region(outer=_points(r.outer), holes=[_points(hole) for hole in r.holes])
                for r in annotation.polygons
            ],
        )
