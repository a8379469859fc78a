"""Reading the manifest.json that every cmalign artifact carries, with errors that name the file and field."""

from __future__ import annotations

import json
from pathlib import Path


def read_json_object(path: str | Path, error: type[Exception], missing_hint: str = "") -> dict:
    """The JSON object in ``path``; ``error`` (the exception type the caller's users catch) names the file and
    the problem."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: missing{'; ' + missing_hint if missing_hint else ''}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def json_object_or_none(path: str | Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or not one: for "is this one of ours?" questions,
    where an unreadable file is an answer, not an error."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def read_manifest_file(path: str | Path, kind: str, error: type[Exception], missing_hint: str = "",
                       max_version: int | None = None) -> dict:
    """The JSON object at ``path``, checked to be of ``kind`` (and no newer than ``max_version``)."""
    manifest = read_json_object(path, error, missing_hint)
    if manifest.get("kind") != kind:
        raise error(f"{path}, field 'kind': expected '{kind}', found {manifest.get('kind')!r}")
    if max_version is not None and manifest.get("format_version", 0) > max_version:
        raise error(f"{path}, field 'format_version': {manifest['format_version']} is newer than this cmalign reads "
                    f"({max_version}); upgrade cmalign")
    return manifest
