"""Bootstrap intervals: coverage on synthetic cases with a known truth, and each resampled statistic equal to the
figure recomputed from scratch on the resampled items."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from cmalign.metrics import gap, gap_intervals, kernels
from cmalign.metrics.bootstrap import (
    bootstrap,
    contingency_ari,
    contingency_nmi,
    counts,
    paired_interval,
    weighted_median,
)
from cmalign.metrics.intervals import clustering_intervals, retrieval_intervals, zeroshot_intervals

# Coverage tolerance. D independent draws each cover the truth with probability c, so the empirical coverage has
# binomial SE sqrt(c(1 − c)/D) = 0.0097 at c = 0.95, D = 500; 3 SE = 0.029. The percentile interval of a mean also
# under-covers by O(1/n) (about 0.005 at n = 200, p = 0.3), so |coverage − 0.95| ≤ 0.035 fails a correct
# implementation with probability < 0.3 % (fixed seeds make the test deterministic anyway), while a wrong width
# (a 90 % or 99 % interval: coverage 0.90 / 0.99) or a wrong resampling unit falls outside.
DRAWS = 500
TOLERANCE = 3 * np.sqrt(0.95 * 0.05 / DRAWS) + 0.006


def _coverage(draw, truth: float, stat, n: int, width: int | None = None) -> float:
    hits = 0
    for d in range(DRAWS):
        data = draw(np.random.default_rng(1000 + d))
        b = bootstrap(n, lambda idx, data=data: stat(data, idx)[None], ("x",), reps=400, seed=d, width=width)
        hits += b.low[0] <= truth <= b.high[0]
    return hits / DRAWS


def test_interval_of_a_per_item_rate_covers_the_true_rate():
    p, n = 0.3, 200
    cov = _coverage(lambda rng: (rng.random(n) < p).astype(float), p,
                    lambda v, idx: counts(idx, n) @ v / n, n)
    assert abs(cov - 0.95) <= TOLERANCE, cov


def test_grouped_interval_covers_the_true_rate_with_correlated_captions():
    """t→i-like: captions of one image share a per-image success rate, so captions are not independent. Resampling
    images with their captions covers; resampling captions one by one would be too narrow (checked below)."""
    n, per = 150, 5
    owner = np.repeat(np.arange(n), per)

    def draw(rng):
        rate = rng.beta(0.6, 1.4, size=n)  # mean 0.3, strongly varying between images
        return (rng.random(n * per) < rate[owner]).astype(float)

    grouped = _coverage(draw, 0.3, lambda v, idx: (counts(idx, n) @ np.bincount(owner, v, n)) / (per * n), n)
    assert abs(grouped - 0.95) <= TOLERANCE, grouped
    naive = _coverage(draw, 0.3, lambda v, idx: v[idx].mean(axis=1), n * per)
    assert naive < 0.95 - TOLERANCE, naive  # the wrong unit under-covers: the test can tell


def test_basic_interval_covers_a_noise_inflated_plug_in_figure():
    """||x̄ − ȳ||² (a centroid gap, squared) carries a noise bias tr(Σx + Σy)/n = 0.2 on a true value of 0.25: the
    resamples add it again, so the percentile interval misses the truth almost always, while the basic interval
    (what the gap evaluator uses for figures of estimated means and covariances) covers it."""
    n, d = 200, 20
    mu = np.zeros(d)
    mu[0] = 0.5

    def draw(rng):
        return rng.standard_normal((n, d)) + mu, rng.standard_normal((n, d))

    def stat(data, idx):
        w = counts(idx, n)
        return np.sum(((w @ data[0] - w @ data[1]) / n) ** 2, axis=1)

    percentile = basic = 0
    for k in range(DRAWS):
        data = draw(np.random.default_rng(5000 + k))
        est = float(np.sum((data[0].mean(0) - data[1].mean(0)) ** 2))
        b = bootstrap(n, lambda idx, data=data: stat(data, idx)[None], ("g",), reps=400, seed=k)
        percentile += b.low[0] <= 0.25 <= b.high[0]
        lo, hi = b.basic({"g": est}).intervals()["g"]
        basic += lo <= 0.25 <= hi
        assert (lo, hi) == pytest.approx((2 * est - b.high[0], 2 * est - b.low[0]))
    assert percentile / DRAWS < 0.2
    # the basic interval is first-order: it over-covers here a little (measured 0.977 on 300 draws)
    assert abs(basic / DRAWS - 0.95) <= TOLERANCE, basic / DRAWS


def test_bootstrap_is_seeded_and_paired():
    v = np.random.default_rng(0).random(100)
    a = bootstrap(100, lambda idx: (v[idx].mean(1))[None], ("m",), reps=300, seed=4)
    b = bootstrap(100, lambda idx: (2 * v[idx].mean(1))[None], ("m",), reps=300, seed=4)
    np.testing.assert_allclose(2 * a.distribution, b.distribution)  # the same resamples
    assert paired_interval(a.distribution[0], b.distribution[0], lambda x, y: y / x) == pytest.approx([2.0, 2.0])
    assert a.intervals()["m"][0] < v.mean() < a.intervals()["m"][1]
    assert bootstrap(1, lambda idx: idx[None], ("m",)) is None  # nothing to resample
    assert bootstrap(10, lambda idx: idx[None], ("m",), reps=0) is None


def test_weighted_median_is_numpys_median_of_the_multiset():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 20, size=30).astype(float)
    w = rng.integers(0, 3, size=(50, 30)).astype(float)
    w[0] = 0
    w[0, 3] = 2  # one value twice
    got = weighted_median(values, w)
    for row, g in zip(w, got, strict=True):
        assert g == np.median(np.repeat(values, row.astype(int)))


def test_contingency_scores_equal_sklearn_on_resampled_labels():
    rng = np.random.default_rng(2)
    truth, pred = rng.integers(0, 4, 60), rng.integers(-1, 5, 60)
    for _ in range(20):
        idx = rng.integers(0, 60, 60)
        t, p = truth[idx], pred[idx]
        table = np.zeros((4, 6))
        np.add.at(table, (t, p + 1), 1)
        assert contingency_ari(table) == pytest.approx(adjusted_rand_score(t, p), abs=1e-12)
        assert contingency_nmi(table) == pytest.approx(normalized_mutual_info_score(t, p), abs=1e-12)
    perfect = np.diag([3.0, 2.0])
    assert contingency_ari(perfect) == 1.0 and contingency_nmi(perfect) == pytest.approx(1.0)
    assert contingency_ari(np.array([[5.0]])) == 1.0 == contingency_nmi(np.array([[5.0]]))


def _indices(n: int, reps: int, seed: int, width: int | None = None) -> np.ndarray:
    """The resamples :func:`bootstrap` draws for (n, reps, seed): every statistic sees the same ones."""
    seen = []
    bootstrap(n, lambda idx: (seen.append(idx.copy()), np.zeros((1, len(idx))))[1], ("i",), reps, seed, width=width)
    return np.concatenate(seen)


def test_gap_replicates_are_the_measures_of_the_resampled_pairs():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((120, 6)) + 1.5, rng.standard_normal((120, 6))
    fast, slow = gap_intervals.gap_bootstrap(x, y, reps=30, slow_reps=10, seed=5)
    idx, idx_slow = _indices(120, 30, 5), _indices(120, 10, 5)
    for r in (0, 7, 29):
        rep = gap.gap_report(x[idx[r]], y[idx[r]])
        for j, name in enumerate(fast.names):
            want = gap.l2i(x[idx[r]], y[idx[r]]) if name == "l2i" else getattr(rep, name)
            assert fast.distribution[j, r] == pytest.approx(want, rel=1e-9), name
    xs, ys = gap._prepare(x, y, True, True)
    sigma = kernels.median_distance(np.concatenate([xs - xs.mean(0), ys - ys.mean(0)]))
    gammas = 1 / (2 * (np.asarray(gap.DEFAULT_BANDWIDTHS) * sigma) ** 2)

    def k(a, b):
        d2 = np.sum((a[:, None] - b[None]) ** 2, axis=-1)
        return np.mean([np.exp(-g * d2) for g in gammas], axis=0)

    for r in (0, 9):
        ix = idx_slow[r]
        xr, yr = xs[ix], ys[ix]
        rep = gap.gap_report(xr, yr)
        # MMD² of the resample by brute force: centred on the resample, the full sample's bandwidth, and only
        # pairs of positions holding distinct rows (a row and its repeat are no pair)
        xc, yc = xr - xr.mean(0), yr - yr.mean(0)
        distinct = ix[:, None] != ix[None, :]
        want = k(xc, xc)[distinct].mean() + k(yc, yc)[distinct].mean() - 2 * k(xc, yc)[distinct].mean()
        assert slow.distribution[0, r] == pytest.approx(want, rel=1e-9)
        for j, name in enumerate(slow.names[1:], 1):
            assert slow.distribution[j, r] == pytest.approx(getattr(rep, name), rel=1e-6), name
    # without repeats the resampled statistic is mmd2 itself
    mmd = gap_intervals._WeightedMMD(xs, ys, gap.DEFAULT_BANDWIDTHS)
    assert mmd(np.ones((1, 120)))[0] == pytest.approx(gap.mmd2(x, y, paired=True), rel=1e-9)


def test_grouped_retrieval_replicates_are_the_captions_of_the_resampled_images():
    rng = np.random.default_rng(4)
    owner = np.sort(rng.integers(0, 40, 130))
    owner[:40] = np.arange(40)  # every image has a caption
    owner = np.sort(owner)
    per_query = {"i2t_hit@1": rng.random(40) < 0.4, "i2t_rank": rng.integers(1, 9, 40).astype(float),
                 "t2i_hit@1": rng.random(130) < 0.3, "t2i_rank": rng.integers(1, 9, 130).astype(float)}
    b = retrieval_intervals(per_query, owner, reps=20, seed=1)
    idx = _indices(40, 20, 1, width=130)
    for r in (0, 11):
        caps = np.concatenate([np.flatnonzero(owner == i) for i in idx[r]])
        d = dict(zip(b.names, b.distribution[:, r], strict=True))
        assert d["t2i_R@1"] == pytest.approx(per_query["t2i_hit@1"][caps].mean())
        assert d["t2i_median_rank"] == np.median(per_query["t2i_rank"][caps])
        assert d["t2i_mean_rank"] == pytest.approx(per_query["t2i_rank"][caps].mean())
        assert d["i2t_R@1"] == pytest.approx(per_query["i2t_hit@1"][idx[r]].mean())
        assert d["i2t_median_rank"] == np.median(per_query["i2t_rank"][idx[r]])


def _ari_of_distinct_points(origin, truth, clusters) -> float:
    """Pair-counting ARI over every pair of resampled points except the copies of one point (same ``origin``)."""
    i, j = np.triu_indices(len(origin), 1)
    keep = origin[i] != origin[j]
    i, j = i[keep], j[keep]
    same_t, same_c = truth[i] == truth[j], clusters[i] == clusters[j]
    both, t_pairs, c_pairs, pairs = np.sum(same_t & same_c), same_t.sum(), same_c.sum(), len(i)
    expected = t_pairs * c_pairs / pairs
    return float((both - expected) / ((t_pairs + c_pairs) / 2 - expected))


def test_clustering_and_zeroshot_replicates_match_sklearn_and_numpy():
    rng = np.random.default_rng(5)
    n = 50
    truth = rng.integers(0, 3, n)
    km, hd = rng.integers(0, 3, 2 * n), rng.integers(-1, 4, 2 * n)
    b = clustering_intervals({"truth": truth, "kmeans": km, "hdbscan": hd}, reps=10, seed=2)
    idx = _indices(n, 10, 2)
    for r in (0, 5):
        pts = np.concatenate([idx[r], n + idx[r]])
        t2 = np.concatenate([truth, truth])[pts]
        d = dict(zip(b.names, b.distribution[:, r], strict=True))
        assert d["kmeans_ari"] == pytest.approx(_ari_of_distinct_points(pts, t2, km[pts]))
        assert d["kmeans_nmi"] == pytest.approx(normalized_mutual_info_score(t2, km[pts]))
        assert d["kmeans_modality_nmi"] == pytest.approx(normalized_mutual_info_score(np.repeat([0, 1], n), km[pts]))
        assert d["hdbscan_ari"] == pytest.approx(_ari_of_distinct_points(pts, t2, hd[pts]))
        assert d["hdbscan_noise_share"] == pytest.approx(np.mean(hd[pts] < 0))

    top1 = (rng.random(n) < 0.5).astype(float)
    z = zeroshot_intervals({"truth": truth, "top1": top1}, reps=10, seed=2)
    for r in (0, 5):
        t, c = truth[idx[r]], top1[idx[r]]
        per_class = [c[t == k].mean() for k in range(3) if np.any(t == k)]
        assert z.distribution[1, r] == pytest.approx(np.mean(per_class))
        assert z.distribution[0, r] == pytest.approx(c.mean())


def test_mixed_replicates_resample_image_queries_and_their_captions():
    from cmalign.metrics.intervals import mixed_intervals
    from cmalign.metrics.mixed import mixed_modality_report

    rng = np.random.default_rng(6)
    img = rng.standard_normal((30, 8))
    owner = np.repeat(np.arange(30), 3)
    txt = img[owner] + 2.0 * rng.standard_normal((90, 8)) + 1.0
    img, txt = img / np.linalg.norm(img, axis=1, keepdims=True), txt / np.linalg.norm(txt, axis=1, keepdims=True)
    figures, per_query = mixed_modality_report(img, txt, np.arange(30), owner, k=5, per_query=True)
    assert figures == mixed_modality_report(img, txt, np.arange(30), owner, k=5)
    assert figures["text_query_image_share@5"] == pytest.approx(per_query["text_other"].sum() / (90 * 5))
    b = mixed_intervals(per_query, owner, 5, reps=10, seed=3)
    idx = _indices(30, 10, 3, width=90)
    for r in (0, 4):
        caps = np.concatenate([np.flatnonzero(owner == i) for i in idx[r]])
        d = dict(zip(b.names, b.distribution[:, r], strict=True))
        assert d["text_query_image_share@5"] == pytest.approx(per_query["text_other"][caps].sum() / (len(caps) * 5))
        assert d["text_query_partner_rank_median"] == np.median(per_query["text_rank"][caps])
        assert d["image_query_partner_hit@5"] == pytest.approx(np.mean(per_query["image_rank"][idx[r]] <= 5))
        assert d["image_query_partner_rank_median"] == np.median(per_query["image_rank"][idx[r]])


def test_clustering_ari_interval_is_centred_on_the_estimate_with_many_small_classes():
    """300 images of 64 classes (~5 each): a resample's copies of one image must not count as pairs that agree.
    Counting them put every interval of a small eval above its own point estimate (a0: 0.2356 [0.2618, 0.3023])."""
    from sklearn.metrics import adjusted_rand_score

    from cmalign.metrics.intervals import _two_point_table, clustering_intervals

    rng = np.random.default_rng(1)
    n, classes = 300, 64
    truth = rng.integers(0, classes, n)
    clusters = np.concatenate([np.where(rng.random(n) < 0.5, truth, rng.integers(0, classes, n)) for _ in range(2)])
    point = adjusted_rand_score(np.concatenate([truth, truth]), clusters)
    table, r, k = _two_point_table((truth, truth), (clusters[:n], clusters[n:]))
    c = table.sum(0).reshape(r, k)
    assert contingency_ari(c, c) == pytest.approx(point, abs=1e-12)  # every point drawn once: the plain ARI
    low, high = clustering_intervals({"truth": truth, "kmeans": clusters}, reps=1000, seed=0).intervals()["kmeans_ari"]
    # measured: 0.2835 in [0.2392, 0.3547]; with the copies counted the interval began at 0.3043, above it
    assert low < point < high
    assert abs((low + high) / 2 - point) < 0.15 * (high - low)
