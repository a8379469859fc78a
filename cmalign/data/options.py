"""How to read a user's data file: the reader options, declared once for every command that reads data.

`fit`, `embed` and `eval` all read the same formats with the same options, so the names, defaults and checks
live here, and :func:`cmalign.data.readers.read_dataset` takes one :class:`ReaderOptions`. ``fit``'s
``DataConfig`` and ``embed``'s ``EmbedConfig`` extend the class, which keeps the options as flat fields
(``data.format``, ``data.image_root``, ... in a run's TOML, and in the config hash that identifies a run);
``eval``'s ``EvalConfig`` holds one as ``.reader``.

Plain dataclasses and nothing else: every command's ``--help`` builds these, and must not import a reader.
"""

from __future__ import annotations

from dataclasses import dataclass

from cmalign.errors import ConfigError

FORMATS = ("auto", "csv", "tsv", "jsonl", "coco", "folder", "webdataset")

DEFAULT_IMAGE_COLUMN = "filepath"  # open_clip's --csv-img-key default
DEFAULT_CAPTION_COLUMN = "title"  # open_clip's --csv-caption-key default
DEFAULT_LABEL_COLUMN = "label"


# kw_only: a config that extends these options keeps its own required fields first (EmbedConfig's `export`).
@dataclass(kw_only=True)
class ReaderOptions:
    """How to read a data file; see :func:`cmalign.data.readers.read_dataset` for what each option does."""

    format: str = "auto"  # one of FORMATS; auto picks it from the path
    image_root: str | None = None  # None: relative image paths resolve against the data file's directory
    csv_separator: str | None = None  # None: tab for .tsv, else sniffed between tab and comma
    image_column: str = DEFAULT_IMAGE_COLUMN
    caption_column: str = DEFAULT_CAPTION_COLUMN
    label_column: str = DEFAULT_LABEL_COLUMN

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an option no reader accepts (run again by the reader: configs are mutable)."""
        if self.format not in FORMATS:
            raise ConfigError(f"unknown data format {self.format!r}; valid formats: {', '.join(FORMATS)}")
        if self.csv_separator is not None and len(self.csv_separator) != 1:
            raise ConfigError(f"the CSV separator must be one character, got {self.csv_separator!r}")
