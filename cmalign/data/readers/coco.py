"""COCO captions JSON: an ``images`` list and an ``annotations`` list, one annotation per caption.

The layout of MS-COCO's ``captions_*.json`` and of the many data sets that copy it. Every caption becomes a
record keyed by its image, and an image no annotation describes is listed as skipped rather than lost.
"""

from __future__ import annotations

import json
from typing import Any

from cmalign.artifacts.manifests import JSON_ERRORS
from cmalign.data.readers.shared import ExistsCache, add_sample, json_problem, label_value
from cmalign.data.records import BadSample, DataSchemaError, ReadResult


def looks_like_coco(path: str) -> bool:
    """Whether a ``.json`` file is COCO captions (else it is read as JSON lines)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except JSON_ERRORS:  # UnicodeDecodeError is a ValueError too
        return False  # JSON lines (or garbage, which the JSON lines reader reports by line)
    return isinstance(data, dict) and "images" in data and "annotations" in data


def read_coco(path: str, base: str, check_files: bool) -> ReadResult:
    """Read a COCO captions file; relative ``file_name`` paths resolve against ``base``."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except UnicodeDecodeError:
        raise  # read_dataset names the row of the first byte that is not UTF-8
    except JSON_ERRORS as e:
        raise DataSchemaError(path, getattr(e, "lineno", None), None, json_problem(e)) from None
    if not isinstance(data, dict):
        raise DataSchemaError(path, None, None, "expected a COCO object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataSchemaError(path, None, key, "missing, or not a list (COCO captions format)")

    images: dict[Any, dict] = {}
    for i, im in enumerate(data["images"]):
        row = f"images[{i}]"
        _check_object(im, ("id", "file_name"), path, row)
        if not isinstance(im["file_name"], str):
            raise DataSchemaError(path, row, "file_name", "expected a string")
        _check_id(im["id"], path, row, "id")
        if im["id"] in images:
            raise DataSchemaError(path, row, "id", f"duplicate image id {im['id']!r}")
        label_key = "label" if "label" in im else "category"
        images[im["id"]] = {**im, "_label": label_value(im.get(label_key), path, row, label_key)}

    result, exists, captioned = ReadResult(), ExistsCache(check_files), set()
    for i, ann in enumerate(data["annotations"]):
        row = f"annotations[{i}]"
        _check_object(ann, ("image_id", "caption"), path, row)
        _check_id(ann["image_id"], path, row, "image_id")
        if ann["image_id"] not in images:
            raise DataSchemaError(path, row, "image_id", f"no image with id {ann['image_id']!r} in 'images'")
        if not isinstance(ann["caption"], str):
            raise DataSchemaError(path, row, "caption", "expected a string")
        im = images[ann["image_id"]]
        captioned.add(ann["image_id"])
        add_sample(
            result, exists, base, im["file_name"], [ann["caption"]], im["_label"], f"{path}:annotation {i}"
        )
    for image_id in images:
        if image_id not in captioned:
            result.skipped.append(BadSample(f"{path}:image {image_id}", "caption", "no caption annotation"))
    return result


def _check_id(value: Any, path: str, row: str, key: str) -> None:
    """An image id is a JSON number or string (COCO's are integers): an array or object cannot name an image."""
    if isinstance(value, (list, dict)):
        raise DataSchemaError(path, row, key, f"expected an integer or string id, found {type(value).__name__}")


def _check_object(value: Any, keys: tuple[str, ...], path: str, row: str) -> None:
    """An entry of ``images`` or ``annotations`` must be an object holding ``keys``."""
    if not isinstance(value, dict):
        raise DataSchemaError(path, row, None, "expected an object")
    for key in keys:
        if key not in value:
            raise DataSchemaError(path, row, key, "missing key")
