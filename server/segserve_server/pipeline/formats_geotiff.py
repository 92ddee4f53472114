"""TIFF and GeoTIFF in, georeferenced GeoTIFF masks out (tifffile, imagecodecs: the `formats` extra).

Input: the first page (IFD0) of a TIFF or BigTIFF. Its width, height and band count are read
from the IFD and checked against the limits before the pixels are decoded. Bands are chosen by
the request (`bands`, 1-based as GDAL numbers them: one for grey, three for R, G, B) or by
default (one band: grey; three or more: bands 1, 2, 3). Samples wider than 8 bits become 8-bit
by the request's scaling (default SHIFT for integers, MINMAX for floats; MINMAX and WINDOW take
the chosen bands together). Palette TIFFs go through their colour map; MINISWHITE is inverted.

Georeference: the GeoTIFF tags of IFD0 (ModelPixelScale 33550, ModelTiepoint 33922,
ModelTransformation 34264, GeoKeyDirectory 34735, GeoDoubleParams 34736, GeoAsciiParams 34737)
are copied into the mask's GeoTIFF as they are, but for the scale (or transformation) adjusted
when the mask is not at the source's size, so that the mask covers the same ground. The same
affine maps polygon vertices to map coordinates (X, Y in the source's CRS; pixel (0, 0) is the
top-left corner of the first pixel, the GeoTIFF raster space, whatever its GTRasterTypeGeoKey).
The encoder re-reads the source's IFD from the request's bytes (no pixels).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from segserve_server.errors import FormatUnavailable, InvalidArgument
from segserve_server.pipeline.decode import DecodedImage, ImageLimits, check_size
from segserve_server.pipeline.scaling import (
    DecodeOptions,
    Scaling,
    optional_module,
    to_uint8,
)

__all__ = [
    "GEO_TAGS",
    "MAX_BYTES_PER_PIXEL",
    "GeoReference",
    "decode_tiff",
    "encode_geotiff",
    "georeference",
    "is_tiff",
    "map_affine",
    "tiff_size",
]

GEO_TAGS = (33550, 33922, 34264, 34735, 34736, 34737)
_PIXEL_SCALE, _TIEPOINT, _TRANSFORMATION, _GEOKEYS = 33550, 33922, 34264, 34735
_MAX_BANDS = 1024
MAX_BYTES_PER_PIXEL = 8
"""Decoded bytes per pixel a TIFF may take, all bands together (e.g. four 16-bit bands)."""


def is_tiff(data: bytes | memoryview) -> bool:
    """A TIFF (II*\\0 or MM\\0*) or BigTIFF (II+\\0, MM\\0+) header."""
    return bytes(data[:4]) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _open(data: bytes | memoryview, what: str) -> Any:
    tifffile = optional_module("tifffile", what)
    try:
        tif = tifffile.TiffFile(io.BytesIO(data))
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error, ...
        raise InvalidArgument(f"TIFF does not parse: {type(exc).__name__}: {exc}") from exc
    if not len(tif.pages):
        tif.close()
        raise InvalidArgument("TIFF has no image (no IFD)")
    return tif


def _page_geometry(page: Any) -> tuple[int, int, int]:
    width, height, bands = int(page.imagewidth), int(page.imagelength), int(page.samplesperpixel)
    if bands < 1 or bands > _MAX_BANDS:
        raise InvalidArgument(f"TIFF has {bands} bands per pixel; at most {_MAX_BANDS} are read")
    if int(getattr(page, "imagedepth", 1)) > 1:
        raise InvalidArgument("TIFF page is a volume (ImageDepth > 1); send one 2-D image")
    return width, height, bands


def _bands(array: np.ndarray, axes: str) -> np.ndarray:
    """The page's array as (H, W, S)."""
    if axes == "YX":
        return array[:, :, None]
    if axes == "YXS":
        return array
    if axes == "SYX":
        return np.moveaxis(array, 0, -1)
    raise InvalidArgument(f"TIFF page has axes {axes!r}; only 2-D images (YX, YXS, SYX) are read")


def tiff_size(data: bytes | memoryview) -> tuple[int, int]:
    """(width, height) of IFD0, from the IFD alone (no pixel is decoded)."""
    tif = _open(data, "TIFF input")
    with tif:
        width, height, _ = _page_geometry(tif.pages[0])
    return width, height


def decode_tiff(
    data: bytes | memoryview,
    limits: ImageLimits,
    options: DecodeOptions,
    *,
    order: Literal["RGB", "BGR"] = "RGB",
) -> DecodedImage:
    """IFD0 of a TIFF as 8-bit pixels: grey (h, w) or colour (h, w, 3) in `order`."""
    tif = _open(data, "TIFF input")
    with tif:
        page = tif.pages[0]
        width, height, count = _page_geometry(page)
        check_size(width, height, limits, "TIFF image")
        chosen = options.bands or ((1,) if count < 3 else (1, 2, 3))
        if max(chosen) > count:
            raise InvalidArgument(f"bands {list(chosen)} asked for; the TIFF has {count} band(s)")
        # Every band is decoded: bound the decoded bytes, not only width x height (a small
        # deflate TIFF of many bands is a decompression bomb).
        decoded_bytes = width * height * count * int(page.dtype.itemsize if page.dtype else 8)
        budget_bytes = limits.max_pixels * MAX_BYTES_PER_PIXEL
        if decoded_bytes > budget_bytes:
            raise InvalidArgument(
                f"TIFF image {width}x{height} with {count} band(s) of "
                f"{page.dtype} decodes to {decoded_bytes} bytes, over the {budget_bytes} bytes "
                f"max_image_pixels allows ({MAX_BYTES_PER_PIXEL} bytes per pixel)"
            )
        try:
            array = page.asarray()
        except (ValueError, NotImplementedError, RuntimeError) as exc:
            if "imagecodecs" in str(exc) or isinstance(exc, NotImplementedError):
                raise FormatUnavailable(
                    f"TIFF compression {page.compression!r} cannot be decoded here: {exc}"
                ) from exc
            raise InvalidArgument(f"TIFF pixels do not decode: {exc}") from exc
        except Exception as exc:  # the codecs raise their own types for corrupt data
            raise InvalidArgument(
                f"TIFF pixels do not decode: {type(exc).__name__}: {exc}"
            ) from exc
        photometric = int(page.photometric)
        colormap = page.colormap if photometric == 3 else None
        geo = any(tag in page.tags for tag in (_GEOKEYS, _TIEPOINT, _TRANSFORMATION))
    stack = _bands(array, str(page.axes))
    if stack.shape[:2] != (height, width):
        raise InvalidArgument(
            f"TIFF header says {width}x{height} but the pixels are {stack.shape[1]}x{stack.shape[0]}"
        )
    selected = stack[:, :, [b - 1 for b in chosen]]
    if colormap is not None and len(chosen) == 1:  # palette: indices through the colour map
        lut = np.asarray(colormap, dtype=np.uint16).T  # (entries, 3), 16-bit colours
        index = np.clip(selected[:, :, 0].astype(np.int64), 0, lut.shape[0] - 1)
        selected = lut[index]
    if selected.dtype == np.bool_:
        selected = selected.astype(np.uint8) * np.uint8(255)
    default = Scaling.MINMAX if selected.dtype.kind == "f" else options.integer_default
    pixels = to_uint8(selected, options, default=default)
    if photometric == 0:  # MINISWHITE
        pixels = 255 - pixels
    fmt = "GeoTIFF" if geo else "TIFF"
    if pixels.shape[2] == 1:
        return DecodedImage(np.ascontiguousarray(pixels[:, :, 0]), "GRAY", width, height, fmt)
    if order == "BGR":
        pixels = pixels[:, :, ::-1]
    return DecodedImage(np.ascontiguousarray(pixels), order, width, height, fmt)


@dataclass(frozen=True)
class GeoReference:
    """The GeoTIFF tags of a source and the affine it defines (pixel -> map)."""

    width: int
    height: int
    tags: dict[int, tuple[int, tuple[Any, ...] | str]]  # code -> (TIFF data type, value)
    affine: tuple[float, float, float, float, float, float]  # X = a*i + b*j + c, Y = d*i + e*j + f


def _affine(tags: dict[int, tuple[int, tuple[Any, ...] | str]]) -> tuple[float, ...] | None:
    if _TRANSFORMATION in tags:
        m = [float(v) for v in tags[_TRANSFORMATION][1]]
        if len(m) == 16:
            return m[0], m[1], m[3], m[4], m[5], m[7]
    if _TIEPOINT in tags and _PIXEL_SCALE in tags:
        tie = [float(v) for v in tags[_TIEPOINT][1]]
        scale = [float(v) for v in tags[_PIXEL_SCALE][1]]
        if len(tie) >= 6 and len(scale) >= 2:
            i, j, x, y = tie[0], tie[1], tie[3], tie[4]
            return scale[0], 0.0, x - i * scale[0], 0.0, -scale[1], y + j * scale[1]
    return None


def georeference(data: bytes | memoryview) -> GeoReference | None:
    """The GeoTIFF georeference of a TIFF's IFD0, or None if it is not a georeferenced TIFF."""
    if not is_tiff(data):
        return None
    tif = _open(data, "MASK_ENCODING_GEOTIFF")
    with tif:
        page = tif.pages[0]
        tags: dict[int, tuple[int, tuple[Any, ...] | str]] = {}
        for code in GEO_TAGS:
            tag = page.tags.get(code)
            if tag is not None:
                value = tag.value
                tags[code] = (int(tag.dtype), value if isinstance(value, str) else tuple(value))
        width, height = int(page.imagewidth), int(page.imagelength)
    affine = _affine(tags)
    if _GEOKEYS not in tags or affine is None:
        return None
    return GeoReference(width, height, tags, affine)  # type: ignore[arg-type]


def _scaled_tags(
    geo: GeoReference, fx: float, fy: float
) -> dict[int, tuple[int, tuple[Any, ...] | str]]:
    """The tags for a raster of the same ground at (width / fx, height / fy) pixels."""
    tags = dict(geo.tags)
    if fx == 1.0 and fy == 1.0:
        return tags
    if _PIXEL_SCALE in tags:
        kind, scale = tags[_PIXEL_SCALE]
        sx, sy, *rest = (float(v) for v in scale)
        tags[_PIXEL_SCALE] = (kind, (sx * fx, sy * fy, *rest))
    if _TIEPOINT in tags:
        kind, tie = tags[_TIEPOINT]
        values = [float(v) for v in tie]
        for k in range(0, len(values) - 5, 6):
            values[k] /= fx
            values[k + 1] /= fy
        tags[_TIEPOINT] = (kind, tuple(values))
    if _TRANSFORMATION in tags:
        kind, matrix = tags[_TRANSFORMATION]
        m = [float(v) for v in matrix]
        for row in range(4):
            m[4 * row] *= fx
            m[4 * row + 1] *= fy
        tags[_TRANSFORMATION] = (kind, tuple(m))
    return tags


def map_affine(
    source: bytes | memoryview, width: int, height: int
) -> tuple[float, float, float, float, float, float]:
    """The affine from the (width x height) mask's pixels to the source's map coordinates;
    InvalidArgument if the source is not a georeferenced TIFF."""
    geo = georeference(source)
    if geo is None:
        raise InvalidArgument("map_coordinates needs a georeferenced TIFF (GeoTIFF) input")
    fx, fy = geo.width / width, geo.height / height
    a, b, c, d, e, f = geo.affine
    return a * fx, b * fy, c, d * fx, e * fy, f


def encode_geotiff(labels: np.ndarray, source: bytes | memoryview) -> bytes:
    """`labels` as a uint8 GeoTIFF (deflate) with the georeference of the GeoTIFF `source`."""
    tifffile = optional_module("tifffile", "MASK_ENCODING_GEOTIFF")
    geo = georeference(source)
    if geo is None:
        raise InvalidArgument(
            "MASK_ENCODING_GEOTIFF needs a georeferenced TIFF (GeoTIFF) input; this one has no "
            "GeoKeyDirectory with a tiepoint and pixel scale or a transformation"
        )
    height, width = labels.shape
    tags = _scaled_tags(geo, geo.width / width, geo.height / height)
    extratags = [
        (code, kind, len(value) if not isinstance(value, str) else 0, value, True)
        for code, (kind, value) in sorted(tags.items())
    ]
    out = io.BytesIO()
    tifffile.imwrite(
        out,
        np.ascontiguousarray(labels, dtype=np.uint8),
        photometric="minisblack",
        compression="zlib",
        compressionargs={"level": 1},  # masks compress well at level 1 (fast)
        extratags=extratags,
        metadata=None,
    )
    return out.getvalue()
