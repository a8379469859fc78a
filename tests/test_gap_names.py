"""The gap measures by the literature's names: L2I against the first and the mean caption, on constructed inputs
with known answers, and side by side in the gap evaluator and its reductions."""

import numpy as np
import pytest

from cmalign.evaluation.evaluators import GapEvaluator, definitions
from cmalign.evaluation.runner import _comparison
from cmalign.metrics import gap, gap_intervals


def _unit(*v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def test_l2i_is_the_mean_distance_and_raw_the_rms():
    x = np.array([[1.0, 0, 0], [1.0, 0, 0]])
    y = np.array([[1.0, 0, 0], [-1.0, 0, 0]])  # distances 0 and 2
    assert gap.l2i(x, y) == pytest.approx(1.0)
    assert gap.raw_gap(x, y) == pytest.approx(np.sqrt(2.0))
    np.testing.assert_allclose(gap.paired_distances(x, y), [0.0, 2.0])
    # at an angle θ the chord is 2 sin(θ/2); rows are normalised first
    theta = 0.7
    x2, y2 = np.array([[3.0, 0, 0]]), np.array([[np.cos(theta), np.sin(theta), 0]]) * 5
    assert gap.l2i(x2, y2) == pytest.approx(2 * np.sin(theta / 2))


def test_mean_caption_is_renormalised_and_removes_the_phrasing_spread():
    theta = 0.5
    image = np.array([[1.0, 0, 0], [1.0, 0, 0]])
    # image 0: two phrasings symmetric about it; image 1: captions along e2 and e3
    text = np.array([[np.cos(theta), np.sin(theta), 0], [np.cos(theta), -np.sin(theta), 0],
                     [0, 1.0, 0], [0, 0, 2.0]])
    owner = np.array([0, 0, 1, 1])
    mean = gap.mean_caption_embeddings(text, owner)
    np.testing.assert_allclose(mean, [_unit(1, 0, 0), _unit(0, 1, 1)], atol=1e-12)  # unit length again
    m = gap.caption_gap_measures(image, text, owner)
    first = 2 * np.sin(theta / 2)  # image 0 to its first caption; image 1 to e2 is √2
    assert m["l2i_first"] == pytest.approx((first + np.sqrt(2)) / 2)
    assert m["l2i_mean_caption"] == pytest.approx((0 + np.sqrt(2)) / 2)  # the symmetric phrasings average away
    assert m["raw_mean_caption"] == pytest.approx(np.sqrt((0 + 2) / 2))
    with pytest.raises(ValueError, match="at least one caption"):
        gap.mean_caption_embeddings(text, np.array([0, 0, 2, 2]))


class _E:
    def __init__(self, image, text, owner):
        self.image, self.text, self._owner = image, text, owner

    def first_captions(self, data):
        return self.text[gap.first_caption_index(self._owner)]


class _Data:
    def __init__(self, owner):
        self.eval = type("S", (), {"caption_image": owner})()


def _system(seed: int, shift: float):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((40, 8)) + shift
    owner = np.repeat(np.arange(40), 3)
    text = image[owner] + 0.8 * rng.standard_normal((120, 8))
    return _E(image, text, owner), _Data(owner)


def test_gap_evaluator_reports_every_measure_side_by_side_with_reductions():
    e, data = _system(0, 1.0)
    ev = GapEvaluator()
    out = ev(e, data)
    assert set(gap.EVAL_GAP_MEASURES) <= set(out) and out["n"] == 40 and "ci" not in out  # no bootstrap asked
    assert out["l2i_first"] <= out["raw"]  # mean ≤ RMS
    assert out["l2i_first"] == pytest.approx(gap.l2i(e.image, e.first_captions(data)))
    assert out["l2i_mean_caption"] < out["l2i_first"]  # averaging three noisy captions brings them nearer

    defs = definitions()
    assert "L2M" in defs["gap.centroid"] and "raw gap" in defs["gap.raw"] and "re-normalised" in \
        defs["gap.l2i_mean_caption"]
    assert gap.LITERATURE_NAMES["centroid"] == "centroid gap (L2M)"

    ev.bootstrap, ev.bootstrap_slow = 50, 20
    boot = ev(e, data)
    assert set(boot["ci"]) == set(gap.EVAL_GAP_MEASURES)
    for m in gap.EVAL_GAP_MEASURES:
        lo, hi = boot["ci"][m]
        assert lo <= hi and len(boot["_replicates"][m]) == (20 if m in gap_intervals.SLOW_BOOTSTRAP else 50)

    # reductions against the original (the reference), for every measure, with paired intervals
    other, _ = _system(0, 0.2)
    aligned = ev(other, data)
    systems = {"baseline": {"gap": {k: v for k, v in boot.items() if not k.startswith("_") and k != "ci"}},
               "model": {"gap": {k: v for k, v in aligned.items() if not k.startswith("_") and k != "ci"}}}
    reps = {"baseline": {"gap": boot["_replicates"]}, "model": {"gap": aligned["_replicates"]}}
    comp = _comparison(systems, "baseline", reps)["model"]
    # every measure, except one the reference does not show (an unbiased MMD² can be ≤ 0 on a small sample)
    assert set(comp["gap_reduction"]) == {m for m in gap.EVAL_GAP_MEASURES if boot[m] > 0}
    assert {"l2i_first", "l2i_mean_caption", "raw_mean_caption", "centroid"} <= set(comp["gap_reduction"])
    assert comp["gap_reduction"]["l2i_first"] == pytest.approx(
        1 - aligned["l2i_first"] / boot["l2i_first"])
    lo, hi = comp["ci"]["gap_reduction.l2i_mean_caption"]
    assert lo <= comp["gap_reduction"]["l2i_mean_caption"] <= hi
