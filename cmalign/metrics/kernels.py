"""The RBF-kernel sums behind the MMD² estimate (:func:`cmalign.metrics.gap.mmd2`), in float64 numpy.

Written by hand because no kept library gives a *blocked* multi-bandwidth sum: sklearn's ``rbf_kernel`` builds the
whole n×n matrix per bandwidth, which at the gap report's 4000 pairs is 128 MB each. Here the pairwise distances go
through in blocks of ``CHUNK_ROWS`` rows and one exp serves every bandwidth whose γ ratio is a power of two.
"""

from __future__ import annotations

import numpy as np

MEDIAN_MAX_POINTS = 2000  # pooled points used for the median-heuristic bandwidth
MEDIAN_SEED = 0
CHUNK_ROWS = 512  # rows per block in the pairwise-kernel sums (bounds memory at n×512 floats)


def sq_norms(a: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, a)


def median_distance(pooled: np.ndarray, max_points: int = MEDIAN_MAX_POINTS) -> float:
    """Median pairwise Euclidean distance (i < j), on a fixed-seed subsample if large."""
    if pooled.shape[0] > max_points:
        rng = np.random.default_rng(MEDIAN_SEED)
        idx = np.sort(rng.choice(pooled.shape[0], size=max_points, replace=False))
        pooled = pooled[idx]
    sq = sq_norms(pooled)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (pooled @ pooled.T)
    iu = np.triu_indices(pooled.shape[0], k=1)
    return float(np.median(np.sqrt(np.maximum(d2[iu], 0.0))))


def kernel_sum(a: np.ndarray, b: np.ndarray | None, gammas: np.ndarray) -> float:
    """Sum of k(a_i, b_j) over all pairs, k = mean_m exp(−γ_m ||a − b||²).

    With ``b is None`` it is the sum over i ≠ j of k(a_i, a_j), computed on the upper
    triangle only (diagonal excluded).
    """
    symmetric = b is None
    if symmetric:
        b = a
    a_sq, b_sq = sq_norms(a), sq_norms(b)
    total = 0.0
    n = a.shape[0]
    for s in range(0, n, CHUNK_ROWS):
        e = min(s + CHUNK_ROWS, n)
        c0 = s if symmetric else 0
        d2 = a[s:e] @ b[c0:].T
        d2 *= -2.0
        d2 += a_sq[s:e, None]
        d2 += b_sq[None, c0:]
        np.maximum(d2, 0.0, out=d2)
        if symmetric:
            # block starts on the diagonal: keep the strict upper triangle of its square part
            w = e - s
            d2[:, :w][np.tril_indices(w)] = np.inf
        total += block_kernel_sum(d2, gammas)
    return 2.0 * total if symmetric else total


def block_kernel_sum(d2: np.ndarray, gammas: np.ndarray) -> float:
    """sum(mean_m exp(−γ_m d2)), reusing exp results by repeated squaring where γ ratios allow.

    exp(−2γ·d) = exp(−γ·d)², so for the default multipliers (0.5, 1, 2, 4) — γ ratios 4, 16, 64 —
    one exp plus six squarings replace four exps.  Other ratios fall back to plain exp.
    """
    order = np.sort(gammas)
    acc = 0.0
    cur: np.ndarray | None = None
    cur_g = 0.0
    for g in order:
        steps = float(np.log2(g / cur_g)) if cur is not None else -1.0
        k = round(float(steps))
        if cur is not None and k >= 0 and abs(steps - k) < 1e-12 and k <= 8:
            for _ in range(k):
                np.multiply(cur, cur, out=cur)
        else:
            cur = np.exp(-g * d2)
        cur_g = float(g)
        acc += float(cur.sum())
    return acc / len(gammas)


def paired_kernel_trace(x: np.ndarray, y: np.ndarray, gammas: np.ndarray) -> float:
    """Σ_i k(x_i, y_i): the paired diagonal of K_xy, which the paired U-statistic leaves out."""
    d2 = np.maximum(sq_norms(x - y), 0.0)
    return float(np.mean(np.exp(-gammas[:, None] * d2[None, :]), axis=0).sum())
