"""`cmalign eval` end to end: through the CLI, on runs, exports and user data, as a user runs it."""

import csv
import json

import pytest
from typer.testing import CliRunner

from cmalign.cli.main import app
from cmalign.evaluation import EvalConfig, evaluate

runner = CliRunner()
SMALL = ["--max-images", "150", "--fit-images", "100", "--decoder-epochs", "2"]


def _invoke(args):
    r = runner.invoke(app, ["eval", *args])
    return r, r.output + (r.stderr if r.stderr_bytes is not None else "")


def test_eval_of_a_run_writes_metrics_report_and_figures(alignment_runs, tmp_path):
    run = alignment_runs[0.5].run_dir
    out = tmp_path / "report"
    r, text = _invoke([str(run), *SMALL, "--posthoc", "all", "--out", str(out)])
    assert r.exit_code == 0, text
    assert "CIDEr-D from images" in text and "report.md" in text

    m = json.loads((out / "metrics.json").read_text())
    assert m["kind"] == "cmalign-eval"
    # a run is compared with the model it started from; the fixes apply to that original model
    assert list(m["systems"]) == ["model", "baseline", "baseline+centring", "baseline+liang", "baseline+procrustes"]
    assert m["baseline"]["role"] == "the run's starting model"
    model = m["systems"]["model"]
    assert set(model) == {"gap", "retrieval", "mixed", "clustering", "zeroshot", "caption"}
    assert model["gap"]["n"] == 150 and model["retrieval"]["captions"] == 750
    assert 0 <= model["retrieval"]["i2t_R@1"] <= model["retrieval"]["i2t_R@5"] <= model["retrieval"]["i2t_R@10"] <= 1
    assert -0.5 <= model["clustering"]["kmeans_ari"] <= 1 and 0 <= model["clustering"]["hdbscan_noise_share"] <= 1
    assert model["caption"]["cider_d"] >= 0 and model["caption"]["examples"]
    # α = 0.5 closes the base model's gap: the comparison says so
    red = m["comparison"]["systems"]["model"]["gap_reduction"]
    assert m["comparison"]["reference"] == "baseline" and red["raw"] > 0.3 and red["centroid"] > 0.5
    # mean-centring the original closes its centroid gap (a fix fitted on training pairs, applied to new ones)
    assert m["systems"]["baseline+centring"]["gap"]["centroid"] < 0.2 * m["systems"]["baseline"]["gap"]["centroid"]
    assert "retrieval.i2t_R@k" in m["definitions"] and m["data"]["templates"]
    assert m["settings"]["seed"] == 0 and "tokenizer" in m["settings"]["caption_tokenizer"]

    report = (out / "report.md").read_text()
    for heading in ("## Summary", "## Gap decomposition", "## Caption-prefix quality", "## Definitions",
                    "Changes against **baseline**", "CIDEr scoring"):
        assert heading in report
    for fig in ("embedding_map.png", "gap_decomposition.png", "tasks_vs_gap.png"):
        assert (out / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({fig})" in report

    # an existing report is not overwritten by accident
    r, text = _invoke([str(run), *SMALL, "--out", str(out), "--tasks", "gap"])
    assert r.exit_code == 2 and "--overwrite" in text


def test_eval_is_deterministic_with_a_seed(alignment_runs, tmp_path):
    cfg = dict(source=str(alignment_runs[0.0].run_dir), baseline="none", tasks=("retrieval", "clustering", "caption"),
               max_images=80, fit_images=60, figures=False, overwrite=True)
    cfg_a = EvalConfig(**cfg, out=str(tmp_path / "a"))
    cfg_a.decoder.epochs = 1
    a = evaluate(cfg_a).metrics["systems"]
    cfg_b = EvalConfig(**cfg, out=str(tmp_path / "b"))
    cfg_b.decoder.epochs = 1
    b = evaluate(cfg_b).metrics["systems"]
    for sys_a, sys_b in ((a, b),):
        for task in ("retrieval", "clustering"):
            assert sys_a["model"][task] == sys_b["model"][task]
        for key in ("cider_d", "bleu4", "final_train_loss"):
            assert sys_a["model"]["caption"][key] == sys_b["model"]["caption"][key]


def test_alignment_shows_in_every_task_against_plain_fine_tuning(alignment_runs, tmp_path):
    """The issue's quality bar on the default data (short runs): α = 0.5 against its α = 0 baseline."""
    out = tmp_path / "q"
    cfg = EvalConfig(source=str(alignment_runs[0.5].run_dir), baseline=str(alignment_runs[0.0].run_dir),
                     tasks=("gap", "clustering", "caption"), fit_images=500, figures=False, out=str(out))
    m = evaluate(cfg).metrics
    aligned, plain = m["systems"]["model"], m["systems"]["baseline"]
    for measure in ("raw", "centroid", "mmd2"):
        assert aligned["gap"][measure] < plain["gap"][measure], measure
    assert aligned["clustering"]["kmeans_ari"] > plain["clustering"]["kmeans_ari"]
    assert aligned["caption"]["cider_d"] > plain["caption"]["cider_d"]


def test_eval_through_an_export_matches_torch(tiny_export, base_model_dir, tmp_path):
    common = ["--tasks", "gap,retrieval", "--max-images", "200", "--no-figures", "--baseline", "none", "-q"]
    r, text = _invoke([str(tiny_export.out), *common, "--out", str(tmp_path / "onnx")])
    assert r.exit_code == 0, text
    r, text = _invoke([str(base_model_dir), *common, "--out", str(tmp_path / "torch")])
    assert r.exit_code == 0, text
    onnx = json.loads((tmp_path / "onnx" / "metrics.json").read_text())
    torch_ = json.loads((tmp_path / "torch" / "metrics.json").read_text())
    assert onnx["model"]["kind"] == "onnx-export" and torch_["model"]["kind"] == "open_clip"
    for measure in ("raw", "centroid", "paired_residual", "rmg"):
        assert onnx["systems"]["model"]["gap"][measure] == pytest.approx(
            torch_["systems"]["model"]["gap"][measure], abs=1e-4)
    for key in ("i2t_R@1", "t2i_R@1", "i2t_R@10"):
        assert onnx["systems"]["model"]["retrieval"][key] == pytest.approx(
            torch_["systems"]["model"]["retrieval"][key], abs=0.01)
    r, text = _invoke([str(tiny_export.out), *common, "--variant", "int8", "--out", str(tmp_path / "int8")])
    assert r.exit_code == 0, text


def _unlabelled_csv(tmp_path, images=60):
    """The generated set written as a user CSV with one caption per image and no label column."""
    from cmalign.data.synth import write_synth

    written = write_synth(tmp_path / "synth", sizes={"val": images}, captions_per_image=1)
    rows = list(csv.DictReader(written["val"].open()))
    path = tmp_path / "synth" / "nolabel.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        w.writerows([r["filepath"], r["title"]] for r in rows)
    return path


def test_user_data_without_labels_degrades_gracefully(base_model_dir, tmp_path):
    data = _unlabelled_csv(tmp_path)
    out = tmp_path / "rep"
    r, text = _invoke([str(base_model_dir), "--data", str(data), "--decoder-epochs", "1", "--no-figures",
                       "--out", str(out)])
    assert r.exit_code == 0, text
    assert "skipped clustering" in text and "skipped zeroshot" in text
    m = json.loads((out / "metrics.json").read_text())
    model = m["systems"]["model"]
    assert set(model) == {"gap", "retrieval", "mixed", "caption"}
    assert set(m["skipped"]) == {"clustering", "zeroshot"}
    # no fit data given: half of the images fit the decoder, the other half are evaluated
    assert m["data"]["images"] + m["data"]["fit_images"] == 60 and m["data"]["captions"] == m["data"]["images"]
    assert any("no --fit-data" in n for n in m["notes"])
    assert model["retrieval"]["i2t_R@1"] > 0 and model["caption"]["images"] == m["data"]["images"]


def test_bad_input_gets_a_clear_error_and_keeps_an_old_report(base_model_dir, tmp_path):
    r, text = _invoke([str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no such directory" in text
    r, text = _invoke([str(tmp_path)])
    assert r.exit_code == 2 and "not a cmalign run" in text
    r, text = _invoke([str(base_model_dir), "--tasks", "gap,colour"])
    assert r.exit_code == 2 and "unknown task(s) colour" in text
    r, text = _invoke(["--model", "cmalign-tiny", str(base_model_dir)])
    assert r.exit_code == 2 and "not both" in text
    r, text = _invoke([str(base_model_dir), "--posthoc", "all", "--posthoc-on", "baseline", "--tasks", "gap",
                       "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "needs a baseline" in text
    templates = tmp_path / "t.txt"
    templates.write_text("a photo\n")
    r, text = _invoke([str(base_model_dir), "--templates", str(templates)])
    assert r.exit_code == 2 and "{}" in text

    out = tmp_path / "kept"
    out.mkdir()
    old_report = '{"kind": "cmalign-eval"}'
    (out / "metrics.json").write_text(old_report)
    r, text = _invoke([str(base_model_dir), "--data", str(tmp_path / "missing.csv"), "--out", str(out),
                       "--overwrite"])
    assert r.exit_code == 2 and "missing.csv" in text
    assert (out / "metrics.json").read_text() == old_report


def test_caption_task_with_a_local_language_model(base_model_dir, tmp_path):
    from helpers.tiny_lm import tiny_local_gpt2

    from cmalign.data.synth import synth_split

    captions = [r.caption for r in synth_split("train", n_images=40).records + synth_split("val").records]
    lm = tiny_local_gpt2(tmp_path / "gpt2", captions)
    out = tmp_path / "rep"
    r, text = _invoke([str(base_model_dir), "--tasks", "caption", "--caption-lm", str(lm), "--max-images", "30",
                       "--fit-images", "30", "--decoder-epochs", "1", "--no-figures", "--out", str(out)])
    assert r.exit_code == 0, text
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"]["caption_decoder"]["language_model"] == str(lm)
    from transformers import AutoTokenizer

    assert m["systems"]["model"]["caption"]["vocabulary"] == len(AutoTokenizer.from_pretrained(lm))


def test_user_data_with_labels_and_separate_fit_data(base_model_dir, tmp_path):
    from cmalign.data.synth import write_synth

    written = write_synth(tmp_path / "synth", sizes={"train": 30, "val": 40})
    out = tmp_path / "rep"
    r, text = _invoke([str(base_model_dir), "--data", str(written["val"]), "--fit-data", str(written["train"]),
                       "--decoder-epochs", "1", "--no-figures", "--posthoc", "procrustes", "--out", str(out)])
    assert r.exit_code == 0, text
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"]["images"] == 40 and m["data"]["captions"] == 200 and m["data"]["fit_images"] == 30
    assert m["data"]["templates"][0] == "a photo of a {}."  # CLIP-style prompts for user data
    assert len(m["data"]["classes"]) > 1 and not m["skipped"] and not m["notes"]
    for system in ("model", "model+procrustes"):
        assert {"clustering", "zeroshot"} <= set(m["systems"][system])
