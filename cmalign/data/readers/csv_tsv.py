"""CSV and TSV files as open_clip reads them: a header row, one row per caption, image paths in a column.

open_clip's default is tab-separated even in files named ``.csv``, while spreadsheets write commas; the
separator is therefore sniffed from the header unless the user names it, and rows are numbered by the line
they start on (a quoted caption may span lines) so errors point at the user's own file.
"""

from __future__ import annotations

import csv

from cmalign.data.options import ReaderOptions
from cmalign.data.readers.shared import ExistsCache, add_sample, clean_label
from cmalign.data.records import DataSchemaError, ReadResult


def sniff_separator(path: str, image_column: str, caption_column: str) -> str:
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


def read_csv(path: str, base: str, options: ReaderOptions, check_files: bool, *, tsv: bool = False) -> ReadResult:
    """Read a CSV (``tsv``: a TSV) file; relative image paths resolve against ``base``."""
    image_column, caption_column, label_column = options.image_column, options.caption_column, options.label_column
    sep = options.csv_separator
    if sep is None and (tsv or path.lower().endswith(".tsv")):
        sep = "\t"
    if sep is None:
        sep = sniff_separator(path, image_column, caption_column)
    result, exists = ReadResult(), ExistsCache(check_files)
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
            label = clean_label(row[i_label]) if i_label is not None else None
            add_sample(result, exists, base, row[i_img], [row[i_cap]], label, f"{path}:{start}")
    return result
