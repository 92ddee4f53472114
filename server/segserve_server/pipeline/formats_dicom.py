"""DICOM in (pydicom) and DICOM Segmentation out (highdicom): the `formats` extra.

Input: a DICOM Part 10 file ("DICM" at byte 128), one frame, 8- or 16-bit, MONOCHROME1/2, RGB
or YBR (converted to RGB). The header is read first (no pixel data) and Rows x Columns checked
against the limits before a pixel is decoded. Monochrome values go through the rescale
slope/intercept, then become 8-bit by the request's scaling; the default is a window: the
request's (window_center / window_width), else the file's first WindowCenter / WindowWidth,
else the image's min..max. MONOCHROME1 is inverted after that. Compressed transfer syntaxes
decode where pydicom has an installed plugin (RLE and deflate natively, JPEG baseline and
JPEG 2000 through Pillow, JPEG-LS through pyjpegls); others answer FAILED_PRECONDITION naming
the transfer syntax and the missing packages.

Output: a DICOM Segmentation (BINARY) referencing the source instance, one segment per class
present, labelled with the model's class name (segment numbers 1..N in ascending class id;
category and type coded in the private scheme 99SEGSERVE, the type's code value the class id).
The encoder re-reads the source's header from the request's bytes, so nothing of the source
needs to travel through the batcher.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np

from segserve_server.errors import FormatUnavailable, InvalidArgument
from segserve_server.pipeline.decode import DecodedImage, ImageLimits, check_size
from segserve_server.pipeline.scaling import (
    DecodeOptions,
    Scaling,
    optional_module,
    to_uint8,
    window_to_uint8,
)

__all__ = ["decode_dicom", "dicom_size", "encode_dicom_seg", "is_dicom", "read_header"]

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")
SCHEME = "99SEGSERVE"


def is_dicom(data: bytes | memoryview) -> bool:
    """A DICOM Part 10 file: 128-byte preamble, then "DICM"."""
    return len(data) >= 132 and bytes(data[128:132]) == b"DICM"


def read_header(data: bytes | memoryview, *, pixels: bool = False) -> Any:
    """The file's dataset (without its pixel data unless `pixels`); InvalidArgument if it does
    not parse."""
    pydicom = optional_module("pydicom", "DICOM input")
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels)
    except Exception as exc:  # pydicom raises many types for a corrupt file
        raise InvalidArgument(f"DICOM file does not parse: {type(exc).__name__}: {exc}") from exc


def _int(ds: Any, keyword: str, default: int) -> int:
    value = ds.get(keyword, default)
    try:
        return int(value if value not in (None, "") else default)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"DICOM {keyword} {str(value)[:40]!r} is not a number") from exc


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str | bytes | int | float):  # a MultiValue: its first value
        value = value[0] if len(value) else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def dicom_size(ds: Any) -> tuple[int, int]:
    """(width, height) of one frame, from the header; InvalidArgument for what is not served."""
    if "Rows" not in ds or "Columns" not in ds:
        raise InvalidArgument(
            "DICOM file has no image (no Rows / Columns): corrupt, or not an image object"
        )
    width, height = _int(ds, "Columns", 0), _int(ds, "Rows", 0)
    frames = _int(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise InvalidArgument(f"DICOM has {frames} frames; send one frame per request")
    bits = _int(ds, "BitsAllocated", 0)
    if bits not in (8, 16):
        raise InvalidArgument(f"DICOM BitsAllocated {bits} is not 8 or 16")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in _MONOCHROME + _COLOUR:
        raise InvalidArgument(
            f"DICOM PhotometricInterpretation {photometric[:40]!r} is not "
            "MONOCHROME1, MONOCHROME2, RGB or YBR"
        )
    return width, height


def _decoder(ds: Any) -> Any:
    get_decoder = optional_module("pydicom.pixels", "DICOM input").get_decoder

    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise InvalidArgument("DICOM file meta has no TransferSyntaxUID")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise FormatUnavailable(
            f"DICOM transfer syntax {syntax.name} ({syntax}) has no pixel decoder in pydicom"
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(str(m) for m in decoder.missing_dependencies)
        raise FormatUnavailable(
            f"DICOM transfer syntax {syntax.name} ({syntax}) cannot be decoded here: no installed "
            f"plugin (missing: {missing or 'a decoder'})"
        )
    return decoder


def decode_dicom(
    data: bytes | memoryview,
    limits: ImageLimits,
    options: DecodeOptions,
    *,
    order: Literal["RGB", "BGR"] = "RGB",
) -> DecodedImage:
    """A DICOM file's first frame as 8-bit pixels (grey (h, w) or colour (h, w, 3) in `order`)."""
    header = read_header(data)
    width, height = dicom_size(header)
    check_size(width, height, limits, "DICOM image")
    ds = read_header(data, pixels=True)
    if "PixelData" not in ds:
        raise InvalidArgument("DICOM file has no PixelData")
    decoder = _decoder(ds)
    try:
        array, meta = decoder.as_array(ds, index=0, as_rgb=True)
    except Exception as exc:  # the plugins raise many types for corrupt or short data
        raise InvalidArgument(
            f"DICOM pixel data does not decode: {type(exc).__name__}: {exc}"
        ) from exc
    if array.shape[:2] != (height, width):
        raise InvalidArgument(
            f"DICOM header says {width}x{height} but the pixels are "
            f"{array.shape[1]}x{array.shape[0]}"
        )
    bits_stored = _int(ds, "BitsStored", _int(ds, "BitsAllocated", 8))
    photometric = str(meta.get("photometric_interpretation", ds.PhotometricInterpretation))
    if array.ndim == 3:
        pixels = to_uint8(array, options, default=Scaling.SHIFT, shift_bits=max(bits_stored - 8, 0))
        if order == "BGR":
            pixels = np.ascontiguousarray(pixels[:, :, ::-1])
        return DecodedImage(pixels, order, width, height, "DICOM")
    pixels = _monochrome(array, ds, options, bits_stored)
    if photometric == "MONOCHROME1":
        pixels = 255 - pixels
    return DecodedImage(pixels, "GRAY", width, height, "DICOM")


def _monochrome(array: np.ndarray, ds: Any, options: DecodeOptions, bits_stored: int) -> np.ndarray:
    if options.scaling is Scaling.SHIFT:
        stored = array.astype(np.int64)
        if _int(ds, "PixelRepresentation", 0) == 1:
            stored += 1 << (bits_stored - 1)
        shifted: np.ndarray = np.clip(stored >> max(bits_stored - 8, 0), 0, 255)
        return shifted.astype(np.uint8)
    slope = _first(ds.get("RescaleSlope")) or 1.0
    intercept = _first(ds.get("RescaleIntercept")) or 0.0
    values = array.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if options.scaling is Scaling.MINMAX:
        return to_uint8(values, options, default=Scaling.MINMAX)
    if options.has_window:
        return window_to_uint8(values, options.window_center, options.window_width)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        return window_to_uint8(values, center, width)
    return to_uint8(values, DecodeOptions(Scaling.MINMAX), default=Scaling.MINMAX)


def encode_dicom_seg(
    labels: np.ndarray,
    source: bytes | memoryview,
    class_names: list[str],
    *,
    model: str,
    software_version: str,
) -> bytes:
    """A DICOM Segmentation (Part 10 bytes) of `labels` (the source's size) referencing the
    DICOM file `source`: one segment per class present."""
    hd = optional_module("highdicom", "MASK_ENCODING_DICOM_SEG")
    codes = optional_module("pydicom.sr.codedict", "MASK_ENCODING_DICOM_SEG").codes
    header = read_header(source)
    width, height = dicom_size(header)
    if labels.shape != (height, width):
        raise InvalidArgument(
            f"MASK_ENCODING_DICOM_SEG needs the mask at the source's size {width}x{height}, "
            f"not {labels.shape[1]}x{labels.shape[0]} (use OUTPUT_SIZE_ORIGINAL)"
        )
    present = [int(c) for c in np.flatnonzero(np.bincount(labels.ravel(), minlength=256))]
    numbers = np.zeros(256, dtype=np.uint8)
    numbers[present] = np.arange(1, len(present) + 1, dtype=np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model, family=codes.DCM.ArtificialIntelligence, version=software_version
    )
    category = hd.sr.CodedConcept("class", SCHEME, "segserve class")
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=_name(class_names, class_id),
            segmented_property_category=category,
            segmented_property_type=hd.sr.CodedConcept(
                str(class_id), SCHEME, _name(class_names, class_id)
            ),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, class_id in enumerate(present, start=1)
    ]
    try:
        seg = hd.seg.Segmentation(
            source_images=[header],
            pixel_array=numbers[labels],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=_int(header, "SeriesNumber", 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="segserve",
            manufacturer_model_name=model,
            software_versions=software_version,
            device_serial_number="segserve",
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise InvalidArgument(
            f"the DICOM source cannot be referenced by a Segmentation: {exc}"
        ) from exc
    out = io.BytesIO()
    seg.save_as(out)
    return out.getvalue()


def _name(class_names: list[str], class_id: int) -> str:
    return class_names[class_id][:64] if class_id < len(class_names) else f"class {class_id}"
