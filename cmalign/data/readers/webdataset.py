"""WebDataset shards: uncompressed tar files whose members are grouped into samples by key.

Read without the ``webdataset`` package: the tar headers are scanned once and each image is recorded as a
:class:`TarMember` (shard path + byte offset), so a DataLoader worker can load any sample directly instead of
streaming the shard, and records stay picklable. Shard lists may be brace patterns
(``train-{0000..0099}.tar``), expanded here so the optional ``braceexpand`` package is not needed either.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass

from PIL import Image

from cmalign.artifacts.manifests import JSON_ERRORS
from cmalign.data.readers.shared import IMAGE_EXTENSIONS, clean_label, json_problem
from cmalign.data.records import BadSample, DataSchemaError, ReadResult, Record
from cmalign.errors import MissingInputError


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


def _split_top_level(body: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    return parts


def is_brace_pattern(path: str) -> bool:
    return len(expand_braces(path)) > 1


def shard_paths(path: str) -> list[str]:
    """The shards ``path`` names: a directory's ``.tar`` files, one tar file, or a brace pattern."""
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


def read_webdataset(path: str, caption_column: str, label_column: str) -> ReadResult:
    """Read every sample of every shard; ``caption_column``/``label_column`` are keys of a sample's .json."""
    result = ReadResult()
    for shard in shard_paths(path):
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
        except UnicodeDecodeError as e:
            result.skipped.append(BadSample(source, "caption", f"unreadable caption: {e}"))
            continue
        except JSON_ERRORS as e:
            result.skipped.append(BadSample(source, "caption", f"unreadable .json: {json_problem(e)}"))
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
            label = clean_label(text(ext))
            break
    else:
        value = meta.get(label_column)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            label = clean_label(str(value))
    return caption, label
