"""`cmalign eval` with confidence intervals: a `ci` for every figure the evaluators return (or a stated reason),
paired intervals on the changes, ROUGE-L beside CIDEr-D and BLEU-4, and `--bootstrap 0` turning them off."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cmalign.cli.main import app
from cmalign.evaluation.captioning.scores import caption_scores, corpus_bleu
from cmalign.evaluation.captioning.tokenize import tokenize_caption

runner = CliRunner()
SMALL = ["--model", "cmalign-tiny", "--max-images", "60", "--fit-images", "40", "--decoder-epochs", "1",
         "--no-figures", "-q"]


# Figures whose interval may sit beside the estimate at 60 images: a resample repeats items, which inflates
# agreement (ARI, NMI); and the gap figures of estimated means and covariances get basic intervals, centred on the
# estimate less its noise bias.
BIASED = {("clustering", k) for k in ("kmeans_ari", "kmeans_nmi", "kmeans_modality_nmi", "hdbscan_ari",
                                       "hdbscan_nmi")} | {("gap", k) for k in ("centroid", "paired_residual", "mmd2",
                                                                              "bures", "coral", "w2")}


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def test_every_figure_has_an_interval_or_a_reason(base_model_dir, tmp_path):
    out = tmp_path / "ci"
    r = runner.invoke(app, ["eval", *SMALL, "--posthoc", "centring", "--bootstrap", "200", "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    boot = m["bootstrap"]
    assert boot["repetitions"] == 200 and boot["repetitions_slow"] == 200 and boot["level"] == 0.95
    assert set(m["ci"]) == set(m["systems"]) == {"model", "model+centring"}
    for system, tasks in m["systems"].items():
        assert set(m["ci"][system]) == set(tasks)
        for task, figures in tasks.items():
            assert "ci" not in figures  # the flat figures stay as they were
            for key, value in figures.items():
                ci = m["ci"][system][task].get(key)
                if ci is None:
                    assert f"{task}.{key}" in boot["without_ci"], f"{system} {task}.{key} has neither"
                    continue
                assert _numeric(value)
                lo, hi = ci
                assert lo <= hi, (task, key)
                if (task, key) not in BIASED:
                    assert lo - 1e-9 <= value <= hi + 1e-9 or hi - lo < 1e-9, (system, task, key, value, ci)
            for key in figures:
                if f"{task}.{key}" in boot["without_ci"]:
                    assert key not in m["ci"][system][task]
    cap = m["systems"]["model"]["caption"]
    assert 0 <= cap["rouge_l"] <= 1 and "rouge_l" in m["ci"]["model"]["caption"]
    assert "text_ceiling_rouge_l" in cap and "caption.rouge_l" in m["definitions"]
    # paired intervals of the changes against the reference
    comp = m["comparison"]["systems"]["model+centring"]
    lo, hi = comp["ci"]["gap_reduction.l2i_first"]
    assert lo <= comp["gap_reduction"]["l2i_first"] <= hi
    assert boot["basic"] == [f"gap.{k}" for k in ("centroid", "paired_residual", "mmd2", "bures", "coral", "w2")]
    assert "delta.caption.rouge_l" in comp["ci"] and "delta.zeroshot.top1" in comp["ci"]
    assert any(k.endswith(".bootstrap") for k in m["timings_seconds"])
    # the model against each fix: model − fix, whose paired interval mirrors the fix's against the model
    against = m["comparison"]["model_against_fixes"]["model+centring"]
    for key in ("zeroshot.top1", "retrieval.t2i_R@1", "clustering.kmeans_ari"):
        task, figure = key.split(".")
        assert against["delta"][key] == pytest.approx(
            m["systems"]["model"][task][figure] - m["systems"]["model+centring"][task][figure], abs=1e-12)
        lo, hi = comp["ci"][f"delta.{key}"]
        assert against["ci"][f"delta.{key}"] == pytest.approx([-hi, -lo], abs=1e-12)

    report = (out / "report.md").read_text()
    assert "## Confidence intervals" in report and "centroid gap (L2M)" in report
    assert "L2I (mean caption)" in report and "ROUGE-L from images" in report
    assert "The model against each post-hoc fix" in report and "| model+centring |" in report
    raw = m["systems"]["model"]["gap"]["raw"]
    lo, hi = m["ci"]["model"]["gap"]["raw"]
    assert f"{raw:.4f} [{lo:.4f}, {hi:.4f}]" in report


def test_bootstrap_zero_turns_intervals_off(base_model_dir, tmp_path):
    out = tmp_path / "none"
    r = runner.invoke(app, ["eval", *SMALL, "--tasks", "gap,retrieval", "--bootstrap", "0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["ci"] == {} and m["bootstrap"]["repetitions"] == 0
    assert "l2i_first" in m["systems"]["model"]["gap"]
    assert "## Confidence intervals" not in (out / "report.md").read_text()


def test_rouge_l_is_pycocoevalcaps_on_a_hand_made_case():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    hyp = {"a": "A red circle.", "b": "a red circle on black"}
    refs = {"a": ["a red circle on a black background", "one circle"], "b": ["a red square on black"]}
    s, each = caption_scores(hyp, refs, per_image=True)
    # by hand: pycocoevalcap takes the best precision and the best recall over the references separately.
    # a: "a red circle" against the 7-token reference, LCS 3 (P = 1, R = 3/7), and "one circle", LCS 1 (P = 1/3,
    # R = 1/2): P = 1, R = 1/2. b: LCS "a red on black", 4 of 5 tokens both ways: P = R = 0.8, F = 0.8.
    beta2 = 1.2**2
    f_a = (1 + beta2) * 1 * 0.5 / (0.5 + beta2 * 1)
    np.testing.assert_allclose(each["rouge_l"], [f_a, 0.8])
    assert s["rouge_l"] == pytest.approx((f_a + 0.8) / 2)
    gts = {k: [tokenize_caption(r) for r in v] for k, v in refs.items()}
    res = {k: [tokenize_caption(v)] for k, v in hyp.items()}
    assert s["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0])

    # corpus BLEU-4 rebuilt from the per-image counts is pycocoevalcap's, so resampled images get the same BLEU.
    # Images c and d pick their closest reference length (7), not the shortest (1): the brevity penalty applies.
    hyp.update(c="a blue square on white", d="a blue square on white")
    refs.update(c=["square", "a blue square on the white page"], d=["square", "a blue square on the white page"])
    s, each = caption_scores(hyp, refs, per_image=True)
    gts = {k: [tokenize_caption(r) for r in v] for k, v in refs.items()}
    res = {k: [tokenize_caption(v)] for k, v in hyp.items()}
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0][3]
    assert s["bleu4"] == pytest.approx(bleu) and corpus_bleu(each["bleu_counts"].sum(0)) == pytest.approx(bleu)
    twice = Bleu(4).compute_score({**gts, "a2": gts["a"]}, {**res, "a2": res["a"]}, verbose=0)[0][3]
    assert corpus_bleu(np.array([2.0, 1.0, 1.0, 1.0]) @ each["bleu_counts"]) == pytest.approx(twice)
