"""Percentile bootstrap confidence intervals over evaluation items, through ``scipy.stats.bootstrap``.

scipy resamples the item *indices* (``data = (arange(n),)``, vectorised), and each statistic turns a batch of
resampled indices into its figures. One resampling then serves grouped items (an image carrying its captions) and
statistics that are not means (ARI, MMD², corpus BLEU). The resamples depend only on (n, repetitions, seed), so the
replicates of two systems evaluated on the same images are paired: a difference of two systems gets its own
interval from the replicate-wise differences (:func:`paired_interval`).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats

LEVEL = 0.95
DEFAULT_REPS = 1000  # cheap statistics (means, ratios, contingency tables)
SLOW_REPS = 200  # O(n²) MMD² and the covariance measures: a wider Monte-Carlo error, stated in the report
_BATCH_ELEMENTS = 4_000_000  # resampled indices per batch: bounds the (batch, n) arrays a statistic builds
_RNG_KEYWORD = "rng" if "rng" in inspect.signature(scipy.stats.bootstrap).parameters else "random_state"


@dataclass(frozen=True)
class Bootstrap:
    """Intervals of k figures and their replicates (``distribution``: k × repetitions, in resample order)."""

    names: tuple[str, ...]
    low: np.ndarray
    high: np.ndarray
    distribution: np.ndarray
    reps: int

    def intervals(self) -> dict[str, list[float] | None]:
        """{name: [low, high]}, None where the replicates gave no finite interval (JSON has no NaN)."""
        return {n: _pair(lo, hi) for n, lo, hi in zip(self.names, self.low, self.high, strict=True)}

    def replicates(self) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.distribution, strict=True))

    def basic(self, estimates: dict[str, float], floor: float | None = None) -> Bootstrap:
        """The named figures' intervals reflected about their estimates: [2θ̂ − q_hi, 2θ̂ − q_lo].

        For plug-in figures of estimated means or covariances (a centroid distance, Bures, CORAL) each resample
        adds the sampling noise a second time, so their replicates sit above the estimate by about as much as the
        estimate sits above the truth, and the percentile interval can miss both; the basic ("reverse percentile")
        interval undoes that shift to first order. ``floor``: the figure's least possible true value (0 for a
        distance), where the reflected interval is cut.
        """
        low, high = self.low.copy(), self.high.copy()
        for j, name in enumerate(self.names):
            if name in estimates:
                low[j], high[j] = 2 * estimates[name] - self.high[j], 2 * estimates[name] - self.low[j]
                if floor is not None:
                    low[j], high[j] = max(low[j], floor), max(high[j], floor)
        return Bootstrap(self.names, low, high, self.distribution, self.reps)


def _pair(lo, hi) -> list[float] | None:
    lo, hi = float(lo), float(hi)
    return [lo, hi] if math.isfinite(lo) and math.isfinite(hi) else None


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval along the last axis, over the finite replicates (NaN where none is finite)."""
    a = np.asarray(replicates, np.float64)
    alpha = 100 * (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows → NaN, reported as "no interval"
        lo, hi = np.nanpercentile(np.where(np.isfinite(a), a, np.nan), [alpha, 100 - alpha], axis=-1)
    return lo, hi


def bootstrap(n: int, statistic: Callable[[np.ndarray], np.ndarray], names: Sequence[str], reps: int = DEFAULT_REPS,
              seed: int = 0, level: float = LEVEL, width: int | None = None) -> Bootstrap | None:
    """Resample n items ``reps`` times; ``statistic(idx)``, idx of shape (batch, n), returns (k, batch) figures.

    ``width``: the widest per-resample array the statistic builds (the captions of a grouped statistic), to size
    the batches. None when there is nothing to resample (n < 2 or reps < 1).
    """
    names = tuple(names)
    if n < 2 or reps < 1:
        return None
    batch = max(1, min(reps, _BATCH_ELEMENTS // max(n, width or n)))

    def stat(idx, axis=-1):
        out = np.asarray(statistic(np.asarray(idx)), np.float64)
        return out.reshape(len(names), -1)

    with warnings.catch_warnings():
        # scipy warns of a "degenerate BCa interval" on any NaN, even with method="percentile"; the interval is
        # recomputed below over the finite replicates
        warnings.simplefilter("ignore")
        res = scipy.stats.bootstrap((np.arange(n),), stat, n_resamples=reps, batch=batch, vectorized=True,
                                    method="percentile", confidence_level=level,
                                    **{_RNG_KEYWORD: np.random.default_rng(seed)})
    dist = np.asarray(res.bootstrap_distribution, np.float64).reshape(len(names), reps)
    lo, hi = np.asarray(res.confidence_interval.low, np.float64), np.asarray(res.confidence_interval.high, np.float64)
    lo, hi = lo.reshape(len(names)), hi.reshape(len(names))
    bad = ~(np.isfinite(lo) & np.isfinite(hi))
    if bad.any():
        flo, fhi = percentile_interval(dist[bad], level)
        lo[bad], hi[bad] = flo, fhi
    return Bootstrap(names, lo, hi, dist, reps)


def paired_interval(a: np.ndarray, b: np.ndarray, fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
                    level: float = LEVEL, estimate: float | None = None,
                    ceiling: float | None = None) -> list[float] | None:
    """Interval of fn(a, b) over paired replicates (the same resamples of the same items); with ``estimate``, the
    basic interval reflected about it (see :meth:`Bootstrap.basic`); ``ceiling`` cuts it at the largest possible
    true value (1 for a reduction)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.size == 0:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        lo, hi = percentile_interval(fn(a, b), level)
    if estimate is not None:
        lo, hi = 2 * estimate - hi, 2 * estimate - lo
    if ceiling is not None:
        lo, hi = min(lo, ceiling), min(hi, ceiling)
    return _pair(lo, hi)


# --------------------------------------------------------------------------- building blocks for statistics


def counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(batch, n) float64: how often each item was drawn in each resample."""
    idx = np.asarray(idx, np.int64)
    b = idx.shape[0]
    flat = (idx + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def group_totals(values: np.ndarray, owner: np.ndarray, n_groups: int) -> np.ndarray:
    """Per-group sums of per-member ``values`` (n_members,) or (n_members, k) → (n_groups,) or (n_groups, k)."""
    values = np.asarray(values, np.float64)
    owner = np.asarray(owner, np.int64)
    if values.ndim == 1:
        return np.bincount(owner, weights=values, minlength=n_groups)
    return np.stack([np.bincount(owner, weights=v, minlength=n_groups) for v in values.T], axis=1)


def weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """np.median of each row's multiset (value j repeated ``weights[:, j]`` times, integer weights).

    Lets grouped members (the captions of resampled images) be resampled through their group's count.
    """
    values = np.asarray(values, np.float64)
    order = np.argsort(values, kind="stable")
    v = values[order]
    cum = np.cumsum(np.asarray(weights, np.float64)[:, order], axis=1)
    total = cum[:, -1]
    lo_pos, hi_pos = np.floor((total - 1) / 2), np.floor(total / 2)  # 0-based middle positions
    lo = v[np.argmax(cum > lo_pos[:, None], axis=1)]
    hi = v[np.argmax(cum > hi_pos[:, None], axis=1)]
    out = (lo + hi) / 2
    out[total <= 0] = np.nan
    return out


def _pairs(a: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """Pairs of distinct points among ``a`` points of which ``copies`` is the sum of squared draw counts: a point
    drawn w times makes w² ordered pairs with its own copies, none of them a pair. C(a, 2) when copies = a."""
    return (a * a - copies) / 2


def contingency_ari(table: np.ndarray, copies: np.ndarray | None = None) -> np.ndarray:
    """Adjusted Rand index from contingency tables (..., classes, clusters) of counts, as sklearn computes it.

    ``copies``: for a bootstrap resample's table of draw counts, the same table of squared draw counts; pairs are
    then counted between distinct points only. Counting the copies of one drawn point as pairs that agree biased the
    replicates upwards: on 300 images of 64 classes every interval lay above its own estimate.
    """
    t = np.asarray(table, np.float64)
    c = t if copies is None else np.asarray(copies, np.float64)
    sum_ij = _pairs(t, c).sum(axis=(-2, -1))
    sum_a = _pairs(t.sum(axis=-1), c.sum(axis=-1)).sum(axis=-1)
    sum_b = _pairs(t.sum(axis=-2), c.sum(axis=-2)).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = sum_a * sum_b / _pairs(t.sum(axis=(-2, -1)), c.sum(axis=(-2, -1)))
        denom = (sum_a + sum_b) / 2 - expected
        ari = (sum_ij - expected) / denom
    # sklearn: perfect agreement (including one cluster against one class) scores 1
    return np.where(denom == 0, 1.0, ari)


def _entropy(counts_: np.ndarray, n: np.ndarray) -> np.ndarray:
    p = counts_ / n[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0), axis=-1)


def contingency_nmi(table: np.ndarray) -> np.ndarray:
    """Normalised mutual information (arithmetic mean of the entropies, sklearn's default) from contingency tables."""
    t = np.asarray(table, np.float64)
    n = t.sum(axis=(-2, -1))
    a, b = t.sum(axis=-1), t.sum(axis=-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        outer = a[..., :, None] * b[..., None, :]
        ratio = np.where(t > 0, t * n[..., None, None] / np.where(outer > 0, outer, 1), 1.0)
        mi = np.sum(np.where(t > 0, t / n[..., None, None] * np.log(ratio), 0.0), axis=(-2, -1))
        h = (_entropy(a, n) + _entropy(b, n)) / 2
        nmi = mi / np.maximum(h, np.finfo(np.float64).eps)
    single = ((a > 0).sum(-1) == 1) & ((b > 0).sum(-1) == 1)  # sklearn: one class and one cluster score 1
    return np.where(single, 1.0, np.where(mi <= 0, 0.0, nmi))
