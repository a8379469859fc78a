"""`cmalign sweep`: the frontier arithmetic on constructed cases, and a tiny sweep end to end (resume included)."""

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from cmalign.cli.main import app
from cmalign.sweep.analysis import pareto_front, r2_table, r_squared, recommend

runner = CliRunner()
TINY = ["--steps", "6", "--set", "train.batch_size=16", "--set", "data.synth_train_images=64",
        "--set", "data.val_max_images=16", "--set", "train.guard_every=0", "--set", "data.num_workers=0",
        "--set", "train.checkpoint_every=3", "--max-images", "40", "--fit-images", "30", "--decoder-epochs", "1"]


def _invoke(args):
    r = runner.invoke(app, ["sweep", *args])
    return r, r.output + (r.stderr if r.stderr_bytes is not None else "")


def test_r_squared_on_constructed_cases():
    exact = r_squared([0, 1, 2, 3], [1, 3, 5, 7])
    assert exact["r2"] == pytest.approx(1.0) and exact["slope"] == pytest.approx(2.0)
    assert exact["intercept"] == pytest.approx(1.0)
    # x = 1, 2, 3 and y = 1, 3, 2: Pearson r = 0.5 by hand, so R² = 0.25
    assert r_squared([1, 2, 3], [1, 3, 2])["r2"] == pytest.approx(0.25)
    assert math.isnan(r_squared([1, 2], [3, 4])["r2"])  # two points always fit: not a measurement
    assert math.isnan(r_squared([1, 1, 1], [1, 2, 3])["r2"])
    rows = [{"metrics": {"gap.raw": x, "gap.mmd2": x ** 2, "clustering.kmeans_ari": 1 - x}} for x in (0.1, 0.5, 0.9)]
    rows.append({"metrics": {"gap.raw": 0.3}})  # a row without the task metric is left out of that cell
    table = r2_table(rows, gaps=("raw", "mmd2"), metrics=(("clustering.kmeans_ari", "ARI"),))
    assert table["raw"]["clustering.kmeans_ari"]["r2"] == pytest.approx(1.0)
    assert table["raw"]["clustering.kmeans_ari"]["n"] == 3
    assert table["mmd2"]["clustering.kmeans_ari"]["r2"] < 1.0


def test_pareto_front_and_recommendation():
    pts = [(0.20, 0.1), (0.25, 0.0), (0.18, 0.7), (0.17, 0.6), (0.22, 0.5)]
    assert pareto_front(pts) == [2, 4, 1]  # (0.17, 0.6) is beaten by (0.18, 0.7), (0.20, 0.1) by (0.22, 0.5)
    rows = [{"kind": "alpha", "name": f"a{a}", "alpha_target": a, "run_dir": f"r/{a}", "zeroshot_drop": d,
             "raw_gap_reduction": g, "metrics": {"clustering.kmeans_ari": ari}}
            for a, d, g, ari in ((0.0, 0.0, 0.0, 0.1), (0.05, 0.03, 0.5, 0.3), (0.5, 0.08, 0.8, 0.4))]
    rows.append({"kind": "posthoc", "name": "base+procrustes", "zeroshot_drop": 0.0, "raw_gap_reduction": 0.9})
    best = recommend(rows, max_zeroshot_drop=0.05)
    assert best["alpha_target"] == 0.05 and best["by"] == "raw_gap_reduction"  # 0.5 costs too much; fixes never
    assert recommend(rows, max_zeroshot_drop=0.1, select="ari")["alpha_target"] == 0.5
    assert recommend(rows, max_zeroshot_drop=-0.01) is None
    with pytest.raises(ValueError, match="select"):
        recommend(rows, 0.05, select="speed")


def test_tiny_sweep_end_to_end_and_resume(tmp_path):
    out = tmp_path / "sweep"
    # the first invocation stops after α = 0 (as if interrupted), without the base model
    r, text = _invoke(["--alphas", "0", "--no-baselines", *TINY, "--out", str(out)])
    assert r.exit_code == 0, text
    first_model = (out / "runs" / "a0" / "model" / "open_clip_model.safetensors").stat().st_mtime_ns

    # a run killed before writing its model continues from its checkpoint
    r, text = _invoke(["--alphas", "0,0.5", "--no-baselines", *TINY, "--out", str(out)])
    assert r.exit_code == 0, text
    import shutil

    shutil.rmtree(out / "runs" / "a0.5" / "model")
    shutil.rmtree(out / "evals" / "a0.5")

    r, text = _invoke(["--alphas", "0,0.5", *TINY, "--jobs", "2", "--out", str(out)])
    assert r.exit_code == 0, text
    s = json.loads((out / "sweep.json").read_text())
    jobs = {j["name"]: j for j in s["jobs"]}
    assert jobs["a0"]["fit"] == "kept" and jobs["a0"]["eval"] == "kept"
    assert jobs["a0.5"]["fit"] == "resumed" and jobs["a0.5"]["eval"] == "evaluated"
    assert (out / "runs" / "a0" / "model" / "open_clip_model.safetensors").stat().st_mtime_ns == first_model

    names = [row["name"] for row in s["rows"]]
    assert names == ["a0", "a0.5", "base", "base+centring", "base+liang", "base+procrustes"]
    assert s["reference"] == "a0"
    assert s["compute_seconds"] > sum(j.get("fit_seconds", 0) for j in s["jobs"])  # kept runs still count
    a05 = s["rows"][1]
    assert {"gap.raw", "gap.mmd2", "clustering.kmeans_ari", "caption.cider_d", "zeroshot.top1"} <= set(a05["metrics"])
    assert a05["stability"]["steps"] == 6 and a05["stability"]["non_finite"] == 0
    assert np.isfinite(s["r2"]["raw"]["clustering.kmeans_ari"]["r2"])
    assert s["r2"]["mmd2"]["caption.cider_d"]["n"] == 6
    rec = s["recommendation"]
    assert rec is None or rec["export_command"].startswith("cmalign export ")
    report = (out / "report.md").read_text()
    assert "| run | alpha_target | gap reduction |" in report and "0.986" in report
    for fig in ("pareto.png", "tradeoffs.png", "gap_vs_task.png"):
        assert (out / fig).read_bytes()[:4] == b"\x89PNG"
    assert "recommended" in text or "no alpha" in text

    # each run is an ordinary run directory that `cmalign export` takes
    r = runner.invoke(app, ["export", str(out / "runs" / "a0.5"), "--out", str(tmp_path / "exp"),
                            "--retrieval-images", "0", "-q"])
    assert r.exit_code == 0, r.output

    # other settings in the same directory are refused, with what changed
    r, text = _invoke(["--alphas", "0", *TINY[2:], "--steps", "7", "--out", str(out)])
    assert r.exit_code == 2 and "other settings" in text and "steps" in text


def test_sweep_refuses_bad_settings(tmp_path):
    r, text = _invoke(["--data", str(tmp_path / "train.csv"), "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "needs --val" in text
    r, text = _invoke(["--set", "train.nonsense=1", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "nonsense" in text
    r, text = _invoke(["--alphas", "0,x", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "comma list" in text
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    r, text = _invoke(["--out", str(tmp_path / "busy")])
    assert r.exit_code == 2 and "not a sweep" in text
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_overwrite_restarts_a_sweep_but_never_deletes_a_directory_that_is_not_one(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    r = CliRunner().invoke(app, ["sweep", "--alphas", "0", "--steps", "2", "--out", str(photos), "--overwrite"])
    assert r.exit_code == 2 and "is not a sweep" in r.output
    assert (photos / "holiday.jpg").read_bytes() == b"precious"
