"""Whole-folder import files for annotation tools, and reading label maps back from them.

Written by `segserve-client prefill`, read by `segserve-client diff`:

- `coco`: a COCO instances JSON. One annotation per class present in an image, `segmentation`
  a compressed RLE `{"size": [h, w], "counts": str}` (what `pycocotools.coco.COCO.annToMask`
  decodes), `category_id` the class id (so category ids are the label map's values), `area`,
  `bbox` [x, y, w, h], `iscrowd` 0 by default: each annotation is the whole region of one class,
  which COCOeval should match as an ordinary instance (with `iscrowd` 1 it would be an "ignore"
  region many detections may match); pycocotools decodes compressed RLE either way. Image and
  annotation ids start at 1. Class 0 is kept as a category unless `skip_classes` says otherwise.
  An annotation has `score`, the class's mean confidence, when its record has one (a model with
  confidence); none otherwise.
- `labelstudio`: a JSON list of tasks, each `{"data": {"image": ...}, "predictions": [...]}` with
  one `brushlabels` result per class (`value.format` "rle", `value.rle` the brush rle). With
  confidence, the prediction's `score` is the image's mean confidence and each result's `score`
  its class's mean confidence; without (a labels-only model) the prediction's score is a fixed
  1.0 stand-in and results have none.
- `cvat`: "CVAT for images 1.1" annotations.xml, one `<mask>` per class and image, as CVAT's
  own exporter writes it: `rle` the run lengths over the box (background first, ", " between
  them), `left`, `top`, `width`, `height` the box; zipped (annotations.xml at the zip root) when
  the output ends with .zip, which is what CVAT's "Upload annotations" takes. (CVAT's format has
  no score for a shape: confidence is not written.)
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import numpy.typing as npt

from segserve_client.formats.coco import decode_coco_rle
from segserve_client.formats.cvat import decode_cvat_mask
from segserve_client.formats.labelstudio import decode_labelstudio_rle
from segserve_client.masks import decode_png

__all__ = [
    "EXPORT_FORMATS",
    "ImageRecord",
    "coco_document",
    "cvat_xml",
    "labelstudio_tasks",
    "read_label_maps",
    "write_export",
]

EXPORT_FORMATS = ("coco", "cvat", "labelstudio")
# The SegmentRequest.annotations each export needs.
ANNOTATION_OF_FORMAT = {"coco": "coco_rle", "cvat": "cvat_mask", "labelstudio": "label_studio_rle"}

ImageRecord = dict[str, Any]
"""One segmented image: {"file", "width", "height", "format", "annotations": [{"class_id",
"name", "area", "bbox", and "coco_rle_counts" | "cvat_mask" | "label_studio_rle", and "score"
with confidence}], and "score" (the image's mean confidence) with confidence}."""

Classes = Sequence[tuple[int, str, tuple[int, int, int]]]
"""The model's classes: (id, name, colour)."""


def _kept(record: ImageRecord, skip: Iterable[int]) -> list[dict[str, Any]]:
    skipped = set(skip)
    return [a for a in record["annotations"] if a["class_id"] not in skipped]


def coco_document(
    records: Sequence[ImageRecord],
    classes: Classes,
    *,
    iscrowd: int = 0,
    skip_classes: Iterable[int] = (),
) -> dict[str, Any]:
    """A COCO instances document of `records`, categories from `classes`."""
    skip = set(skip_classes)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, record in enumerate(records, start=1):
        images.append(
            {
                "id": image_id,
                "file_name": record["file"],
                "width": record["width"],
                "height": record["height"],
            }
        )
        for a in _kept(record, skip):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": a["class_id"],
                    "segmentation": {
                        "size": [record["height"], record["width"]],
                        "counts": a["coco_rle_counts"],
                    },
                    "area": a["area"],
                    "bbox": list(a["bbox"]),
                    "iscrowd": iscrowd,
                }
                | ({"score": a["score"]} if "score" in a else {})
            )
    categories = [
        {"id": cid, "name": name, "supercategory": ""}
        for cid, name, _ in classes
        if cid not in skip
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def labelstudio_tasks(
    records: Sequence[ImageRecord],
    *,
    model_version: str,
    from_name: str = "tag",
    to_name: str = "image",
    image_url_prefix: str = "",
    skip_classes: Iterable[int] = (),
) -> list[dict[str, Any]]:
    """Label Studio tasks with the brush masks as predictions; scores are the records' mean
    confidences where they have them, else the prediction's is a fixed 1.0 stand-in."""
    tasks = []
    for record in records:
        result = [
            {
                "id": f"c{a['class_id']}",
                "from_name": from_name,
                "to_name": to_name,
                "original_width": record["width"],
                "original_height": record["height"],
                "image_rotation": 0,
                "value": {
                    "format": "rle",
                    "rle": a["label_studio_rle"],
                    "brushlabels": [a["name"]],
                },
                "type": "brushlabels",
                "origin": "prediction",
            }
            | ({"score": a["score"]} if "score" in a else {})
            for a in _kept(record, skip_classes)
        ]
        score = record.get("score", 1.0)
        tasks.append(
            {
                "data": {"image": image_url_prefix + record["file"]},
                "predictions": [{"model_version": model_version, "score": score, "result": result}],
            }
        )
    return tasks


def _hex(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def cvat_xml(
    records: Sequence[ImageRecord], classes: Classes, *, skip_classes: Iterable[int] = ()
) -> bytes:
    """A "CVAT for images 1.1" annotations.xml of `records`."""
    skip = set(skip_classes)
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    task = ET.SubElement(ET.SubElement(root, "meta"), "task")
    ET.SubElement(task, "size").text = str(len(records))
    ET.SubElement(task, "mode").text = "annotation"
    labels = ET.SubElement(task, "labels")
    for cid, name, color in classes:
        if cid in skip:
            continue
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = name
        ET.SubElement(label, "color").text = _hex(color)
        ET.SubElement(label, "type").text = "any"
        ET.SubElement(label, "attributes")
    for image_id, record in enumerate(records):
        image = ET.SubElement(
            root,
            "image",
            id=str(image_id),
            name=record["file"],
            width=str(record["width"]),
            height=str(record["height"]),
        )
        for a in _kept(record, skip):
            points = a["cvat_mask"]
            x1, y1, x2, y2 = points[-4:]
            ET.SubElement(
                image,
                "mask",
                label=a["name"],
                source="auto",
                occluded="0",
                rle=", ".join(str(v) for v in points[:-4]),
                left=str(x1),
                top=str(y1),
                width=str(x2 - x1 + 1),
                height=str(y2 - y1 + 1),
                z_order="0",
            )
    ET.indent(root)
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return xml


def write_export(
    path: Path,
    fmt: str,
    records: Sequence[ImageRecord],
    classes: Classes,
    *,
    model_version: str = "",
    iscrowd: int = 0,
    skip_classes: Iterable[int] = (),
    from_name: str = "tag",
    to_name: str = "image",
    image_url_prefix: str = "",
) -> None:
    """Writes `records` as one `fmt` import file at `path` (written whole, then renamed)."""
    data: bytes
    if fmt == "coco":
        document = coco_document(records, classes, iscrowd=iscrowd, skip_classes=skip_classes)
        data = json.dumps(document).encode()
    elif fmt == "labelstudio":
        tasks = labelstudio_tasks(
            records,
            model_version=model_version,
            from_name=from_name,
            to_name=to_name,
            image_url_prefix=image_url_prefix,
            skip_classes=skip_classes,
        )
        data = json.dumps(tasks).encode()
    elif fmt == "cvat":
        data = cvat_xml(records, classes, skip_classes=skip_classes)
    else:
        raise ValueError(f"unknown export format {fmt!r}")
    partial = path.with_name(path.name + ".tmp")
    if fmt == "cvat" and path.suffix.lower() == ".zip":
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("annotations.xml", data)
    else:
        partial.write_bytes(data)
    partial.replace(path)


# ----------------------------------------------------------------------------------------------
# reading label maps back (segserve-client diff)
# ----------------------------------------------------------------------------------------------

LabelMaps = dict[str, npt.NDArray[np.uint8]]


def _stem(name: str) -> str:
    parsed = urlparse(name)
    text = unquote(parsed.path)
    if parsed.query and "d=" in parsed.query:  # Label Studio local files: /data/local-files/?d=
        text = unquote(parsed.query.split("d=", 1)[1])
    return PurePosixPath(text.replace("\\", "/")).stem


def _class_id(name: str, names: Mapping[str, int]) -> int:
    if name in names:
        return names[name]
    if name.isdigit():
        return int(name)
    raise ValueError(f"unknown class name {name!r} (give --model or --classes)")


def _png_labels(path: Path) -> npt.NDArray[np.uint8]:
    try:
        labels, _ = decode_png(path.read_bytes())
        return labels
    except ValueError:
        try:
            import cv2
        except ImportError:
            raise ValueError(f"{path}: not an 8-bit greyscale or indexed PNG") from None
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None or image.ndim != 2:
            raise ValueError(f"{path}: not a single-channel label image") from None
        return np.asarray(image, dtype=np.uint8)


def _coco_maps(document: Mapping[str, Any]) -> LabelMaps:
    maps: LabelMaps = {}
    by_id: dict[int, str] = {}
    for image in document["images"]:
        stem = _stem(image["file_name"])
        by_id[image["id"]] = stem
        maps[stem] = np.zeros((image["height"], image["width"]), dtype=np.uint8)
    for a in document["annotations"]:
        segmentation = a["segmentation"]
        if not isinstance(segmentation, dict) or not isinstance(segmentation["counts"], str):
            raise ValueError("only compressed RLE COCO segmentations are read")
        labels = maps[by_id[a["image_id"]]]
        labels[decode_coco_rle(segmentation)] = a["category_id"]
    return maps


def _labelstudio_maps(tasks: Sequence[Mapping[str, Any]], names: Mapping[str, int]) -> LabelMaps:
    maps: LabelMaps = {}
    for task in tasks:
        data = task.get("data", {})
        image = data.get("image") or next(iter(data.values()), "")
        # An annotator's work if the task has some, else the first prediction.
        source = task.get("annotations") or task.get("predictions") or [{"result": []}]
        labels: npt.NDArray[np.uint8] | None = None
        for item in source[0]["result"]:
            if item.get("type") != "brushlabels" or item["value"].get("format") != "rle":
                continue
            height, width = item["original_height"], item["original_width"]
            if labels is None:
                labels = np.zeros((height, width), dtype=np.uint8)
            mask = decode_labelstudio_rle(item["value"]["rle"], height, width) > 0
            labels[mask] = _class_id(item["value"]["brushlabels"][0], names)
        if labels is None:
            raise ValueError(f"task of {image!r} has no brush mask (its size is unknown)")
        maps[_stem(str(image))] = labels
    return maps


def _cvat_maps(xml: bytes, names: Mapping[str, int]) -> LabelMaps:
    maps: LabelMaps = {}
    for image in ET.fromstring(xml).iter("image"):
        height, width = int(image.get("height", 0)), int(image.get("width", 0))
        labels = np.zeros((height, width), dtype=np.uint8)
        for mask in image.iter("mask"):
            runs = [int(v) for v in mask.get("rle", "").split(",") if v.strip()]
            left, top = int(mask.get("left", 0)), int(mask.get("top", 0))
            w, h = int(mask.get("width", 0)), int(mask.get("height", 0))
            points = [*runs, left, top, left + w - 1, top + h - 1]
            labels[decode_cvat_mask(points, height, width)] = _class_id(
                mask.get("label", ""), names
            )
        maps[_stem(image.get("name", ""))] = labels
    return maps


def read_label_maps(path: Path, names: Mapping[str, int] | None = None) -> LabelMaps:
    """Label maps by file stem from a label PNG, a COCO JSON, a Label Studio tasks JSON, a CVAT
    annotations.xml or zip, or a folder of those (not recursive)."""
    names = names or {}
    if path.is_dir():
        maps: LabelMaps = {}
        for child in sorted(path.iterdir()):
            if child.suffix.lower() in (".png", ".json", ".xml", ".zip"):
                maps.update(read_label_maps(child, names))
        return maps
    suffix = path.suffix.lower()
    if suffix == ".png":
        return {path.stem: _png_labels(path)}
    if suffix == ".json":
        document = json.loads(path.read_text())
        if isinstance(document, dict) and "annotations" in document and "images" in document:
            return _coco_maps(document)
        if isinstance(document, dict):
            document = [document]
        return _labelstudio_maps(document, names)
    if suffix == ".xml":
        return _cvat_maps(path.read_bytes(), names)
    if suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            return _cvat_maps(archive.read("annotations.xml"), names)
    raise ValueError(f"{path}: not a label PNG, COCO/Label Studio JSON or CVAT xml/zip")
