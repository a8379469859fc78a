"""The sweep report's new tables, on a constructed summary: R² over the alpha runs and over runs + post-hoc fixes
(each with its n), gap reductions against the base model and against α = 0, and the intervals of each eval."""

import json

import pytest

from cmalign.sweep.analysis import gap_reductions, r2_by_population, reference_rows, row_intervals
from cmalign.sweep.report import write_sweep_report


def _rows(tmp_path):
    rows = []
    for name, kind, alpha, g, ari in (("a0", "alpha", 0.0, 0.9, 0.10), ("a0.1", "alpha", 0.1, 0.6, 0.22),
                                      ("a0.5", "alpha", 0.5, 0.3, 0.35), ("base", "base", None, 1.0, 0.05),
                                      ("base+centring", "posthoc", None, 0.8, 0.30)):
        metrics = {"gap.raw": g, "gap.centroid": g / 2, "gap.l2i_first": 0.9 * g, "gap.l2i_mean_caption": 0.7 * g,
                   "gap.mmd2": g / 50, "clustering.kmeans_ari": ari, "zeroshot.top1": 0.3}
        eval_dir = tmp_path / "evals" / ("base" if kind in ("base", "posthoc") else name)
        rows.append({"name": name, "kind": kind, "alpha_target": alpha, "metrics": metrics,
                     "eval_dir": str(eval_dir), "run_dir": str(tmp_path / name)})
    # the eval of a0.5 wrote intervals; so did the base eval, for the base model and its fix
    (tmp_path / "evals" / "a0.5").mkdir(parents=True)
    (tmp_path / "evals" / "a0.5" / "metrics.json").write_text(json.dumps(
        {"ci": {"model": {"gap": {"raw": [0.28, 0.32]}, "clustering": {"kmeans_ari": [0.3, 0.4]}}}}))
    (tmp_path / "evals" / "base").mkdir(parents=True)
    (tmp_path / "evals" / "base" / "metrics.json").write_text(json.dumps(
        {"ci": {"model": {"gap": {"raw": [0.97, 1.03]}}, "model+centring": {"gap": {"raw": [0.77, 0.83]}}}}))
    return rows


def test_r2_is_split_by_population_with_its_n(tmp_path):
    rows = _rows(tmp_path)
    pops = r2_by_population(rows)
    assert pops["alpha_runs"]["rows"] == 3 and pops["all"]["rows"] == 5
    alpha = pops["alpha_runs"]["table"]["raw"]["clustering.kmeans_ari"]
    every = pops["all"]["table"]["raw"]["clustering.kmeans_ari"]
    assert alpha["n"] == 3 and every["n"] == 5
    assert alpha["r2"] > 0.95 > every["r2"]  # the post-hoc fix sits off the runs' line
    assert "l2i_mean_caption" in pops["all"]["table"] and "bures" not in pops["all"]["table"]  # only measures present


def test_reductions_against_base_and_alpha0_and_intervals(tmp_path):
    rows = _rows(tmp_path)
    refs = reference_rows(rows)
    assert refs["base"]["name"] == "base" and refs["alpha0"]["name"] == "a0"
    vs_base = gap_reductions(rows, refs["base"])
    assert vs_base["a0.5"]["raw"] == pytest.approx(0.7) and "base" not in vs_base
    assert vs_base["a0.5"]["l2i_mean_caption"] == pytest.approx(1 - 0.21 / 0.7)
    assert gap_reductions(rows, refs["alpha0"])["a0.5"]["centroid"] == pytest.approx(1 - 0.15 / 0.45)
    assert row_intervals(rows[2]) == {"gap.raw": [0.28, 0.32], "clustering.kmeans_ari": [0.3, 0.4]}
    assert row_intervals(rows[4]) == {"gap.raw": [0.77, 0.83]}  # base+centring → the base eval's model+centring
    assert row_intervals(rows[0]) == {}

    summary = {"settings": {"model": None, "pretrained": None, "data": None, "val": None, "steps": 6, "seed": 0,
                            "fit_overrides": {}, "max_zeroshot_drop": 0.05},
               "reference": "a0", "created": "now", "cmalign_version": "x", "seconds": 1.0, "compute_seconds": 60.0,
               "rows": rows, "recommendation": None, "r2": {}}
    write_sweep_report(tmp_path, summary)
    report = (tmp_path / "report.md").read_text()
    assert "### Over the alpha runs only (n = 3: a0, a0.1, a0.5)" in report
    assert "### Over every run, the base model and its post-hoc fixes (n = 5:" in report
    assert "## Gap reduction against the original model (base): base" in report
    assert "## Gap reduction against α = 0 (plain fine-tuning of equal length): a0" in report
    assert "| a0.5 | +70.0 % | +70.0 % |" in report  # raw and centroid (L2M) against base
    assert "0.3000 [0.2800, 0.3200]" in report and "0.8000 [0.7700, 0.8300]" in report
    assert "centroid (L2M)" in report and "0.986" in report
