"""Reading the manifest.json that every cmalign artifact carries, with errors that name the file and field.

A manifest is read by code that indexes into it (``manifest["files"]["index"]``), so a loader checks the fields it
will use with :func:`field` first: a damaged or hand-edited file is then an error naming the file, the field and what
was expected, not a KeyError or TypeError from deep inside a load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

# What json raises on text it cannot read: JSONDecodeError (and UnicodeDecodeError) are ValueErrors, and so is the
# error for a number past Python's int-digit limit; nesting deeper than the stack allows raises RecursionError.
JSON_ERRORS = (ValueError, RecursionError)


def read_json_object(path: str | Path, error: type[Exception], missing_hint: str = "") -> dict:
    """The JSON object in ``path``; ``error`` (the exception type the caller's users catch) names the file and
    the problem."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: missing{'; ' + missing_hint if missing_hint else ''}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise error(f"{path}: not valid JSON (arrays or objects nested too deeply to read)") from None
    except ValueError as e:
        raise error(f"{path}: not valid JSON ({str(e).split(';')[0]})") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def json_object_or_none(path: str | Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or not one: for "is this one of ours?" questions,
    where an unreadable file is an answer, not an error."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, *JSON_ERRORS):
        return None
    return obj if isinstance(obj, dict) else None


def read_manifest_file(path: str | Path, kind: str, error: type[Exception], missing_hint: str = "",
                       max_version: int | None = None) -> dict:
    """The JSON object at ``path``, checked to be of ``kind`` (and no newer than ``max_version``)."""
    manifest = read_json_object(path, error, missing_hint)
    if manifest.get("kind") != kind:
        raise error(f"{path}, field 'kind': expected '{kind}', found {manifest.get('kind')!r}")
    field(manifest, "format_version", "an integer", is_int, path, error, required=False)
    if max_version is not None and manifest.get("format_version", 0) > max_version:
        raise error(f"{path}, field 'format_version': {manifest['format_version']} is newer than this cmalign reads "
                    f"({max_version}); upgrade cmalign")
    return manifest


# -- checking the fields a loader uses -------------------------------------------------------------------------


def field(obj: dict, name: str, what: str, check: Callable[[Any], bool], path: str | Path, error: type[Exception],
          *, required: bool = True, default: Any = None, where: str = "") -> Any:
    """``obj[name]`` when ``check`` accepts it (``default`` when it is absent and not ``required``); otherwise
    ``error`` naming the file, the field (``where.name`` for a field of a nested object) and ``what`` was expected."""
    shown = f"{where}.{name}" if where else name
    if name not in obj:
        if required:
            raise error(f"{path}: field '{shown}' is missing")
        return default
    value = obj[name]
    if not check(value):
        raise error(f"{path}, field '{shown}': expected {what}, found {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_positive_int(v: Any) -> bool:
    return is_int(v) and v > 0


def is_count(v: Any) -> bool:
    """A non-negative integer."""
    return is_int(v) and v >= 0


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_str(v: Any) -> bool:
    return isinstance(v, str)


def is_optional_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def is_file_name(v: Any) -> bool:
    """A plain file name, so that a manifest cannot point a loader outside its own directory."""
    return (isinstance(v, str) and v not in ("", ".", "..") and "\x00" not in v
            and len(PurePosixPath(v).parts) == 1 and len(PureWindowsPath(v).parts) == 1)
