"""Modality-gap measures for paired image/text embeddings (numpy/scipy only).

Inputs are ``x`` (n×d image embeddings) and ``y`` (n×d text embeddings) with rows paired
(``x_i`` belongs with ``y_i``).  Every function casts to float64 and L2-normalises the rows
unless ``normalize=False`` is passed.  float64 matters: the gaps of a well-aligned model are
small differences of near-unit vectors, and in float32 the cancellation in ``||a||² + ||b||²
- 2a·b`` or ``tr Σ_x + tr Σ_y - 2 tr(...)`` eats most of the significant digits.

With μ_x, μ_y the means and x̃ = x − μ_x, ỹ = y − μ_y (the centred clouds):

* centroid gap      G_C = ||μ_x − μ_y||                       (Liang et al. 2022, "Mind the Gap")
* raw paired gap    G_R = sqrt(mean_i ||x_i − y_i||²)
* paired residual   G_P = sqrt(mean_i ||x̃_i − ỹ_i||²)          and  G_R² = G_C² + G_P² exactly
* MMD²              unbiased multi-bandwidth RBF MMD² between x̃ and ỹ (Gretton et al. 2012),
                    median-heuristic bandwidth; for paired rows the U-statistic over i ≠ j in every term
* Bures             B² = tr Σ_x + tr Σ_y − 2 tr((Σ_x^½ Σ_y Σ_x^½)^½)
* CORAL             ||Σ_x − Σ_y||_F² / (4 d²)                  (Sun & Saenko 2016, Deep CORAL)
* W₂ (Gaussian)     W₂² = G_C² + B²                            (Fréchet distance of Gaussian fits)
* RMG               relative modality gap, after Schrodi et al. 2025 ("Two effects, one trigger")

Σ are population covariances (1/n) of the centred clouds.  Mean-centring each modality
(:func:`center_modalities`) removes G_C but leaves MMD², Bures and CORAL untouched: those
measure the gap between the *shapes* of the two distributions, which is what remains after
the post-hoc fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import scipy.linalg

from cmalign.errors import ConfigError
from cmalign.metrics.kernels import kernel_sum, median_distance, paired_kernel_trace, sq_norms

__all__ = [
    "GapReport",
    "bures",
    "center_modalities",
    "centroid_gap",
    "coral",
    "gap_reduction",
    "gap_report",
    "mmd2",
    "paired_residual",
    "raw_gap",
    "relative_modality_gap",
    "wasserstein2_gaussian",
]

DEFAULT_BANDWIDTHS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)


# --------------------------------------------------------------------------- input handling


def _as_matrix(a, name: str, normalize: bool) -> np.ndarray:
    a = np.array(a, dtype=np.float64, copy=True)
    if a.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D array (n, d), got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ConfigError(f"{name} must be non-empty, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ConfigError(f"{name} contains non-finite values")
    if normalize:
        norms = np.linalg.norm(a, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise ConfigError(f"{name} has a zero row, which cannot be L2-normalised")
        a /= norms
    return a


def _prepare(x, y, normalize: bool, paired: bool) -> tuple[np.ndarray, np.ndarray]:
    x = _as_matrix(x, "x", normalize)
    y = _as_matrix(y, "y", normalize)
    if x.shape[1] != y.shape[1]:
        raise ConfigError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if paired and x.shape[0] != y.shape[0]:
        raise ConfigError(f"paired measure needs as many rows in x as in y, got {x.shape[0]} and {y.shape[0]}")
    return x, y


def _cov(c: np.ndarray) -> np.ndarray:
    """Population covariance (1/n) of an already centred cloud."""
    return (c.T @ c) / c.shape[0]


# --------------------------------------------------------------------------- location / paired


def _centroid_gap(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x.mean(axis=0) - y.mean(axis=0)))


def _raw_gap(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum((x - y) ** 2, axis=1))))


def _paired_residual(x: np.ndarray, y: np.ndarray) -> float:
    r = (x - x.mean(axis=0)) - (y - y.mean(axis=0))
    return float(np.sqrt(np.mean(np.sum(r**2, axis=1))))


def centroid_gap(x, y, *, normalize: bool = True) -> float:
    """Centroid gap G_C = ||μ_x − μ_y|| (Liang et al. 2022). x and y need not be paired."""
    x, y = _prepare(x, y, normalize, paired=False)
    return _centroid_gap(x, y)


def raw_gap(x, y, *, normalize: bool = True) -> float:
    """Paired gap G_R = sqrt(mean_i ||x_i − y_i||²); G_R² = G_C² + G_P²."""
    x, y = _prepare(x, y, normalize, paired=True)
    return _raw_gap(x, y)


def paired_residual(x, y, *, normalize: bool = True) -> float:
    """Paired residual G_P = sqrt(mean_i ||x̃_i − ỹ_i||²) of the centred clouds (what G_R keeps
    once the centroid offset is removed)."""
    x, y = _prepare(x, y, normalize, paired=True)
    return _paired_residual(x, y)


def center_modalities(x, y, *, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Post-hoc mean-centring: returns (x − μ_x, y − μ_y), float64, *not* renormalised.

    This is the cheap fix for the centroid gap; it sets G_C to 0 and leaves the
    distribution-shape measures (MMD², Bures, CORAL) unchanged.
    """
    x, y = _prepare(x, y, normalize, paired=False)
    return x - x.mean(axis=0), y - y.mean(axis=0)


# --------------------------------------------------------------------------- MMD²


def _mmd2(x: np.ndarray, y: np.ndarray, bandwidths: Sequence[float], center: bool, paired: bool = False,
          sigma: float | None = None) -> float:
    nx, ny = x.shape[0], y.shape[0]
    if nx < 2 or ny < 2:
        raise ConfigError(f"mmd2 needs at least 2 rows in each of x and y, got {nx} and {ny}")
    mults = np.asarray(bandwidths, dtype=np.float64).ravel()
    if mults.size == 0 or np.any(~np.isfinite(mults)) or np.any(mults <= 0):
        raise ConfigError(f"bandwidths must be positive finite multipliers, got {bandwidths!r}")
    if center:
        x = x - x.mean(axis=0)
        y = y - y.mean(axis=0)
    if sigma is None:
        sigma = median_distance(np.concatenate([x, y], axis=0))
    elif not (np.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"sigma must be a positive finite distance, got {sigma!r}")
    if not sigma > 0:  # degenerate pooled sample (all points equal): any bandwidth gives 0
        sigma = 1.0
    gammas = 1.0 / (2.0 * (mults * sigma) ** 2)
    kxx = kernel_sum(x, None, gammas) / (nx * (nx - 1))
    kyy = kernel_sum(y, None, gammas) / (ny * (ny - 1))
    if paired:
        # (x_i, y_i) are dependent: k(x_i, y_i) is not a draw of the cross term's expectation (a matched pair sits
        # closer than two random points), so it is excluded as the within-sample diagonals are (U-statistic, i ≠ j).
        kxy = (kernel_sum(x, y, gammas) - paired_kernel_trace(x, y, gammas)) / (nx * (nx - 1))
    else:
        kxy = kernel_sum(x, y, gammas) / (nx * ny)
    return float(kxx + kyy - 2.0 * kxy)


def mmd2(
    x,
    y,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    center: bool = True,
    *,
    paired: bool = False,
    sigma: float | None = None,
    normalize: bool = True,
) -> float:
    """Unbiased multi-bandwidth RBF MMD² between the centred clouds x̃ and ỹ.

    k(a, b) = mean_m exp(−||a − b||² / (2 (m·σ)²)) over the multipliers m in ``bandwidths``,
    σ = median pairwise Euclidean distance of the pooled (centred) sample (median heuristic;
    on a fixed-seed subsample of at most 2000 pooled points, so it is deterministic).
    MMD² = mean_{i≠j} K_xx + mean_{i≠j} K_yy − 2 mean K_xy (diagonals of K_xx, K_yy excluded).
    ``paired=True`` (rows of x and y matched, as image–caption pairs are): the cross term is mean_{i≠j} K_xy too,
    the U-statistic for paired samples. With the paired diagonal in, the estimate is biased low by
    2·(mean_i k(x_i, y_i) − mean K_xy)/n (about −0.003 at n = 128 on a CLIP batch) and the "distribution" term
    also pulls each pair together. The gap report and the training loss use the paired form.
    ``sigma``: a fixed kernel scale instead of the median heuristic (to compare values at one bandwidth, or to
    check the estimator against a closed form).

    ``center=False`` compares the raw vectors (then the centroid offset counts as well).
    x and y need not have the same number of rows.  Being unbiased, the estimate can be
    slightly negative when the two distributions agree; it is deliberately not clipped.
    Caveat: centring each sample by its *own* mean shrinks the expected cross distances by a
    factor (1 − 1/n) while leaving the within-sample ones unchanged, so with ``center=True``
    the estimate has a small negative bias of order 1/n (about −1e-3 for n = 400, d = 16 on
    identical distributions).  Compare values computed at similar n.
    Cost is O((n_x + n_y)² d); subsample for very large n (``gap_report`` does).
    """
    x, y = _prepare(x, y, normalize, paired=paired)
    return _mmd2(x, y, bandwidths, center, paired, sigma)


# --------------------------------------------------------------------------- covariance shape


def _bures2_cov(sx: np.ndarray, sy: np.ndarray, eps: float) -> float:
    d = sx.shape[0]
    reg = eps * np.eye(d)
    sx_r, sy_r = sx + reg, sy + reg
    root_x = np.real(scipy.linalg.sqrtm(sx_r))
    inner = root_x @ sy_r @ root_x
    inner = 0.5 * (inner + inner.T)
    cross = float(np.real(np.trace(scipy.linalg.sqrtm(inner))))
    b2 = float(np.trace(sx_r) + np.trace(sy_r) - 2.0 * cross)
    return max(b2, 0.0)


def _bures(x: np.ndarray, y: np.ndarray, eps: float) -> float:
    sx = _cov(x - x.mean(axis=0))
    sy = _cov(y - y.mean(axis=0))
    return float(np.sqrt(_bures2_cov(sx, sy, eps)))


def bures(x, y, eps: float = 1e-10, *, normalize: bool = True) -> float:
    """Bures distance B between the covariances of the centred clouds.

    B² = tr Σ_x + tr Σ_y − 2 tr((Σ_x^½ Σ_y Σ_x^½)^½), with population covariances (1/n) and
    matrix square roots from ``scipy.linalg.sqrtm``.  ``eps·I`` is added to both covariances so
    the square roots exist for rank-deficient clouds (n ≤ d, degenerate data); its effect on B²
    is O(eps·d).  The real part is taken and B² is clamped at 0 before the square root, so
    round-off never yields NaN.  W₂² = G_C² + B² for Gaussian fits.  x and y need not be paired.
    """
    x, y = _prepare(x, y, normalize, paired=False)
    return _bures(x, y, eps)


def _coral(x: np.ndarray, y: np.ndarray) -> float:
    sx = _cov(x - x.mean(axis=0))
    sy = _cov(y - y.mean(axis=0))
    d = x.shape[1]
    return float(np.sum((sx - sy) ** 2) / (4.0 * d * d))


def coral(x, y, *, normalize: bool = True) -> float:
    """CORAL distance ||Σ_x − Σ_y||_F² / (4 d²) (population covariances). x and y need not be paired."""
    x, y = _prepare(x, y, normalize, paired=False)
    return _coral(x, y)


def wasserstein2_gaussian(x, y, eps: float = 1e-10, *, normalize: bool = True) -> float:
    """2-Wasserstein distance between Gaussian fits of x and y: sqrt(G_C² + B²)."""
    x, y = _prepare(x, y, normalize, paired=False)
    return float(np.hypot(_centroid_gap(x, y), _bures(x, y, eps)))


# --------------------------------------------------------------------------- relative gap


def _relative_modality_gap(x: np.ndarray, y: np.ndarray) -> float:
    n = x.shape[0]
    if n < 2:
        raise ConfigError(f"relative_modality_gap needs at least 2 pairs, got {n}")
    xu = x / np.linalg.norm(x, axis=1, keepdims=True)
    yu = y / np.linalg.norm(y, axis=1, keepdims=True)
    # d(a, b) = ½(1 − cos(a, b)) ∈ [0, 1]
    cos_pair = np.clip(np.einsum("ij,ij->i", xu, yu), -1.0, 1.0)
    paired = float(np.mean(0.5 * (1.0 - cos_pair)))

    def within(u: np.ndarray) -> float:
        # mean_{i≠j} cos(u_i, u_j) = (||Σ_i u_i||² − Σ_i ||u_i||²) / (n(n−1)) for unit rows
        s = u.sum(axis=0)
        mean_cos = (float(s @ s) - float(sq_norms(u).sum())) / (n * (n - 1))
        return 0.5 * (1.0 - min(max(mean_cos, -1.0), 1.0))

    denom = paired + 0.5 * (within(xu) + within(yu))
    return paired / denom if denom > 0 else 0.0


def relative_modality_gap(x, y, *, normalize: bool = True) -> float:
    """Relative modality gap (RMG), in [0, 1].

    RMG = P / (P + ½(W_x + W_y)),  P = mean_i d(x_i, y_i),  W_x = mean_{i≠j} d(x_i, x_j),
    W_y = mean_{i≠j} d(y_i, y_j),  with the cosine distance d(a, b) = ½(1 − cos(a, b)).

    Follows Schrodi et al. 2025 ("Two effects, one trigger") in normalising the matched-pair
    distance by the intra-modality distances: 0 when paired embeddings coincide, near 1 when
    the modalities lie far apart relative to their spread.  Being cosine-based it does not
    depend on row norms (``normalize`` is accepted for a uniform API).  The within-modality
    means are computed in closed form from the row sums, O(n d).  Returns 0 in the degenerate
    case where every distance is 0.
    """
    x, y = _prepare(x, y, normalize, paired=True)
    return _relative_modality_gap(x, y)


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class GapReport:
    """All gap measures for one (x, y) set; see the module docstring for definitions."""

    raw: float
    centroid: float
    paired_residual: float
    mmd2: float
    bures: float
    coral: float
    w2: float
    rmg: float
    n: int
    d: int

    @property
    def headline(self) -> float:
        """The distribution gap quoted as headline: MMD².

        MMD² is what the alignment loss optimises by default, and unlike the centroid gap it
        does not vanish under post-hoc mean-centring.  Bures and CORAL are reported beside it.
        """
        return self.mmd2

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


GAP_MEASURES = ("raw", "centroid", "paired_residual", "mmd2", "bures", "coral", "w2", "rmg")  # GapReport's measures


def gap_report(
    x,
    y,
    *,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    max_mmd_samples: int = 4000,
    seed: int = 0,
    normalize: bool = True,
    eps: float = 1e-10,
) -> GapReport:
    """Compute every gap measure for paired embeddings x, y (n×d) at once.

    MMD² is the paired U-statistic (``mmd2(paired=True)``) at every n: O(n² d), so for n > ``max_mmd_samples``
    it is computed on a fixed-seed (``seed``) subsample of ``max_mmd_samples`` *pairs* (the same rows of x and y),
    the same estimator on fewer pairs. All other measures use every row.
    """
    if max_mmd_samples < 2:
        raise ConfigError(f"max_mmd_samples must be at least 2, got {max_mmd_samples}")
    x, y = _prepare(x, y, normalize, paired=True)
    n, d = x.shape
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    g_c = _centroid_gap(x, y)
    g_r = _raw_gap(x, y)
    r = xc - yc
    g_p = float(np.sqrt(np.mean(np.sum(r**2, axis=1))))

    if n > max_mmd_samples:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_mmd_samples, replace=False))
        m2 = _mmd2(x[rows], y[rows], bandwidths, center=True, paired=True)
    else:
        m2 = _mmd2(x, y, bandwidths, center=True, paired=True)

    sx, sy = _cov(xc), _cov(yc)
    b = float(np.sqrt(_bures2_cov(sx, sy, eps)))
    cor = float(np.sum((sx - sy) ** 2) / (4.0 * d * d))
    return GapReport(
        raw=g_r,
        centroid=g_c,
        paired_residual=g_p,
        mmd2=m2,
        bures=b,
        coral=cor,
        w2=float(np.hypot(g_c, b)),
        rmg=_relative_modality_gap(x, y),
        n=int(n),
        d=int(d),
    )


def gap_reduction(before: float, after: float) -> float:
    """Fractional reduction 1 − after/before (1.0 = gap closed, 0 = unchanged, < 0 = worse).

    Raises ValueError unless ``before`` > 0 (NaN included).
    """
    before, after = float(before), float(after)
    if not before > 0:
        raise ConfigError(f"gap_reduction needs a positive 'before' gap, got {before}")
    return 1.0 - after / before


# --------------------------------------------------------------------------- L2I and the caption mean


CAPTION_GAP_MEASURES = ("l2i_first", "l2i_mean_caption", "raw_mean_caption")  # the gap evaluator adds these
EVAL_GAP_MEASURES = GAP_MEASURES + CAPTION_GAP_MEASURES  # every gap figure `cmalign eval` reports

# Each figure by the name the literature gives it (the report's labels).
LITERATURE_NAMES = {
    "raw": "raw gap G_R (RMS paired distance, image ↔ first caption; the paper's raw gap)",
    "centroid": "centroid gap (L2M)",
    "paired_residual": "paired residual G_P",
    "mmd2": "MMD² (distribution gap)",
    "bures": "Bures distance",
    "coral": "CORAL",
    "w2": "W₂ (Gaussian fits)",
    "rmg": "RMG",
    "l2i_first": "L2I, image ↔ first caption",
    "l2i_mean_caption": "L2I, image ↔ mean caption",
    "raw_mean_caption": "raw gap, image ↔ mean caption",
}


def paired_distances(x, y, *, normalize: bool = True) -> np.ndarray:
    """||x_i − y_i|| for every pair (float64): the per-image terms of L2I and of G_R."""
    x, y = _prepare(x, y, normalize, paired=True)
    return np.sqrt(np.sum((x - y) ** 2, axis=1))


def l2i(x, y, *, normalize: bool = True) -> float:
    """L2I = mean_i ||x_i − y_i|| (Schrodi et al. 2025): the mean-distance counterpart of the RMS raw gap G_R.

    By Jensen L2I ≤ G_R, with equality when every pair is equally far apart.
    """
    return float(np.mean(paired_distances(x, y, normalize=normalize)))


def mean_caption_embeddings(text, caption_image, n_images: int | None = None, *, normalize: bool = True) -> np.ndarray:
    """Per image, the mean of its (L2-normalised) caption embeddings, re-normalised to unit length.

    With several phrasings per image, the distance to one caption has the spread of the phrasings as its floor;
    the mean caption removes most of it. Re-normalising keeps it on the sphere the image embedding lives on.
    """
    t = _as_matrix(text, "text", normalize)
    owner = np.asarray(caption_image, np.int64)
    if owner.shape != (t.shape[0],):
        raise ConfigError(f"caption_image must give one image per caption ({t.shape[0]}), got shape {owner.shape}")
    n = int(owner.max()) + 1 if n_images is None else int(n_images)
    if owner.min() < 0 or owner.max() >= n:
        raise ConfigError(f"caption_image must index the {n} images")
    counts = np.bincount(owner, minlength=n)
    if counts.min() == 0:
        raise ConfigError("every image needs at least one caption")
    sums = np.zeros((n, t.shape[1]))
    np.add.at(sums, owner, t)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ConfigError("an image's captions cancel out: their mean cannot be re-normalised")
    return sums / norms


def first_caption_index(caption_image) -> np.ndarray:
    """Row of each image's first caption (images 0..n−1 in order), as the gap pairs use it."""
    return np.unique(np.asarray(caption_image, np.int64), return_index=True)[1]


def caption_gap_measures(image, text, caption_image, *, normalize: bool = True) -> dict[str, float]:
    """L2I against each image's first caption and against its mean caption; G_R against the mean caption."""
    x = _as_matrix(image, "image", normalize)
    t = _as_matrix(text, "text", normalize)
    first = t[first_caption_index(caption_image)]
    mean = mean_caption_embeddings(t, caption_image, len(x), normalize=False)
    d_mean = paired_distances(x, mean, normalize=False)
    return {"l2i_first": l2i(x, first, normalize=False), "l2i_mean_caption": float(np.mean(d_mean)),
            "raw_mean_caption": float(np.sqrt(np.mean(d_mean**2)))}
