"""The one entry point, :func:`read_dataset`: tell which layout a path has, check it, and hand it to its reader.

What all formats share happens here once: the path and ``image_root`` are checked before any row is read,
relative image paths get one base directory, and a data set with no usable sample is an error that says
why its samples were skipped (most often: the image paths need another ``image_root``).
"""

from __future__ import annotations

import os

from cmalign.data.options import FORMATS, ReaderOptions
from cmalign.data.readers.coco import looks_like_coco, read_coco
from cmalign.data.readers.csv_tsv import read_csv
from cmalign.data.readers.folder import dir_has_images, read_folder
from cmalign.data.readers.jsonl import read_jsonl
from cmalign.data.readers.webdataset import is_brace_pattern, read_webdataset
from cmalign.data.records import BadSample, DataSchemaError, ReadResult
from cmalign.errors import ConfigError, MissingInputError

_FILE_FORMATS = ("csv", "tsv", "jsonl", "coco")  # one data file whose image paths may be relative


def read_dataset(
    path: str | os.PathLike, options: ReaderOptions | None = None, *, check_files: bool = True
) -> ReadResult:
    """Read image–caption pairs from ``path`` as ``options`` say (default: :class:`ReaderOptions`\\ ()).

    ``options.format="auto"`` picks the format from the path: ``.csv``/``.tsv``, ``.jsonl``, ``.json``
    (COCO when its top level has ``images`` and ``annotations``, else JSON lines), ``.tar`` or a
    brace pattern such as ``train-{0000..0003}.tar`` (WebDataset), a directory (image/text
    pairs, or WebDataset when it holds ``.tar`` files and no images).

    Column options apply to CSV/TSV and JSON lines (JSON lines also accept the keys ``image`` and
    ``caption`` when the default ``filepath``/``title`` are absent, and a list of strings as
    several captions of one image). Relative image paths in CSV/JSON lines/COCO resolve against
    ``image_root``, or else against the data file's directory. A CSV separator is sniffed between
    tab (open_clip's default) and comma unless ``csv_separator`` is given. ``check_files=False``
    keeps rows whose image file does not exist (the files are only stat'ed, never decoded).
    """
    options = options if options is not None else ReaderOptions()
    options.validate()
    fmt = options.format
    path = os.path.expanduser(os.fspath(path))
    if fmt == "auto":
        fmt = detect_format(path)
    elif not os.path.exists(path) and not (fmt == "webdataset" and is_brace_pattern(path)):
        raise MissingInputError(f"data set not found: {path}")
    image_root = options.image_root
    if image_root is not None:
        image_root = os.path.expanduser(image_root)
        if check_files and fmt in _FILE_FORMATS and not os.path.isdir(image_root):
            raise MissingInputError(f"image_root is not a directory: {image_root}")
    if fmt == "folder" and not os.path.isdir(path):
        raise DataSchemaError(path, None, None, "format 'folder' needs a directory of image + .txt pairs")
    if fmt in _FILE_FORMATS and os.path.isdir(path):
        raise DataSchemaError(path, None, None, f"format {fmt!r} needs a file, not a directory")
    base = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))

    try:
        if fmt in ("csv", "tsv"):
            result = read_csv(path, base, options, check_files, tsv=fmt == "tsv")
        elif fmt == "jsonl":
            result = read_jsonl(path, base, options, check_files)
        elif fmt == "coco":
            result = read_coco(path, base, check_files)
        elif fmt == "folder":
            result = read_folder(path)
        else:
            result = read_webdataset(path, options.caption_column, options.label_column)
    except UnicodeDecodeError as e:
        raise _not_utf8(path if fmt in _FILE_FORMATS else None, e) from None

    if not result.records:
        raise DataSchemaError(path, None, None, _no_samples_message(result.skipped))
    return result


def detect_format(path: str) -> str:
    """Name the format ``read_dataset`` would use for ``path`` when ``options.format`` is ``"auto"``."""
    if not os.path.exists(path):
        if is_brace_pattern(path):
            return "webdataset"
        raise MissingInputError(f"data set not found: {path}")
    if os.path.isdir(path):
        if dir_has_images(path):
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
        return "coco" if looks_like_coco(path) else "jsonl"
    raise ConfigError(
        f"cannot tell the format of {path} from its name; set the format (--format) to one of "
        f"{', '.join(FORMATS[1:])}"
    )


def _not_utf8(path: str | None, e: UnicodeDecodeError) -> DataSchemaError:
    """Name the row of the first byte that is not UTF-8 (found again on the raw bytes: the decoder's offset is
    relative to a buffer, not the file)."""
    if path is None:  # a caption file inside a folder or shard: the reader does not say which
        return DataSchemaError("(a caption file)", None, None, f"text is not UTF-8 ({e.reason})")
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
        offset = 0
    except UnicodeDecodeError as full:
        offset = full.start
    row = data.count(b"\n", 0, offset) + 1
    return DataSchemaError(path, row, None, f"not valid UTF-8 (byte {data[offset:offset + 1]!r} at offset {offset}); "
                                            "save the file as UTF-8")


def _no_samples_message(skipped: list[BadSample]) -> str:
    if not skipped:
        return "no usable samples (the data set is empty)"
    first = "; ".join(f"{b.source}: {b.field}: {b.reason}" for b in skipped[:3])
    message = f"no usable samples ({len(skipped)} skipped: {first}"
    message += "; ...)" if len(skipped) > 3 else ")"
    if any(b.reason.startswith("file not found") for b in skipped):
        message += "; do the image paths need a different image_root?"
    return message
