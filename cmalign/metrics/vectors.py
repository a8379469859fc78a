"""L2 normalisation: every score in cmalign is a cosine, so every embedding row is unit length before use."""

from __future__ import annotations

import numpy as np


def l2_normalize(a, eps: float = 1e-12, dtype=np.float32) -> np.ndarray:
    """Rows of ``a`` scaled to unit L2 norm (norms taken in float64), as ``dtype``; an all-zero row stays zero
    instead of becoming NaN."""
    a = np.asarray(a, np.float64)
    return (a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), eps)).astype(dtype)


def row_cosines(a, b) -> np.ndarray:
    """Cosine of row i of ``a`` with row i of ``b``, in float64: what the parity and model checks compare."""
    return (l2_normalize(a, dtype=np.float64) * l2_normalize(b, dtype=np.float64)).sum(-1)
