"""Bootstrap intervals of the gap measures (:mod:`cmalign.metrics.gap`), over resampled pairs.

Kept apart from the measures themselves: this is resampling (which figures take the basic interval, the
vectorised covariance and weighted-MMD replicates), not a definition of a gap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cmalign.metrics.gap import DEFAULT_BANDWIDTHS, _prepare
from cmalign.metrics.kernels import median_distance, sq_norms

FAST_BOOTSTRAP = ("raw", "centroid", "paired_residual", "rmg", "l2i")
SLOW_BOOTSTRAP = ("mmd2", "bures", "coral", "w2")
# Figures of estimated means or covariances: a resample adds the sampling noise again, so their intervals are the
# basic bootstrap's (reflected about the estimate; Bootstrap.basic). Means of per-pair terms (raw, L2I, RMG) are not.
BASIC_INTERVAL = ("centroid", "paired_residual", "mmd2", "bures", "coral", "w2")


def gap_bootstrap(x, y, *, reps: int = 1000, slow_reps: int = 200, seed: int = 0, level: float = 0.95,
                  bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS, max_mmd_samples: int = 4000,
                  normalize: bool = True, eps: float = 1e-10):
    """Percentile bootstrap over the pairs of every :func:`gap_report` measure and of L2I; returns
    ``(fast, slow)`` :class:`cmalign.metrics.bootstrap.Bootstrap` results (either None if it cannot resample).

    ``fast`` (raw, centroid, paired residual, RMG, L2I: ``reps`` resamples) is exact and vectorised through
    per-pair weights. ``slow`` (MMD², Bures, CORAL, W₂: ``slow_reps``) recomputes the covariances and the paired
    MMD² U-statistic of each resample, over pairs of distinct rows (a row and its repeat are no pair), with the
    kernel bandwidth held at the full sample's median heuristic and MMD² resampled over the same rows the estimate
    used (a fixed subsample past ``max_mmd_samples``).
    """
    from cmalign.metrics.bootstrap import Bootstrap, bootstrap, counts

    x, y = _prepare(x, y, normalize, paired=True)
    n, d = x.shape
    diff2 = np.sum((x - y) ** 2, axis=1)
    dist = np.sqrt(diff2)
    xu = x / np.linalg.norm(x, axis=1, keepdims=True)
    yu = y / np.linalg.norm(y, axis=1, keepdims=True)
    half_cos = 0.5 * (1.0 - np.clip(np.einsum("ij,ij->i", xu, yu), -1.0, 1.0))

    def within(s: np.ndarray) -> np.ndarray:
        mean_cos = (np.sum(s**2, axis=1) - n) / (n * (n - 1))
        return 0.5 * (1.0 - np.clip(mean_cos, -1.0, 1.0))

    def fast(idx):
        w = counts(idx, n)
        raw = np.sqrt(w @ diff2 / n)
        cen = np.linalg.norm((w @ x - w @ y) / n, axis=1)
        paired = w @ half_cos / n
        denom = paired + 0.5 * (within(w @ xu) + within(w @ yu))
        rmg = np.divide(paired, denom, out=np.zeros_like(paired), where=denom > 0)
        return np.stack([raw, cen, np.sqrt(np.maximum(raw**2 - cen**2, 0.0)), rmg, w @ dist / n])

    fast_res = bootstrap(n, fast, FAST_BOOTSTRAP, reps, seed, level)
    if slow_reps < 1 or n < 2:
        return fast_res, None

    rows = (np.sort(np.random.default_rng(seed).choice(n, size=max_mmd_samples, replace=False))
            if n > max_mmd_samples else None)
    mmd = _WeightedMMD(x if rows is None else x[rows], y if rows is None else y[rows], bandwidths)

    def covariance_measures(w: np.ndarray) -> np.ndarray:
        mx, my = w @ x / n, w @ y / n
        out = np.empty((3, len(w)))
        sx = np.empty((len(w), d, d))
        sy = np.empty((len(w), d, d))
        for b in range(len(w)):
            sx[b] = (x * w[b][:, None]).T @ x / n - np.outer(mx[b], mx[b])
            sy[b] = (y * w[b][:, None]).T @ y / n - np.outer(my[b], my[b])
        out[0] = np.sqrt(np.maximum(_bures2_cov_batch(sx, sy, eps), 0.0))
        out[1] = np.sum((sx - sy) ** 2, axis=(1, 2)) / (4.0 * d * d)
        out[2] = np.hypot(np.linalg.norm(mx - my, axis=1), out[0])
        return out

    def slow(idx):
        w = counts(idx, n)
        cov = covariance_measures(w)
        m2 = mmd(w) if rows is None else np.full(len(w), np.nan)
        return np.concatenate([m2[None], cov])

    slow_res = bootstrap(n, slow, SLOW_BOOTSTRAP, slow_reps, seed, level)
    if rows is not None and slow_res is not None:  # MMD² on its own subsample: resample those rows
        m = bootstrap(len(rows), lambda idx: mmd(counts(idx, len(rows)))[None], ("mmd2",), slow_reps, seed, level)
        if m is not None:
            low, high, dist_ = slow_res.low.copy(), slow_res.high.copy(), slow_res.distribution.copy()
            low[0], high[0], dist_[0] = m.low[0], m.high[0], m.distribution[0]
            slow_res = Bootstrap(slow_res.names, low, high, dist_, slow_reps)
    return fast_res, slow_res


def _bures2_cov_batch(sx: np.ndarray, sy: np.ndarray, eps: float) -> np.ndarray:
    """B² of stacked covariance pairs: tr((Σx^½ Σy Σx^½)^½) = Σ √eig(Lᵀ Σy L) for any Σx = L Lᵀ."""
    d = sx.shape[-1]
    reg = eps * np.eye(d)
    sx_r, sy_r = sx + reg, sy + reg
    try:
        factor = np.linalg.cholesky(sx_r)
    except np.linalg.LinAlgError:  # rank-deficient past eps: an eigen-factor always exists
        lam, vec = np.linalg.eigh(sx_r)
        factor = vec * np.sqrt(np.clip(lam, 0.0, None))[:, None, :]
    inner = np.swapaxes(factor, -1, -2) @ sy_r @ factor
    inner = 0.5 * (inner + np.swapaxes(inner, -1, -2))
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0.0, None)), axis=-1)
    return np.trace(sx_r, axis1=-2, axis2=-1) + np.trace(sy_r, axis1=-2, axis2=-1) - 2.0 * cross


class _WeightedMMD:
    """The paired, centred MMD² U-statistic of resamples given as per-row counts, without re-forming kernels.

    A resample repeats rows, and a row paired with its own copy is a zero distance (K = 1) in K_xx and K_yy and a
    matched pair in K_xy: counted, they bias MMD² by O(1/n), as much as an aligned model's whole MMD². So the
    U-statistic runs over pairs of *distinct* rows, Σ_{i≠j} w_i w_j K_ij / Σ_{i≠j} w_i w_j, which without repeats is
    exactly :func:`mmd2` (paired). Within-modality distances do not move when a resample is re-centred, so K_xx and
    K_yy are built once; the cross distances shift with the resample's centroid offset δ,
    ||x_i − y_j − δ||² = D_ij − 2x_i·δ + 2y_j·δ + |δ|², so exp(−γ·) factors into the fixed exp(−γD_ij) times
    per-row terms.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, bandwidths: Sequence[float]):
        self.x = x - x.mean(axis=0)
        self.y = y - y.mean(axis=0)
        n = self.x.shape[0]
        self.n = n
        sigma = median_distance(np.concatenate([self.x, self.y], axis=0))
        if not sigma > 0:
            sigma = 1.0
        self.gammas = 1.0 / (2.0 * (np.asarray(bandwidths, np.float64) * sigma) ** 2)
        self.kxx = self._kernel(self._d2(self.x, self.x))
        self.kyy = self._kernel(self._d2(self.y, self.y))
        self.dxy = self._d2(self.x, self.y)

    @staticmethod
    def _d2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d2 = sq_norms(a)[:, None] + sq_norms(b)[None, :] - 2.0 * (a @ b.T)
        return np.maximum(d2, 0.0)

    def _kernel(self, d2: np.ndarray) -> np.ndarray:
        return np.mean([np.exp(-g * d2) for g in self.gammas], axis=0)

    def __call__(self, w: np.ndarray) -> np.ndarray:
        n = self.n
        w2 = w**2
        norm = n * n - np.sum(w2, axis=1)  # ordered pairs of positions holding distinct rows

        def within(k):
            return (np.sum((w @ k) * w, axis=1) - w2 @ np.diag(k)) / norm

        delta = (w @ self.x - w @ self.y) / n
        a, b = delta @ self.x.T, delta @ self.y.T  # (batch, n)
        dd = np.sum(delta**2, axis=1)
        cross = np.zeros(len(w))
        for g in self.gammas:
            if np.max(np.abs(2 * g * a)) > 300 or np.max(np.abs(2 * g * b)) > 300:  # factors would overflow
                for r in range(len(w)):
                    k = np.exp(-g * np.maximum(self.dxy - 2 * a[r][:, None] + 2 * b[r][None, :] + dd[r], 0.0))
                    cross[r] += (w[r] @ k @ w[r] - np.sum(w2[r] * np.diag(k))) / len(self.gammas)
                continue
            e = np.exp(-g * self.dxy)
            u, v = w * np.exp(2 * g * a), w * np.exp(-2 * g * b)
            total = np.sum((u @ e) * v, axis=1) - np.sum(w2 * np.exp(2 * g * (a - b)) * np.diag(e), axis=1)
            cross += np.exp(-g * dd) * total / len(self.gammas)
        return within(self.kxx) + within(self.kyy) - 2.0 * cross / norm
