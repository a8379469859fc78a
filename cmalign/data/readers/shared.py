"""What every format's reader shares: turning a row into records or a skipped sample, and reading labels.

Each format finds its rows differently, but what makes a row usable is decided once, here, so a CSV row, a
JSON line and a COCO annotation are judged (and their problems worded) alike.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cmalign.data.records import BadSample, DataSchemaError, ReadResult, Record

# Extensions (lower case, without the dot) that name an image in a folder or a WebDataset sample.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


class ExistsCache:
    """Stat each image path once (COCO and multi-caption rows name the same file repeatedly)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._seen: dict[str, bool] = {}

    def __call__(self, path: str) -> bool:
        if not self.enabled:
            return True
        if path not in self._seen:
            self._seen[path] = os.path.isfile(path)
        return self._seen[path]


def add_sample(
    result: ReadResult,
    exists: ExistsCache,
    base: str,
    image: str,
    captions: list[str],
    label: str | None,
    source: str,
) -> None:
    """Append one record per caption, or a BadSample saying why the row is unusable."""
    captions = [c.strip() for c in captions]
    if not image.strip():
        result.skipped.append(BadSample(source, "image", "empty image path"))
        return
    if not any(captions):
        result.skipped.append(BadSample(source, "caption", "empty caption"))
        return
    resolved = os.path.abspath(os.path.join(base, os.path.expanduser(image.strip())))
    if not exists(resolved):
        result.skipped.append(BadSample(source, "image", f"file not found: {resolved}"))
        return
    for caption in captions:
        if caption:
            result.records.append(Record(resolved, caption, label, resolved, source))


def is_image_name(name: str) -> bool:
    stem, dot, ext = name.rpartition(".")
    return bool(dot and stem) and not name.startswith(".") and ext.lower() in IMAGE_EXTENSIONS


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataSchemaError(path, None, None, f"not valid UTF-8 ({e.reason} at byte {e.start}); "
                                                "save the file as UTF-8") from None


def json_problem(e: Exception) -> str:
    """What json could not read, worded for the user. ``e`` is one of ``cmalign.artifacts.manifests.JSON_ERRORS``:
    json raises more than JSONDecodeError (a ValueError past Python's int-digit limit, RecursionError for nesting
    deeper than the stack allows)."""
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON: {e.msg} (column {e.colno})"
    if isinstance(e, RecursionError):
        return "invalid JSON: arrays or objects nested too deeply to read"
    return f"invalid JSON: {str(e).split(';')[0]}"  # the int-digit limit, without its hint for programmers


def clean_label(value: str) -> str | None:
    return value.strip() or None


def label_value(value: Any, path: str, row: int | str, key: str) -> str | None:
    """A label field of a JSON object: a class name (or an integer class id), or None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataSchemaError(path, row, key, f"expected a class name (string), found {type(value).__name__}")
    return clean_label(str(value))
