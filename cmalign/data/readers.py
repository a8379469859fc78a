"""Read a user's image–caption data set, in whichever common layout it already has, into records.

Users arrive with data laid out for some other tool: open_clip's CSV/TSV, JSON lines, COCO
captions, a folder of ``foo.jpg`` + ``foo.txt`` pairs (the layout most captioning tools write), or
WebDataset shards. Converting first is a chore that loses row numbers, so each layout is read
directly and every record keeps a ``source`` pointing back at the user's own file and row.

Two kinds of problem are kept apart (see :mod:`cmalign.data.records`): a malformed file raises
:class:`DataSchemaError` at once; one unusable sample becomes a :class:`BadSample` and reading goes on.
Images are only named here, never decoded — listing must stay cheap for millions of rows.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass
from typing import Any

from PIL import Image

from cmalign.data.records import BadSample, DataSchemaError, ReadResult, Record
from cmalign.errors import ConfigError, MissingInputError

FORMATS = ("auto", "csv", "tsv", "jsonl", "coco", "folder", "webdataset")

# Extensions (lower case, without the dot) that name an image in a folder or a WebDataset sample.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")

_DEFAULT_IMAGE_COLUMN = "filepath"  # open_clip's --csv-img-key default
_DEFAULT_CAPTION_COLUMN = "title"  # open_clip's --csv-caption-key default
_JSON_ALIASES = {_DEFAULT_IMAGE_COLUMN: "image", _DEFAULT_CAPTION_COLUMN: "caption"}


@dataclass(frozen=True)
class TarMember:
    """One image inside an uncompressed tar shard, located by byte offset.

    Holding the offset instead of an open handle keeps records picklable for DataLoader workers
    and gives random access without re-scanning the archive (as a streaming reader would).
    """

    tar_path: str
    member: str
    offset: int  # of the member's data (TarInfo.offset_data), not its header
    size: int

    def load(self) -> Image.Image:
        with open(self.tar_path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self}: tar shard is truncated ({len(data)} of {self.size} bytes)")
        im = Image.open(io.BytesIO(data))
        im.load()
        return im

    def __str__(self) -> str:
        return f"{self.tar_path}::{self.member}"


def read_dataset(
    path: str | os.PathLike,
    *,
    fmt: str = "auto",
    image_root: str | None = None,
    csv_separator: str | None = None,
    image_column: str = "filepath",
    caption_column: str = "title",
    label_column: str = "label",
    check_files: bool = True,
) -> ReadResult:
    """Read image–caption pairs from ``path``; see the module docstring for the formats.

    ``fmt="auto"`` picks the format from the path: ``.csv``/``.tsv``, ``.jsonl``, ``.json``
    (COCO when its top level has ``images`` and ``annotations``, else JSON lines), ``.tar`` or a
    brace pattern such as ``train-{0000..0003}.tar`` (WebDataset), a directory (image/text
    pairs, or WebDataset when it holds ``.tar`` files and no images).

    Column options apply to CSV/TSV and JSON lines (JSON lines also accept the keys ``image`` and
    ``caption`` when the default ``filepath``/``title`` are absent, and a list of strings as
    several captions of one image). Relative image paths in CSV/JSON lines/COCO resolve against
    ``image_root``, or else against the data file's directory. A CSV separator is sniffed between
    tab (open_clip's default) and comma unless ``csv_separator`` is given.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown data format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    path = os.path.expanduser(os.fspath(path))
    if fmt == "auto":
        fmt = detect_format(path)
    elif not os.path.exists(path) and not (fmt == "webdataset" and _is_brace_pattern(path)):
        raise MissingInputError(f"data set not found: {path}")
    if image_root is not None:
        image_root = os.path.expanduser(image_root)
        if check_files and fmt in ("csv", "tsv", "jsonl", "coco") and not os.path.isdir(image_root):
            raise MissingInputError(f"image_root is not a directory: {image_root}")
    if fmt == "folder" and not os.path.isdir(path):
        raise DataSchemaError(path, None, None, "format 'folder' needs a directory of image + .txt pairs")
    if fmt in ("csv", "tsv", "jsonl", "coco") and os.path.isdir(path):
        raise DataSchemaError(path, None, None, f"format {fmt!r} needs a file, not a directory")
    columns = (image_column, caption_column, label_column)

    if fmt in ("csv", "tsv"):
        sep = csv_separator
        if sep is None and (fmt == "tsv" or path.lower().endswith(".tsv")):
            sep = "\t"
        result = _read_csv(path, sep, image_root, columns, check_files)
    elif fmt == "jsonl":
        result = _read_jsonl(path, image_root, columns, check_files)
    elif fmt == "coco":
        result = _read_coco(path, image_root, check_files)
    elif fmt == "folder":
        result = _read_folder(path)
    else:
        result = _read_webdataset(path, caption_column, label_column)

    if not result.records:
        raise DataSchemaError(path, None, None, _no_samples_message(result.skipped))
    return result


def detect_format(path: str) -> str:
    """Name the format ``read_dataset(fmt="auto")`` would use for ``path``."""
    if not os.path.exists(path):
        if _is_brace_pattern(path):
            return "webdataset"
        raise MissingInputError(f"data set not found: {path}")
    if os.path.isdir(path):
        if _dir_has_images(path):
            return "folder"
        if any(name.lower().endswith(".tar") for name in os.listdir(path)):
            return "webdataset"
        raise DataSchemaError(path, None, None, "directory holds neither images nor .tar shards")
    lower = path.lower()
    if lower.endswith(".tsv"):
        return "tsv"
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith(".jsonl"):
        return "jsonl"
    if lower.endswith(".tar"):
        return "webdataset"
    if lower.endswith(".json"):
        return "coco" if _looks_like_coco(path) else "jsonl"
    raise ConfigError(
        f"cannot tell the format of {path} from its name; pass fmt= one of {', '.join(FORMATS[1:])}"
    )


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``a-{00..02}.tar`` and ``{x,y}.tar`` (nesting allowed).

    Hand-rolled so WebDataset paths work without the optional ``braceexpand`` package.
    """
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, end = 0, -1
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 0:
            end = i
            break
    if end < 0:  # unbalanced: nothing to expand
        return [pattern]
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    alternatives = _split_top_level(body)
    if len(alternatives) == 1:
        numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
        if numeric is None:  # a literal "{...}"
            return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
        a, b = numeric.groups()
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if int(b) >= int(a) else -1
        alternatives = [str(n).zfill(width) for n in range(int(a), int(b) + step, step)]
    return [out for alt in alternatives for out in expand_braces(head + alt + tail)]


# --- format detection helpers -------------------------------------------------------------------


def _is_brace_pattern(path: str) -> bool:
    return len(expand_braces(path)) > 1


def _dir_has_images(root: str) -> bool:
    for _dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(_is_image_name(n) for n in filenames):
            return True
    return False


def _is_image_name(name: str) -> bool:
    stem, dot, ext = name.rpartition(".")
    return bool(dot and stem) and not name.startswith(".") and ext.lower() in IMAGE_EXTENSIONS


def _looks_like_coco(path: str) -> bool:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # JSON lines (or garbage, which the JSON lines reader reports by line)
    return isinstance(data, dict) and "images" in data and "annotations" in data


# --- CSV / TSV ----------------------------------------------------------------------------------


def _sniff_separator(path: str, image_column: str, caption_column: str) -> str:
    """Tab or comma, whichever splits the header into the expected columns (tab on a tie)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        header_line = f.readline()
    best, best_score = "\t", (-1, -1)
    for sep in ("\t", ","):
        names = [c.strip() for c in next(csv.reader([header_line], delimiter=sep), [])]
        score = ((image_column in names) + (caption_column in names), len(names))
        if score > best_score:
            best, best_score = sep, score
    return best


def _read_csv(
    path: str,
    sep: str | None,
    image_root: str | None,
    columns: tuple[str, str, str],
    check_files: bool,
) -> ReadResult:
    image_column, caption_column, label_column = columns
    if sep is None:
        sep = _sniff_separator(path, image_column, caption_column)
    base = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    result, exists = ReadResult(), _ExistsCache(check_files)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=sep)
        try:
            header = [c.strip() for c in next(reader)]
        except StopIteration:
            raise DataSchemaError(path, 1, None, "empty file: expected a header row") from None
        except csv.Error as e:
            raise DataSchemaError(path, 1, None, f"malformed CSV: {e}") from None
        for column in (image_column, caption_column):
            if column not in header:
                shown = ", ".join(repr(c) for c in header)
                sep_name = "tab" if sep == "\t" else repr(sep)
                raise DataSchemaError(
                    path, 1, column, f"missing column; found columns: {shown} (separator {sep_name})"
                )
        i_img, i_cap = header.index(image_column), header.index(caption_column)
        i_label = header.index(label_column) if label_column in header else None
        line = reader.line_num
        while True:
            start = line + 1  # a quoted caption may span lines; report where the row begins
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise DataSchemaError(path, start, None, f"malformed CSV: {e}") from None
            line = reader.line_num
            if not row:  # blank line
                continue
            if len(row) != len(header):
                raise DataSchemaError(
                    path,
                    start,
                    None,
                    f"expected {len(header)} fields, found {len(row)} "
                    "(a caption containing the separator must be quoted)",
                )
            label = _clean_label(row[i_label]) if i_label is not None else None
            _add_sample(result, exists, base, row[i_img], [row[i_cap]], label, f"{path}:{start}")
    return result


# --- JSON lines ---------------------------------------------------------------------------------


def _read_jsonl(
    path: str, image_root: str | None, columns: tuple[str, str, str], check_files: bool
) -> ReadResult:
    image_column, caption_column, label_column = columns
    base = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    result, exists = ReadResult(), _ExistsCache(check_files)
    with open(path, encoding="utf-8-sig") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                hint = ""
                if n == 1 and text.lstrip().startswith("["):
                    hint = "; a JSON array is not JSON lines: write one object per line"
                raise DataSchemaError(
                    path, n, None, f"invalid JSON: {e.msg} (column {e.colno}){hint}"
                ) from None
            if not isinstance(obj, dict):
                raise DataSchemaError(path, n, None, f"expected a JSON object, found {type(obj).__name__}")
            img_key = _json_key(obj, image_column, path, n)
            cap_key = _json_key(obj, caption_column, path, n)
            image = obj[img_key]
            if image is not None and not isinstance(image, str):
                raise DataSchemaError(path, n, img_key, f"expected a string, found {type(image).__name__}")
            captions = _json_captions(obj[cap_key], path, n, cap_key)
            label = _label_value(obj.get(label_column), path, n, label_column)
            _add_sample(result, exists, base, image or "", captions, label, f"{path}:{n}")
    return result


def _json_key(obj: dict, name: str, path: str, row: int) -> str:
    if name in obj:
        return name
    alias = _JSON_ALIASES.get(name)
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


# --- COCO captions ------------------------------------------------------------------------------


def _read_coco(path: str, image_root: str | None, check_files: bool) -> ReadResult:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataSchemaError(path, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, dict):
        raise DataSchemaError(path, None, None, "expected a COCO object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataSchemaError(path, None, key, "missing, or not a list (COCO captions format)")
    base = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))

    images: dict[Any, dict] = {}
    for i, im in enumerate(data["images"]):
        row = f"images[{i}]"
        if not isinstance(im, dict):
            raise DataSchemaError(path, row, None, "expected an object")
        for key in ("id", "file_name"):
            if key not in im:
                raise DataSchemaError(path, row, key, "missing key")
        if not isinstance(im["file_name"], str):
            raise DataSchemaError(path, row, "file_name", "expected a string")
        if im["id"] in images:
            raise DataSchemaError(path, row, "id", f"duplicate image id {im['id']!r}")
        label_key = "label" if "label" in im else "category"
        images[im["id"]] = {**im, "_label": _label_value(im.get(label_key), path, row, label_key)}

    result, exists, captioned = ReadResult(), _ExistsCache(check_files), set()
    for i, ann in enumerate(data["annotations"]):
        row = f"annotations[{i}]"
        if not isinstance(ann, dict):
            raise DataSchemaError(path, row, None, "expected an object")
        for key in ("image_id", "caption"):
            if key not in ann:
                raise DataSchemaError(path, row, key, "missing key")
        if ann["image_id"] not in images:
            raise DataSchemaError(path, row, "image_id", f"no image with id {ann['image_id']!r} in 'images'")
        if not isinstance(ann["caption"], str):
            raise DataSchemaError(path, row, "caption", "expected a string")
        im = images[ann["image_id"]]
        captioned.add(ann["image_id"])
        _add_sample(
            result, exists, base, im["file_name"], [ann["caption"]], im["_label"], f"{path}:annotation {i}"
        )
    for image_id in images:
        if image_id not in captioned:
            result.skipped.append(BadSample(f"{path}:image {image_id}", "caption", "no caption annotation"))
    return result


# --- folder of image + .txt pairs ---------------------------------------------------------------


def _read_folder(root: str) -> ReadResult:
    result = ReadResult()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        present = set(filenames)
        for name in sorted(filenames):
            if not _is_image_name(name):
                continue
            stem = name.rsplit(".", 1)[0]
            image = os.path.join(dirpath, name)
            key = os.path.abspath(image)
            txt = os.path.join(dirpath, stem + ".txt")
            if stem + ".txt" not in present:
                result.skipped.append(BadSample(image, "caption", f"no {stem}.txt beside {name}"))
                continue
            try:
                text = _read_text(txt)
            except (OSError, UnicodeDecodeError) as e:
                result.skipped.append(BadSample(txt, "caption", f"cannot read caption: {e}"))
                continue
            label_file = next((stem + e for e in (".label", ".cls") if stem + e in present), None)
            try:
                label = _clean_label(_read_text(os.path.join(dirpath, label_file))) if label_file else None
            except (OSError, UnicodeDecodeError) as e:
                result.skipped.append(BadSample(txt, "label", f"cannot read {label_file}: {e}"))
                continue
            lines = [(n, s.strip()) for n, s in enumerate(text.splitlines(), start=1) if s.strip()]
            if not lines:
                result.skipped.append(BadSample(txt, "caption", "empty caption"))
            for n, caption in lines:  # several lines: several captions of one image
                source = txt if len(lines) == 1 else f"{txt}:{n}"
                result.records.append(Record(key, caption, label, key, source))
    return result


# --- WebDataset shards --------------------------------------------------------------------------


def _shard_paths(path: str) -> list[str]:
    if os.path.isdir(path):
        shards = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(".tar"))
        if not shards:
            raise DataSchemaError(path, None, None, "no .tar shards in directory")
        return shards
    if os.path.exists(path):
        return [path]
    shards = expand_braces(path)
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise MissingInputError(
            f"{len(missing)} of {len(shards)} shards in {path} not found: {', '.join(missing[:3])}{more}"
        )
    return shards


def _read_webdataset(path: str, caption_column: str, label_column: str) -> ReadResult:
    result = ReadResult()
    for shard in _shard_paths(path):
        _index_shard(shard, caption_column, label_column, result)
    return result


def _index_shard(shard: str, caption_column: str, label_column: str, result: ReadResult) -> None:
    """Scan the tar headers once; group members into samples by WebDataset key."""
    tar_abs = os.path.abspath(shard)
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        # "r:" refuses compression: the recorded offsets must be offsets into the file itself.
        with tarfile.open(shard, "r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                dirname, base = posixpath.split(member.name)
                stem, dot, ext = base.partition(".")  # key ends at the first dot of the basename
                if dot and stem:
                    samples.setdefault(posixpath.join(dirname, stem), {})[ext.lower()] = member
            _add_tar_samples(tf, shard, tar_abs, samples, caption_column, label_column, result)
    except (tarfile.TarError, OSError) as e:
        with open(shard, "rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"
        hint = (
            "; it is gzip-compressed: gunzip the shards (random access needs plain tar)" if compressed else ""
        )
        raise DataSchemaError(
            shard, None, None, f"not a readable uncompressed tar archive: {e}{hint}"
        ) from None


def _add_tar_samples(
    tf: tarfile.TarFile,
    shard: str,
    tar_abs: str,
    samples: dict[str, dict[str, tarfile.TarInfo]],
    caption_column: str,
    label_column: str,
    result: ReadResult,
) -> None:
    for key, fields in samples.items():
        source = f"{shard}::{key}"
        image = next((fields[e] for e in IMAGE_EXTENSIONS if e in fields), None)
        if image is None:
            result.skipped.append(BadSample(source, "image", "no image member (.jpg/.png/.webp/...)"))
            continue
        try:
            caption, label = _sample_text(tf, fields, caption_column, label_column)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            result.skipped.append(BadSample(source, "caption", f"unreadable caption: {e}"))
            continue
        if caption is None:
            result.skipped.append(BadSample(source, "caption", "no .txt or .json caption in sample"))
            continue
        if not caption.strip():
            result.skipped.append(BadSample(source, "caption", "empty caption"))
            continue
        ref = TarMember(tar_abs, image.name, image.offset_data, image.size)
        result.records.append(Record(ref, caption.strip(), label, f"{tar_abs}::{key}", source))


def _sample_text(
    tf: tarfile.TarFile, fields: dict[str, tarfile.TarInfo], caption_column: str, label_column: str
) -> tuple[str | None, str | None]:
    def text(ext: str) -> str:
        f = tf.extractfile(fields[ext])
        assert f is not None  # only regular files are indexed
        return f.read().decode("utf-8")

    caption = label = None
    meta = json.loads(text("json")) if "json" in fields else {}
    if not isinstance(meta, dict):
        meta = {}  # not a metadata object: no caption or label from it
    if "txt" in fields:
        caption = text("txt")
    else:
        for k in dict.fromkeys((caption_column, "caption", "title")):
            if isinstance(meta.get(k), str):
                caption = meta[k]
                break
    for ext in ("cls", "label"):
        if ext in fields:
            label = _clean_label(text(ext))
            break
    else:
        value = meta.get(label_column)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            label = _clean_label(str(value))
    return caption, label


# --- shared -------------------------------------------------------------------------------------


class _ExistsCache:
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


def _add_sample(
    result: ReadResult,
    exists: _ExistsCache,
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


def _split_top_level(body: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    return parts


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8-sig") as f:
        return f.read()


def _clean_label(value: str) -> str | None:
    return value.strip() or None


def _label_value(value: Any, path: str, row: int | str, key: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataSchemaError(path, row, key, f"expected a class name (string), found {type(value).__name__}")
    return _clean_label(str(value))


def _no_samples_message(skipped: list[BadSample]) -> str:
    if not skipped:
        return "no usable samples (the data set is empty)"
    first = "; ".join(f"{b.source}: {b.field}: {b.reason}" for b in skipped[:3])
    message = f"no usable samples ({len(skipped)} skipped: {first}"
    message += "; ...)" if len(skipped) > 3 else ")"
    if any(b.reason.startswith("file not found") for b in skipped):
        message += "; do the image paths need a different image_root?"
    return message
