"""Label maps and masks in the mask formats of annotation tools, lossless, and back.

- `coco`: COCO compressed RLE (pycocotools' `counts` string), per mask and per class with area
  and bbox.
- `cvat`: CVAT mask shapes (`points`: run lengths over the box, then the box, as
  `cvat_sdk.masks.encode_mask`), the box bitmap its serverless detectors return, and connected
  regions (4 or 8) for one shape per region.
- `labelstudio`: Label Studio brush `rle` (rle-pack over RGBA), byte for byte as the converter's
  `brush.mask2rle`.
- `polygons`: polygons with holes (OpenCV, imported when called) and their rasterisation
  (`polygons.polygons(mask)` for one mask).

The first three use numpy alone, vectorised over runs, never a Python step per pixel.
"""

from segserve_client.formats.coco import (
    CocoClassMask,
    CocoRle,
    coco_rle,
    coco_rle_per_class,
    decode_coco_rle,
)
from segserve_client.formats.cvat import (
    CvatShape,
    connected_regions,
    cvat_bitmap,
    cvat_mask,
    cvat_masks_per_class,
    decode_cvat_bitmap,
    decode_cvat_mask,
)
from segserve_client.formats.labelstudio import (
    LabelStudioClassMask,
    decode_labelstudio_rle,
    labelstudio_rle,
    labelstudio_rle_per_class,
)

# `polygons` the function stays in its module, so that `formats.polygons` is the module.
from segserve_client.formats.polygons import (
    ClassPolygons,
    Region,
    polygons_per_class,
    rasterize,
)

__all__ = [
    "ClassPolygons",
    "CocoClassMask",
    "CocoRle",
    "CvatShape",
    "LabelStudioClassMask",
    "Region",
    "coco_rle",
    "coco_rle_per_class",
    "connected_regions",
    "cvat_bitmap",
    "cvat_mask",
    "cvat_masks_per_class",
    "decode_coco_rle",
    "decode_cvat_bitmap",
    "decode_cvat_mask",
    "decode_labelstudio_rle",
    "labelstudio_rle",
    "labelstudio_rle_per_class",
    "polygons_per_class",
    "rasterize",
]
