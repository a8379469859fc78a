"""The unit every reader produces: one image–caption pair, with where it came from.

Readers turn a user's files into a list of :class:`Record`; a record names its image lazily
(a path or an :class:`ImageSource`) so that listing a million-row CSV does not decode a million
images. Problems are reported in two kinds, as users need to act on them differently:

* :class:`DataSchemaError` — the file itself is malformed (missing column, bad JSON): nothing can
  be trained, so it is raised before any training starts, naming file, row and field.
* :class:`BadSample` — one sample is unusable (empty caption, missing or corrupt image): it is
  skipped, counted, and listed in the run directory (or raised with ``on_bad_sample="fail"``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

from PIL import Image

from cmalign.errors import CmalignError


class DataSchemaError(CmalignError, ValueError):
    """A data file does not have the structure its format requires."""

    def __init__(self, file: str, row: int | str | None, field: str | None, problem: str):
        self.file, self.row, self.field, self.problem = file, row, field, problem
        where = str(file)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}")


class BadSampleError(CmalignError, ValueError):
    """Raised instead of skipping when the user asked for ``on_bad_sample="fail"``."""


@runtime_checkable
class ImageSource(Protocol):
    """Anything that can produce a PIL image on demand (a generated scene, a tar member)."""

    def load(self) -> Image.Image: ...


@dataclass(frozen=True)
class Record:
    image: str | ImageSource  # file path, or an object with .load()
    caption: str
    label: str | None = None  # class name, for clustering and zero-shot evaluation
    key: str = ""  # identity of the image; records sharing a key are captions of one image
    source: str = ""  # "file:row" (or similar) for error messages


@dataclass(frozen=True)
class BadSample:
    source: str  # "file:row"
    field: str  # "image", "caption", ...
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    skipped: list[BadSample] = field(default_factory=list)


def load_image(record: Record) -> Image.Image:
    """Decode a record's image as RGB; raises OSError/ValueError on a missing or corrupt file."""
    if isinstance(record.image, str):
        with Image.open(record.image) as im:
            im.load()
            return im.convert("RGB")
    return record.image.load().convert("RGB")
