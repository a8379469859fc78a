"""`cmalign sweep`: the frontier arithmetic on constructed cases, and a tiny sweep end to end (resume included)."""

import json
import math
import shutil
from types import SimpleNamespace

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


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A tiny sweep run as a user continues one: α = 0 alone (as if interrupted), then α = 0 and 0.5, then α = 0.5's
    model and eval are deleted (a run killed after its checkpoint, before its model) and the sweep is run again
    with the base model and --jobs 2."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    r, text = _invoke(["--alphas", "0", "--no-baselines", *TINY, "--out", str(out)])
    assert r.exit_code == 0, text
    a0_model = out / "runs" / "a0" / "model" / "open_clip_model.safetensors"
    a0_before = (a0_model.stat().st_mtime_ns, a0_model.read_bytes())
    r, text = _invoke(["--alphas", "0,0.5", "--no-baselines", *TINY, "--out", str(out)])
    assert r.exit_code == 0, text
    a05_log_before = (out / "runs" / "a0.5" / "metrics.jsonl").read_text().splitlines()
    shutil.rmtree(out / "runs" / "a0.5" / "model")
    shutil.rmtree(out / "evals" / "a0.5")
    r, text = _invoke(["--alphas", "0,0.5", *TINY, "--jobs", "2", "--out", str(out)])
    assert r.exit_code == 0, text
    return SimpleNamespace(out=out, text=" ".join(text.split()), summary=json.loads((out / "sweep.json").read_text()),
                           a0_before=a0_before, a05_log_before=a05_log_before)


def _row(summary, name):
    return next(r for r in summary["rows"] if r["name"] == name)


def _eval_model(out, name):
    """The 'model' system of a run's eval report (the base model's for 'base'; 'base+X' is that fix's)."""
    if name.startswith("base"):
        m = json.loads((out / "evals" / "base" / "metrics.json").read_text())["systems"]
        return m["model" if name == "base" else name.replace("base+", "model+")]
    return json.loads((out / "evals" / name / "metrics.json").read_text())["systems"]["model"]


def test_a_finished_run_and_its_eval_are_kept_when_the_sweep_continues(tiny_sweep):
    jobs = {j["name"]: j for j in tiny_sweep.summary["jobs"]}
    assert jobs["a0"]["fit"] == "kept" and jobs["a0"]["eval"] == "kept"
    model = tiny_sweep.out / "runs" / "a0" / "model" / "open_clip_model.safetensors"
    assert (model.stat().st_mtime_ns, model.read_bytes()) == tiny_sweep.a0_before


def test_a_run_killed_before_its_model_continues_from_its_last_checkpoint(tiny_sweep):
    out = tiny_sweep.out
    jobs = {j["name"]: j for j in tiny_sweep.summary["jobs"]}
    assert jobs["a0.5"]["fit"] == "resumed" and jobs["a0.5"]["eval"] == "evaluated"
    assert (out / "runs" / "a0.5" / "model" / "open_clip_model.safetensors").is_file()
    assert (out / "evals" / "a0.5" / "metrics.json").is_file()
    # steps 1-3 (up to the checkpoint at step 3) are the first fit's log lines, timings included, which a fit started
    # again from scratch would have rewritten; steps 4-6 were trained once more
    log = (out / "runs" / "a0.5" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log] == [1, 2, 3, 4, 5, 6]
    assert log[:3] == tiny_sweep.a05_log_before[:3]
    assert log[3:] != tiny_sweep.a05_log_before[3:]


def test_rows_are_the_alphas_then_the_base_model_and_its_posthoc_fixes(tiny_sweep):
    assert [row["name"] for row in tiny_sweep.summary["rows"]] == [
        "a0", "a0.5", "base", "base+centring", "base+liang", "base+procrustes", "base+grclip"]
    assert [row["kind"] for row in tiny_sweep.summary["rows"]] == ["alpha", "alpha", "base"] + ["posthoc"] * 4


def test_each_row_holds_its_own_eval_figures(tiny_sweep):
    for row in tiny_sweep.summary["rows"]:
        system = _eval_model(tiny_sweep.out, row["name"])
        for task, key in (("gap", "raw"), ("gap", "mmd2"), ("clustering", "kmeans_ari"), ("caption", "cider_d"),
                          ("zeroshot", "top1"), ("retrieval", "i2t_R@1")):
            assert row["metrics"][f"{task}.{key}"] == system[task][key], (row["name"], task, key)
        # and its 95 % intervals, each holding the figure
        lo, hi = row["ci"]["retrieval.i2t_R@1"]
        assert lo <= row["metrics"]["retrieval.i2t_R@1"] <= hi and hi > lo, row["name"]
    # R² over the α runs alone and over every row, each with its n
    pops = tiny_sweep.summary["r2_by_population"]
    assert pops["alpha_runs"]["rows"] == 2 and pops["all"]["rows"] == len(tiny_sweep.summary["rows"])


def test_changes_are_measured_against_the_alpha_0_run(tiny_sweep):
    s = tiny_sweep.summary
    assert s["reference"] == "a0"
    ref = _eval_model(tiny_sweep.out, "a0")
    for row in s["rows"]:
        m = _eval_model(tiny_sweep.out, row["name"])
        assert row["raw_gap_reduction"] == pytest.approx(1 - m["gap"]["raw"] / ref["gap"]["raw"], abs=1e-12)
        drop = (ref["zeroshot"]["top1"] - m["zeroshot"]["top1"]) / ref["zeroshot"]["top1"]
        assert row["zeroshot_drop"] == pytest.approx(drop, abs=1e-12), row["name"]
    assert _row(s, "a0")["raw_gap_reduction"] == 0


def test_stability_is_read_from_the_run_log(tiny_sweep):
    row = _row(tiny_sweep.summary, "a0.5")
    log = (tiny_sweep.out / "runs" / "a0.5" / "metrics.jsonl").read_text().splitlines()
    totals = [json.loads(x)["total"] for x in log]
    assert row["stability"]["steps"] == 6 and row["stability"]["non_finite"] == 0
    assert row["stability"]["max_loss"] == max(totals)
    assert row["stability"]["final_loss"] == pytest.approx(np.mean(totals), rel=1e-12)  # last 10 steps: all 6


def test_r2_table_is_the_squared_correlation_over_every_row(tiny_sweep):
    rows = tiny_sweep.summary["rows"]
    for gap in ("raw", "mmd2"):
        for metric in ("clustering.kmeans_ari", "retrieval.t2i_R@1"):
            x = [r["metrics"][f"gap.{gap}"] for r in rows]
            y = [r["metrics"][metric] for r in rows]
            cell = tiny_sweep.summary["r2"][gap][metric]
            assert cell["n"] == 7
            assert cell["r2"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, rel=1e-9), (gap, metric)


def test_the_recommendation_is_the_largest_gap_reduction_within_the_zero_shot_bound(tiny_sweep):
    s = tiny_sweep.summary
    eligible = [r for r in s["rows"] if r["kind"] == "alpha" and r["zeroshot_drop"] <= 0.05]
    best = max(eligible, key=lambda r: r["raw_gap_reduction"])  # α = 0 is always eligible: it is the reference
    rec = s["recommendation"]
    assert rec["name"] == best["name"] and rec["value"] == best["raw_gap_reduction"]
    assert rec["export_command"] == f"cmalign export {tiny_sweep.out / 'runs' / best['name']} --int8"
    assert f"recommended: alpha_target {best['alpha_target']:g}" in tiny_sweep.text


def test_compute_seconds_count_kept_runs_too(tiny_sweep):
    """a0 was kept (0 s in this invocation), yet the sweep's cost includes what its fit and eval took."""
    out = tiny_sweep.out

    def seconds(path):
        return json.loads(path.read_text())["seconds"]

    total = sum(seconds(out / "runs" / n / "manifest.json") + seconds(out / "evals" / n / "metrics.json")
                for n in ("a0", "a0.5")) + seconds(out / "evals" / "base" / "metrics.json")
    assert tiny_sweep.summary["compute_seconds"] == pytest.approx(total, abs=0.051)
    assert seconds(out / "runs" / "a0" / "manifest.json") > 0


def test_the_report_shows_the_rows_r2_and_recommendation_of_sweep_json(tiny_sweep):
    s = tiny_sweep.summary
    report = (tiny_sweep.out / "report.md").read_text()
    assert "| run | alpha_target | gap reduction |" in report
    for row in s["rows"]:
        assert f"| {row['name']} | " in report
        line = next(x for x in report.splitlines() if x.startswith(f"| {row['name']} | "))
        assert f"{100 * row['raw_gap_reduction']:+.1f} %" in line
    r2 = f"| {s['r2']['raw']['clustering.kmeans_ari']['r2']:.3f} |"  # R² over every row, raw gap against ARI
    assert any(x.startswith("| raw | ") and r2 in x for x in report.splitlines())
    assert s["recommendation"]["export_command"] in report
    assert "0.986" in report  # the paper's figure, for comparison
    for fig in ("pareto.png", "tradeoffs.png", "gap_vs_task.png"):
        assert (tiny_sweep.out / fig).read_bytes()[:4] == b"\x89PNG" and f"({fig})" in report


def test_each_run_is_an_ordinary_run_directory_that_export_takes(tiny_sweep, tmp_path):
    r = runner.invoke(app, ["export", str(tiny_sweep.out / "runs" / "a0.5"), "--out", str(tmp_path / "exp"),
                            "--retrieval-images", "0", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "exp" / "manifest.json").read_text())["kind"] == "cmalign-export"


def _tree(d):
    return sorted((str(p.relative_to(d)), p.stat().st_mtime_ns) for p in d.rglob("*"))


@pytest.mark.parametrize("change, named", [
    (["--steps", "7"], "steps"),
    (["--data", "{tmp}/train.csv", "--val", "{tmp}/val.csv"], "data"),
    (["--model", "cmalign-tiny", "--pretrained", "random"], "model"),
    (["--seed", "1"], "seed"),
    (["--set", "optim.lr=0.001"], "fit_overrides"),
])
def test_a_rerun_with_other_settings_is_refused_and_says_what_changed(tiny_sweep, tmp_path, change, named):
    (tmp_path / "train.csv").write_text("filepath,title\n")
    (tmp_path / "val.csv").write_text("filepath,title\n")
    before = _tree(tiny_sweep.out)
    args = [a.format(tmp=tmp_path) for a in change]
    # TINY with its --steps replaced by the change's own, if it has one
    r, text = _invoke(["--alphas", "0", *(TINY[2:] if "--steps" in args else TINY), *args,
                       "--out", str(tiny_sweep.out)])
    text = " ".join(text.split())
    assert r.exit_code == 2 and "holds a sweep with other settings" in text, text
    assert f"({named}: " in text or f", {named}: " in text, text
    assert _tree(tiny_sweep.out) == before


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


def test_overwrite_starts_a_sweep_with_other_settings_again(tiny_sweep, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(tiny_sweep.out, out, ignore=shutil.ignore_patterns("*.pt"))
    sets = TINY[2:-6]  # TINY's --set pairs; fewer steps and images than the sweep being replaced
    r, text = _invoke(["--alphas", "0", "--no-baselines", "--steps", "2", *sets, "--max-images", "20", "--fit-images",
                       "10", "--decoder-epochs", "1", "--overwrite", "--out", str(out)])
    assert r.exit_code == 0, text
    # nothing of the old sweep is left: its other runs, evals and figures are gone
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["a0"]
    assert sorted(p.name for p in (out / "evals").iterdir()) == ["a0"]
    assert json.loads((out / "runs" / "a0" / "manifest.json").read_text())["steps"] == 2
    assert [json.loads(x)["step"] for x in (out / "runs" / "a0" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "evals" / "a0" / "metrics.json").read_text())["data"]["images"] == 20
    s = json.loads((out / "sweep.json").read_text())
    assert s["settings"]["steps"] == 2 and [row["name"] for row in s["rows"]] == ["a0"]
    assert s["jobs"] == [{**s["jobs"][0], "name": "a0", "fit": "fitted", "eval": "evaluated"}]
    assert json.loads((out / "sweep_config.json").read_text())["identity"]["steps"] == 2
