"""Tests for cmalign.metrics.gap: identities, invariances and hand-checkable cases of the gap measures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cmalign.metrics import gap
from cmalign.metrics.gap import (
    GapReport,
    bures,
    center_modalities,
    centroid_gap,
    coral,
    gap_reduction,
    gap_report,
    mmd2,
    paired_residual,
    raw_gap,
    relative_modality_gap,
    wasserstein2_gaussian,
)


def _pair(n: int = 300, d: int = 16, seed: int = 0, offset: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Paired clouds: y is a noisy copy of x with a built-in constant offset (a modality gap)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    shift = np.zeros(d)
    shift[0] = offset * math.sqrt(d)
    y = x + 0.5 * rng.standard_normal((n, d)) + shift
    return x, y


# ------------------------------------------------------------------ decomposition / centring


@pytest.mark.parametrize("normalize", [True, False])
def test_raw_gap_decomposes_into_centroid_and_residual(normalize: bool) -> None:
    x, y = _pair()
    g_r = raw_gap(x, y, normalize=normalize)
    g_c = centroid_gap(x, y, normalize=normalize)
    g_p = paired_residual(x, y, normalize=normalize)
    assert g_c > 0.1 and g_p > 0.1  # both parts non-trivial, so the identity is tested
    assert g_r**2 == pytest.approx(g_c**2 + g_p**2, abs=1e-10)


def test_raw_gap_matches_direct_formula() -> None:
    x, y = _pair(n=50, d=8, seed=3)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    assert raw_gap(x, y) == pytest.approx(math.sqrt(np.mean(np.sum((xn - yn) ** 2, axis=1))), abs=1e-12)
    assert centroid_gap(x, y) == pytest.approx(np.linalg.norm(xn.mean(0) - yn.mean(0)), abs=1e-12)


def test_identical_inputs_have_zero_raw_and_centroid_gap() -> None:
    x, _ = _pair()
    assert raw_gap(x, x.copy()) == 0.0
    assert centroid_gap(x, x.copy()) == 0.0
    assert paired_residual(x, x.copy()) == 0.0


def test_centering_removes_centroid_gap_but_not_shape_gaps() -> None:
    rng = np.random.default_rng(1)
    n, d = 250, 12
    x = rng.standard_normal((n, d))
    # different shape (anisotropic scale) plus an offset
    y = rng.standard_normal((n, d)) * np.linspace(0.3, 2.0, d) + 1.5
    xc, yc = center_modalities(x, y)

    assert centroid_gap(x, y) > 0.3
    assert centroid_gap(xc, yc, normalize=False) < 1e-12
    # post-hoc centring does not renormalise
    assert not np.allclose(np.linalg.norm(xc, axis=1), 1.0)

    m_before, m_after = mmd2(x, y), mmd2(xc, yc, normalize=False)
    assert m_before > 0.01
    assert m_after == pytest.approx(m_before, rel=1e-9, abs=1e-12)

    b_before, b_after = bures(x, y), bures(xc, yc, normalize=False)
    assert b_before > 0.05
    assert b_after == pytest.approx(b_before, rel=1e-7)

    c_before, c_after = coral(x, y), coral(xc, yc, normalize=False)
    assert c_before > 0
    assert c_after == pytest.approx(c_before, rel=1e-10)


# ------------------------------------------------------------------ MMD²


def test_mmd2_near_zero_for_same_distribution_and_positive_for_rescaled() -> None:
    rng = np.random.default_rng(2)
    n, d = 400, 16
    a = rng.standard_normal((n, d))
    b = rng.standard_normal((n, d))
    same = mmd2(a, b)
    assert abs(same) < 0.01

    # anisotropic rescale (a pure shift would be removed by the centring)
    scale = np.ones(d)
    scale[:2] = 10.0
    c = rng.standard_normal((n, d)) * scale
    diff = mmd2(a, c)
    assert diff > 0.01
    assert diff > 10 * abs(same)


def test_mmd2_center_flag_controls_offset_sensitivity() -> None:
    rng = np.random.default_rng(4)
    a = rng.standard_normal((300, 8))
    b = rng.standard_normal((300, 8)) + np.array([3.0] + [0.0] * 7)
    # with normalize=False a pure shift is invisible after centring, visible without
    assert abs(mmd2(a, b, normalize=False)) < 0.01
    assert mmd2(a, b, center=False, normalize=False) > 0.1


@pytest.mark.parametrize("bandwidths", [(0.5, 1.0, 2.0, 4.0), (4.0, 0.5, 2.0), (0.7, 1.3), (1.0,)])
def test_mmd2_matches_naive_unbiased_estimator_and_allows_unequal_sizes(
    bandwidths: tuple[float, ...],
) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((70, 6))
    y = rng.standard_normal((45, 6)) * np.array([1, 1, 1, 2, 2, 0.5])
    xc, yc = x - x.mean(0), y - y.mean(0)
    pooled = np.vstack([xc, yc])
    dist = np.sqrt(((pooled[:, None, :] - pooled[None, :, :]) ** 2).sum(-1))
    sigma = np.median(dist[np.triu_indices(len(pooled), k=1)])

    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        sq = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.mean([np.exp(-sq / (2 * (m * sigma) ** 2)) for m in bandwidths], axis=0)

    kxx, kyy, kxy = k(xc, xc), k(yc, yc), k(xc, yc)
    nx, ny = len(xc), len(yc)
    expected = (
        (kxx.sum() - np.trace(kxx)) / (nx * (nx - 1))
        + (kyy.sum() - np.trace(kyy)) / (ny * (ny - 1))
        - 2 * kxy.mean()
    )
    assert expected > 0.001
    assert mmd2(x, y, bandwidths=bandwidths, normalize=False) == pytest.approx(expected, rel=1e-9)


def test_mmd2_rejects_bad_input() -> None:
    x = np.ones((1, 4))
    with pytest.raises(ValueError):
        mmd2(x, np.ones((5, 4)))
    with pytest.raises(ValueError):
        mmd2(np.eye(4), np.eye(4), bandwidths=(1.0, -1.0))
    with pytest.raises(ValueError):
        mmd2(np.eye(4), np.ones((4, 3)))


# ------------------------------------------------------------------ Bures / CORAL / W2


def test_bures_zero_for_identical_covariances() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((200, 10)) @ rng.standard_normal((10, 10))
    # same centred cloud, shifted: identical covariance
    assert bures(x, x + 5.0, normalize=False) < 1e-4
    assert coral(x, x + 5.0, normalize=False) < 1e-20


def test_bures_closed_form_for_diagonal_gaussians() -> None:
    # cloud with exactly diagonal population covariance: ±sqrt(v_k) along each axis
    def diagonal_cloud(v: np.ndarray) -> np.ndarray:
        d = len(v)
        rows = []
        for k in range(d):
            e = np.zeros(d)
            e[k] = math.sqrt(v[k] * d)
            rows += [e, -e]
        return np.array(rows)  # covariance = diag(v) with 1/n normalisation

    a = np.array([1.0, 4.0, 0.25, 2.0])
    b = np.array([9.0, 1.0, 0.25, 0.5])
    x, y = diagonal_cloud(a), diagonal_cloud(b)
    np.testing.assert_allclose(np.cov(x.T, bias=True), np.diag(a), atol=1e-12)
    expected_b2 = float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    assert bures(x, y, normalize=False) ** 2 == pytest.approx(expected_b2, rel=1e-8)

    # W2² = G_C² + B² once the clouds have different means
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    y_shifted = y + shift
    w2 = wasserstein2_gaussian(x, y_shifted, normalize=False)
    assert w2**2 == pytest.approx(float(shift @ shift) + expected_b2, rel=1e-8)
    g_c = centroid_gap(x, y_shifted, normalize=False)
    b = bures(x, y_shifted, normalize=False)
    assert w2**2 == pytest.approx(g_c**2 + b**2, rel=1e-12)


def test_coral_hand_checked() -> None:
    # x: points ±(1,0), ±(0,1)  -> covariance diag(0.5, 0.5)
    # y: points ±(2,0), ±(0,0)  -> covariance diag(2, 0)
    x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    y = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    # ||diag(-1.5, 0.5)||_F² / (4 · 2²) = (2.25 + 0.25) / 16
    assert coral(x, y, normalize=False) == pytest.approx(2.5 / 16, abs=1e-15)


def test_bures_handles_rank_deficient_covariance() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 20))  # n < d: singular covariance
    y = rng.standard_normal((6, 20))
    b = bures(x, y)
    assert np.isfinite(b) and b > 0
    assert bures(x, x) < 1e-3


# ------------------------------------------------------------------ RMG


def test_rmg_zero_for_identical_and_ordered_by_distance() -> None:
    rng = np.random.default_rng(8)
    n, d = 300, 32
    base = rng.standard_normal((n, d))
    assert relative_modality_gap(base, base.copy()) < 1e-12

    direction = np.zeros(d)
    direction[0] = 1.0
    spread = 0.3

    def clouds(offset: float) -> tuple[np.ndarray, np.ndarray]:
        x = direction + spread * rng.standard_normal((n, d)) / math.sqrt(d)
        y = x + offset * rng.standard_normal(d) + 0.05 * rng.standard_normal((n, d)) / math.sqrt(d)
        return x, y

    near = relative_modality_gap(*clouds(0.05))
    x_far = direction + spread * rng.standard_normal((n, d)) / math.sqrt(d)
    y_far = -direction + spread * rng.standard_normal((n, d)) / math.sqrt(d)
    far = relative_modality_gap(x_far, y_far)
    assert 0.0 < near < far <= 1.0
    assert far > 0.9  # modalities far apart relative to their spread


def test_rmg_matches_pairwise_definition() -> None:
    x, y = _pair(n=60, d=10, seed=9)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    n = len(x)
    off = ~np.eye(n, dtype=bool)
    p = np.mean(0.5 * (1 - np.sum(xn * yn, axis=1)))
    wx = np.mean((0.5 * (1 - xn @ xn.T))[off])
    wy = np.mean((0.5 * (1 - yn @ yn.T))[off])
    assert relative_modality_gap(x, y) == pytest.approx(p / (p + 0.5 * (wx + wy)), rel=1e-10)


# ------------------------------------------------------------------ reduction / report


def test_gap_reduction_arithmetic_and_errors() -> None:
    assert gap_reduction(0.8, 0.2) == pytest.approx(0.75)
    assert gap_reduction(1.0, 1.0) == 0.0
    assert gap_reduction(0.5, 0.0) == 1.0
    assert gap_reduction(0.5, 1.0) == pytest.approx(-1.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            gap_reduction(bad, 0.1)


def test_gap_report_agrees_with_individual_functions() -> None:
    x, y = _pair(n=200, d=16, seed=10)
    r = gap_report(x, y)
    assert isinstance(r, GapReport)
    assert (r.n, r.d) == (200, 16)
    assert r.raw == pytest.approx(raw_gap(x, y), rel=1e-12)
    assert r.centroid == pytest.approx(centroid_gap(x, y), rel=1e-12)
    assert r.paired_residual == pytest.approx(paired_residual(x, y), rel=1e-12)
    assert r.mmd2 == pytest.approx(mmd2(x, y, paired=True), rel=1e-12)
    assert r.bures == pytest.approx(bures(x, y), rel=1e-9)
    assert r.coral == pytest.approx(coral(x, y), rel=1e-12)
    assert r.w2 == pytest.approx(wasserstein2_gaussian(x, y), rel=1e-9)
    assert r.rmg == pytest.approx(relative_modality_gap(x, y), rel=1e-12)
    assert r.headline == r.mmd2

    d = r.to_dict()
    assert set(d) == {"raw", "centroid", "paired_residual", "mmd2", "bures", "coral", "w2", "rmg", "n", "d"}
    json.dumps(d)  # plain Python numbers
    with pytest.raises(AttributeError):
        r.raw = 0.0  # type: ignore[misc]


def test_gap_report_subsamples_mmd_deterministically() -> None:
    x, y = _pair(n=300, d=8, seed=11)
    r1 = gap_report(x, y, max_mmd_samples=100, seed=3)
    r2 = gap_report(x, y, max_mmd_samples=100, seed=3)
    assert r1 == r2
    assert r1.mmd2 != gap_report(x, y).mmd2  # the subsample was actually used
    assert r1.raw == gap_report(x, y).raw  # other measures use every row


def test_paired_measures_reject_unpaired_input() -> None:
    x = np.random.default_rng(12).standard_normal((10, 4))
    with pytest.raises(ValueError):
        raw_gap(x, x[:5])
    with pytest.raises(ValueError):
        relative_modality_gap(x, x[:5])
    with pytest.raises(ValueError):
        gap_report(x, x[:5])
    with pytest.raises(ValueError):
        raw_gap(np.zeros((3, 4)), np.ones((3, 4)))  # zero row cannot be normalised
    # unpaired measures accept different row counts
    assert (
        np.isfinite(coral(x, x[:5])) and np.isfinite(bures(x, x[:5])) and np.isfinite(centroid_gap(x, x[:5]))
    )


# ------------------------------------------------------------------ dtype / normalisation


def test_float32_inputs_are_cast_to_float64() -> None:
    x, y = _pair(n=150, d=16, seed=13)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    xc, yc = center_modalities(x32, y32)
    assert xc.dtype == np.float64 and yc.dtype == np.float64
    r64 = gap_report(x32.astype(np.float64), y32.astype(np.float64))
    r32 = gap_report(x32, y32)
    for key, value in r64.to_dict().items():
        assert r32.to_dict()[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    # identity still holds to float64 precision on float32 input
    assert raw_gap(x32, y32) ** 2 == pytest.approx(
        centroid_gap(x32, y32) ** 2 + paired_residual(x32, y32) ** 2, abs=1e-12
    )


def test_normalize_makes_results_invariant_to_row_scaling() -> None:
    x, y = _pair(n=150, d=16, seed=14)
    rng = np.random.default_rng(15)
    sx = rng.uniform(0.1, 10.0, size=(len(x), 1))
    sy = rng.uniform(0.1, 10.0, size=(len(y), 1))
    r = gap_report(x, y)
    r_scaled = gap_report(x * sx, y * sy)
    for key, value in r.to_dict().items():
        assert r_scaled.to_dict()[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    # and without normalisation the scaling does change the answer
    assert raw_gap(x * sx, y * sy, normalize=False) != pytest.approx(raw_gap(x, y, normalize=False))
    # normalize=True equals normalize=False on pre-normalised rows
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    assert raw_gap(x, y) == pytest.approx(raw_gap(xn, yn, normalize=False), rel=1e-12)


def test_module_does_not_import_torch() -> None:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(gap))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "torch" not in imported
