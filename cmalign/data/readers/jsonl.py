"""JSON lines: one object per line, with image and caption keys (or a list of captions of one image).

Exporters disagree on key names, so besides the configured columns (open_clip's ``filepath``/``title`` by
default) the common ``image``/``caption`` are accepted; a bad line is reported by its line number.
"""

from __future__ import annotations

import json
from typing import Any

from cmalign.artifacts.manifests import JSON_ERRORS
from cmalign.data.options import DEFAULT_CAPTION_COLUMN, DEFAULT_IMAGE_COLUMN, ReaderOptions
from cmalign.data.readers.shared import ExistsCache, add_sample, json_problem, label_value
from cmalign.data.records import DataSchemaError, ReadResult

# The key also accepted when a default column name is absent from an object.
JSON_ALIASES = {DEFAULT_IMAGE_COLUMN: "image", DEFAULT_CAPTION_COLUMN: "caption"}


def read_jsonl(path: str, base: str, options: ReaderOptions, check_files: bool) -> ReadResult:
    """Read a JSON lines file; relative image paths resolve against ``base``."""
    result, exists = ReadResult(), ExistsCache(check_files)
    with open(path, encoding="utf-8-sig") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except JSON_ERRORS as e:
                hint = ""
                if n == 1 and text.lstrip().startswith("["):
                    hint = "; a JSON array is not JSON lines: write one object per line"
                raise DataSchemaError(path, n, None, f"{json_problem(e)}{hint}") from None
            if not isinstance(obj, dict):
                raise DataSchemaError(path, n, None, f"expected a JSON object, found {type(obj).__name__}")
            img_key = _json_key(obj, options.image_column, path, n)
            cap_key = _json_key(obj, options.caption_column, path, n)
            image = obj[img_key]
            if image is not None and not isinstance(image, str):
                raise DataSchemaError(path, n, img_key, f"expected a string, found {type(image).__name__}")
            captions = _json_captions(obj[cap_key], path, n, cap_key)
            label = label_value(obj.get(options.label_column), path, n, options.label_column)
            add_sample(result, exists, base, image or "", captions, label, f"{path}:{n}")
    return result


def _json_key(obj: dict, name: str, path: str, row: int) -> str:
    if name in obj:
        return name
    alias = JSON_ALIASES.get(name)
    if alias is not None and alias in obj:
        return alias
    looked = f"'{name}'" + (f" or '{alias}'" if alias else "")
    found = ", ".join(repr(k) for k in obj) or "none"
    raise DataSchemaError(path, row, name, f"missing key (looked for {looked}; found keys: {found})")


def _json_captions(value: Any, path: str, row: int, key: str) -> list[str]:
    if value is None:
        return [""]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value or [""]
    raise DataSchemaError(
        path, row, key, f"expected a string or a list of strings, found {type(value).__name__}"
    )
