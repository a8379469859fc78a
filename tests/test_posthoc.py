"""The post-hoc gap fixes (mean-centring, Liang's shift, Procrustes, GR-CLIP's centring) on constructed cases."""

import numpy as np
import pytest
from helpers.unit_vectors import random_unit, unit

from cmalign.evaluation.posthoc import fit_posthoc, parse_posthoc
from cmalign.metrics import gap


def test_mean_centring_closes_the_centroid_gap_but_not_the_distribution_gap():
    rng = np.random.default_rng(1)
    x = random_unit(300, 8, seed=2)
    y = unit(x * np.array([1, 1, 1, 1, 0.3, 0.3, 0.3, 0.3]) + 0.2 * rng.normal(size=x.shape) + 1.5)
    fix = fit_posthoc("centring", x, y, renormalise=False)
    xc, yc = fix.image(x), fix.text(y)
    assert gap.centroid_gap(x, y) > 0.5
    assert gap.centroid_gap(xc, yc, normalize=False) < 1e-9
    before = gap.mmd2(x, y)
    after = gap.mmd2(xc, yc, normalize=False)
    assert after == pytest.approx(before, rel=1e-6)  # MMD² of the centred clouds is untouched
    assert gap.coral(xc, yc, normalize=False) == pytest.approx(gap.coral(x, y), rel=1e-6)


def test_liang_shift_meets_in_the_middle_and_procrustes_finds_a_rotation():
    x = random_unit(200, 6, seed=3)
    y = unit(x + np.array([0.8, 0, 0, 0, 0, 0]))
    liang = fit_posthoc("liang", x, y, renormalise=False)
    np.testing.assert_allclose(liang.image(x).mean(0), liang.text(y).mean(0), atol=1e-12)
    rotation, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(6, 6)))
    proc = fit_posthoc("procrustes", x, (x @ rotation.T).astype(np.float32))
    np.testing.assert_allclose(proc.text(x @ rotation.T), x, atol=1e-5)  # text rotated back onto images
    np.testing.assert_allclose(proc.image(x), x, atol=1e-6)


def test_grclip_centres_query_texts_of_their_own_distribution_by_their_own_mean():
    x = random_unit(200, 6, seed=5)
    y = unit(x + np.array([0.8, 0, 0, 0, 0, 0]))
    prompts = unit(random_unit(40, 6, seed=6) + np.array([0, 0, 0, 0, 0, 1.5]))  # another text distribution
    gr = fit_posthoc("grclip", x, y, renormalise=False)
    centring = fit_posthoc("centring", x, y, renormalise=False)
    # documents (images, captions) as mean-centring has them: the training means subtracted
    np.testing.assert_allclose(gr.image(x), centring.image(x), atol=1e-12)
    np.testing.assert_allclose(gr.text(y), centring.text(y), atol=1e-12)
    # queries of another distribution lose their own mean, not the captions' (which would leave them off-centre)
    np.testing.assert_allclose(gr.queries(prompts).mean(0), 0, atol=1e-12)
    assert np.linalg.norm(centring.queries(prompts).mean(0)) > 0.5
    np.testing.assert_allclose(centring.queries(prompts), centring.text(prompts))


def test_parse_posthoc():
    assert parse_posthoc("all") == ("centring", "liang", "procrustes", "grclip")
    assert parse_posthoc("none") == () and parse_posthoc(None) == ()
    assert parse_posthoc("liang, centring") == ("liang", "centring")
    with pytest.raises(ValueError, match="unknown fix"):
        parse_posthoc("whitening")
