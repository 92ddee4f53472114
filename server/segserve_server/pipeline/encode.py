"""Encode stage: a (H, W) uint8 label map to the mask encodings a request asked for, and to
the annotation tools' per-class formats (COCO RLE, CVAT mask, Label Studio brush, polygons).

The codecs themselves are the client package's (`segserve_client.masks`), so the server writes
exactly what the client decodes; the client installs with grpcio, protobuf and numpy alone.
DICOM SEG and GeoTIFF masks (the `formats` extra) are pipeline/formats_dicom.py's and
formats_geotiff.py's: they reference the source image, whose bytes they are given (`source`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from segserve_client import formats as formats_lib
from segserve_client import masks
from segserve_client.formats import polygons as polygon_codec
from segserve_server.errors import InvalidArgument

__all__ = [
    "DEFAULT_ENCODINGS",
    "AnnotationFormat",
    "ClassAnnotation",
    "MaskEncoding",
    "Region",
    "check_annotation_formats",
    "check_encodings",
    "check_source_outputs",
    "encode_annotations",
    "encode_masks",
]


class MaskEncoding(enum.Enum):
    SRLE = "srle"
    PNG = "png"
    RAW = "raw"
    DICOM_SEG = "dicom_seg"
    GEOTIFF = "geotiff"


DEFAULT_ENCODINGS = (MaskEncoding.SRLE,)


def check_encodings(encodings: tuple[MaskEncoding, ...]) -> tuple[MaskEncoding, ...]:
    """The encodings to produce: SRLE when none is asked for; InvalidArgument on a repeat."""
    if not encodings:
        return DEFAULT_ENCODINGS
    if len(set(encodings)) != len(encodings):
        raise InvalidArgument(
            f"encodings repeat an encoding ({len(encodings)} given: {[e.value for e in encodings]})"
        )
    return encodings


def check_source_outputs(
    encodings: tuple[MaskEncoding, ...],
    image: object,
    *,
    output_model_size: bool = False,
    map_coordinates: bool = False,
) -> None:
    """Before anything runs: DICOM SEG needs a DICOM input at the original size, GeoTIFF masks
    and map coordinates a TIFF input (its georeference is checked when the mask is written)."""
    encoded = isinstance(image, bytes | memoryview)
    head = bytes(image[:132]) if isinstance(image, bytes | memoryview) else b""
    if MaskEncoding.DICOM_SEG in encodings:
        if not (encoded and head[128:132] == b"DICM"):
            raise InvalidArgument("MASK_ENCODING_DICOM_SEG needs a DICOM (Part 10) input image")
        if output_model_size:
            raise InvalidArgument(
                "MASK_ENCODING_DICOM_SEG needs OUTPUT_SIZE_ORIGINAL (the source's size)"
            )
    tiff = encoded and head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    if MaskEncoding.GEOTIFF in encodings and not tiff:
        raise InvalidArgument("MASK_ENCODING_GEOTIFF needs a GeoTIFF input image")
    if map_coordinates and not tiff:
        raise InvalidArgument("map_coordinates needs a GeoTIFF input image")


def encode_masks(
    labels: np.ndarray,
    encodings: Sequence[MaskEncoding],
    *,
    palette: list[tuple[int, int, int]] | None = None,
    zlib_level: int = 1,
    source: bytes | memoryview | None = None,
    class_names: list[str] | None = None,
    model: str = "",
) -> list[tuple[MaskEncoding, bytes]]:
    """Each encoding of `labels`, in the order asked; `palette` is embedded in PNGs if given.
    DICOM_SEG and GEOTIFF need the encoded source image (`source`); DICOM_SEG labels its
    segments with `class_names` and names `model` as the algorithm."""
    encoded = []
    for encoding in encodings:
        if encoding is MaskEncoding.SRLE:
            data = masks.encode_srle(labels, zlib_level=zlib_level)
        elif encoding is MaskEncoding.PNG:
            data = masks.encode_png(labels, palette=palette, zlib_level=zlib_level)
        elif encoding in (MaskEncoding.DICOM_SEG, MaskEncoding.GEOTIFF):
            if source is None:
                raise InvalidArgument(f"mask encoding {encoding.value} needs an encoded image")
            data = _source_mask(labels, encoding, source, class_names or [], model)
        else:
            data = labels.tobytes()
        encoded.append((encoding, data))
    return encoded


def _source_mask(
    labels: np.ndarray,
    encoding: MaskEncoding,
    source: bytes | memoryview,
    class_names: list[str],
    model: str,
) -> bytes:
    if encoding is MaskEncoding.DICOM_SEG:
        from segserve_server import __version__
        from segserve_server.pipeline.formats_dicom import encode_dicom_seg

        return encode_dicom_seg(
            labels, source, class_names, model=model or "segserve", software_version=__version__
        )
    from segserve_server.pipeline.formats_geotiff import encode_geotiff

    return encode_geotiff(labels, source)


class AnnotationFormat(enum.Enum):
    COCO_RLE = "coco_rle"
    CVAT_MASK = "cvat_mask"
    LABEL_STUDIO_RLE = "label_studio_rle"
    POLYGONS = "polygons"


@dataclass(frozen=True)
class ClassAnnotation:
    """One class of a label map in the annotation tools' formats (only those asked for set)."""

    class_id: int
    area: int
    bbox: tuple[int, int, int, int]  # x, y, width, height
    coco_rle_counts: str = ""
    cvat_mask: tuple[int, ...] = ()
    label_studio_rle: bytes = b""
    polygons: tuple[Region, ...] = ()


@dataclass(frozen=True)
class Region:
    outer: tuple[int, ...]  # x0, y0, x1, y1, ...
    holes: tuple[tuple[int, ...], ...] = ()
    map_outer: tuple[float, ...] = ()  # the same in map coordinates, X0, Y0, ... (if asked)
    map_holes: tuple[tuple[float, ...], ...] = ()


def check_annotation_formats(
    formats: tuple[AnnotationFormat, ...], polygon_tolerance_px: float
) -> tuple[AnnotationFormat, ...]:
    """The formats, or InvalidArgument on a repeat or a bad polygon tolerance."""
    if len(set(formats)) != len(formats):
        raise InvalidArgument(
            f"annotations repeat a format ({len(formats)} given: {[f.value for f in formats]})"
        )
    if not math.isfinite(polygon_tolerance_px) or polygon_tolerance_px < 0:
        raise InvalidArgument(
            f"polygon_tolerance_px {polygon_tolerance_px} is not a number of pixels >= 0"
        )
    return formats


def _flat(points: list[list[int]]) -> tuple[int, ...]:
    return tuple(int(v) for point in points for v in point)


_Affine = tuple[float, float, float, float, float, float]


def _mapped(points: list[list[int]], affine: _Affine | None) -> tuple[float, ...]:
    """Pixel vertices (x, y) through X = a*x + b*y + c, Y = d*x + e*y + f."""
    if affine is None:
        return ()
    a, b, c, d, e, f = affine
    return tuple(v for x, y in points for v in (a * x + b * y + c, d * x + e * y + f))


def encode_annotations(
    labels: np.ndarray,
    formats: Sequence[AnnotationFormat],
    *,
    polygon_tolerance_px: float = 0.0,
    map_affine: _Affine | None = None,
) -> list[ClassAnnotation]:
    """One ClassAnnotation per class present in `labels`, by ascending class id, in each
    format asked for (the codecs of segserve_client.formats, shared with the client).
    `map_affine` (pixel -> map): polygons also in map coordinates."""
    if not formats:
        return []
    coco = {c["class_id"]: c for c in formats_lib.coco_rle_per_class(labels)}
    wanted = set(formats)
    cvat = (
        {s["class_id"]: s["points"] for s in formats_lib.cvat_masks_per_class(labels)}
        if AnnotationFormat.CVAT_MASK in wanted
        else {}
    )
    brush = (
        {m["class_id"]: m["rle"] for m in formats_lib.labelstudio_rle_per_class(labels)}
        if AnnotationFormat.LABEL_STUDIO_RLE in wanted
        else {}
    )
    polygons = (
        {
            c["class_id"]: c["regions"]
            for c in polygon_codec.polygons_per_class(labels, tolerance_px=polygon_tolerance_px)
        }
        if AnnotationFormat.POLYGONS in wanted
        else {}
    )
    annotations = []
    for class_id, entry in sorted(coco.items()):
        x, y, w, h = (int(v) for v in entry["bbox"])
        annotations.append(
            ClassAnnotation(
                class_id=class_id,
                area=int(entry["area"]),
                bbox=(x, y, w, h),
                coco_rle_counts=(
                    str(entry["rle"]["counts"]) if AnnotationFormat.COCO_RLE in wanted else ""
                ),
                cvat_mask=tuple(int(v) for v in cvat.get(class_id, ())),
                label_studio_rle=bytes(brush.get(class_id, ())),
                polygons=tuple(
                    Region(
                        _flat(region["outer"]),
                        tuple(_flat(hole) for hole in region["holes"]),
                        _mapped(region["outer"], map_affine),
                        tuple(_mapped(hole, map_affine) for hole in region["holes"])
                        if map_affine is not None
                        else (),
                    )
                    for region in polygons.get(class_id, ())
                ),
            )
        )
    return annotations
