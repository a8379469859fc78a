"""What the index stage tells a user went wrong, in one place: build, load, extend, search and the faiss backend
all raise these, so a caller catching index errors finds every kind here.

Each is a :class:`cmalign.errors.CmalignError` (one ``error:`` line in the CLI) and keeps the built-in base it
always had (``RuntimeError`` or ``ValueError``).
"""

from __future__ import annotations

from cmalign.errors import CmalignError


class IndexBuildError(CmalignError, RuntimeError):
    """Building or extending an index failed; nothing was written in place of the old index."""


class IndexFormatError(CmalignError, ValueError):
    """An index directory is missing, incomplete, or of another kind."""


class ExportMismatchError(CmalignError, ValueError):
    """A query model (export) or new embeddings do not come from the export the index was built with."""


class GpuUnavailableError(CmalignError, RuntimeError):
    """``gpu=True`` but this faiss has no GPU support or sees no GPU."""


class IndexChoiceError(CmalignError, ValueError):
    """No index of the supported kinds fits the memory budget (or the request makes no sense)."""
