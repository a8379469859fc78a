"""Reading the manifest.json that every cmalign artifact carries, with errors that name the file and field."""

from __future__ import annotations

import json
from pathlib import Path


def read_manifest_file(path: str | Path, kind: str, error: type[Exception], missing_hint: str = "",
                       max_version: int | None = None) -> dict:
    """The JSON object at ``path``, checked to be of ``kind`` (and no newer than ``max_version``); ``error`` is the
    exception type the caller's users catch."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: missing{'; ' + missing_hint if missing_hint else ''}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        found = manifest.get("kind") if isinstance(manifest, dict) else type(manifest).__name__
        raise error(f"{path}, field 'kind': expected '{kind}', found {found!r}")
    if max_version is not None and manifest.get("format_version", 0) > max_version:
        raise error(f"{path}, field 'format_version': {manifest['format_version']} is newer than this cmalign reads "
                    f"({max_version}); upgrade cmalign")
    return manifest
