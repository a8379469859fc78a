"""`cmalign fit` and `cmalign data synth` through typer's CliRunner, on data a user writes by hand."""

import csv
import json
import math

import numpy as np
import open_clip
import pytest
import torch
from conftest import FAST_FIT
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from cmalign.cli.main import app

runner = CliRunner()
MIX = {"stripes": (200, 30, 30), "dots": (30, 30, 200), "plain": (30, 160, 30)}


def _user_images(root, n=40):
    """Pictures unlike the generated set: patterns in three classes, with the class in the caption."""
    rows = []
    for i in range(n):
        label = list(MIX)[i % 3]
        img = Image.new("RGB", (48, 40), (230, 230, 230))
        d = ImageDraw.Draw(img)
        if label == "stripes":
            for x in range(0, 48, 6):
                d.rectangle([x, 0, x + 2, 40], fill=MIX[label])
        elif label == "dots":
            for k in range(6):
                d.ellipse([5 + 6 * k, 5 + 4 * (i % 5), 9 + 6 * k, 9 + 4 * (i % 5)], fill=MIX[label])
        else:
            d.rectangle([4, 4, 44, 36], fill=tuple(int(c * (0.5 + (i % 4) / 8)) for c in MIX[label]))
        name = f"img_{i:03d}.jpg"
        img.save(root / name)
        rows.append((name, f"photo {i} with {label}, shade {i % 4}", label))
    return rows


def _fit(tmp_path, *args):
    return runner.invoke(app, ["fit", *FAST_FIT, "--steps", "3", "--out", str(tmp_path / "run"), *args])


def test_fit_user_csv_with_labels_loads_in_open_clip(tmp_path):
    rows = _user_images(tmp_path)
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title", "label"])
        w.writerows(rows)
    res = _fit(tmp_path, "--data", str(tmp_path / "train.csv"), "--set", "data.val_fraction=0.25")
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["zeroshot_top1"] is not None  # labels reached the guard evaluation
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["train"].endswith("train.csv") and manifest["steps"] == 3

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run / 'model'}")
    tok = open_clip.get_tokenizer(f"local-dir:{run / 'model'}")
    with torch.no_grad():
        e = model.encode_image(preprocess(Image.open(tmp_path / rows[0][0])).unsqueeze(0), normalize=True)
        t = model.encode_text(tok(["photo"]), normalize=True)
    assert e.shape == t.shape == (1, 128)
    rows_log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_log if r["kind"] == "train"] == [1, 2, 3]
    for key in ("clip", "cma", "alpha", "alpha_eff", "lr", "lr_scale", "grad_cos", "phase"):
        assert key in rows_log[-1]


def test_fit_user_jsonl(tmp_path):
    rows = _user_images(tmp_path)
    with open(tmp_path / "train.jsonl", "w") as f:
        for name, cap, label in rows:
            f.write(json.dumps({"image": name, "caption": cap, "label": label}) + "\n")
    res = _fit(tmp_path, "--data", str(tmp_path / "train.jsonl"), "--set", "data.val_fraction=0.25")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "model" / "open_clip_model.safetensors").exists()


def test_schema_error_names_file_row_field_and_writes_nothing(tmp_path):
    (tmp_path / "bad.csv").write_text("filepath,caption\na.jpg,hello\n")
    res = _fit(tmp_path, "--data", str(tmp_path / "bad.csv"))
    assert res.exit_code == 2
    out = " ".join(res.output.split())
    assert "bad.csv" in out and "row 1" in out and "'title'" in out
    assert not (tmp_path / "run").exists()


def test_bad_samples_are_skipped_and_listed(tmp_path):
    rows = _user_images(tmp_path)
    (tmp_path / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    rows += [("missing.jpg", "a caption", "dots"), (rows[0][0], "   ", "dots"), ("corrupt.jpg", "broken", "dots")]
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title", "label"])
        w.writerows(rows)
    res = _fit(tmp_path, "--data", str(tmp_path / "train.csv"), "--val", str(tmp_path / "train.csv"),
               "--steps", "6")
    assert res.exit_code == 0, res.output
    bad = [json.loads(x) for x in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    fields = {(b["field"], b["source"].rsplit(":", 1)[-1]) for b in bad}
    assert ("image", "42") in fields  # missing.jpg: CSV row 42 (header is row 1, 40 good rows)
    assert ("caption", "43") in fields  # whitespace caption
    assert any(b["field"] == "image" and "corrupt.jpg" in b["reason"] for b in bad)  # found while training
    assert len({b["source"] for b in bad}) == len(bad)  # listed once, though seen every epoch


def test_on_bad_sample_fail_stops_with_the_source(tmp_path):
    rows = _user_images(tmp_path) + [("missing.jpg", "a caption", "dots")]
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title", "label"])
        w.writerows(rows)
    res = _fit(tmp_path, "--data", str(tmp_path / "train.csv"), "--on-bad-sample", "fail")
    assert res.exit_code == 2
    assert "train.csv:42" in res.output and "missing.jpg" in res.output
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("trainable,frozen_prefix", [("image", "transformer."), ("text", "visual."),
                                                      ("projections", "visual.transformer")])
def test_trainable_choice_freezes_the_rest(tmp_path, trainable, frozen_prefix):
    from cmalign.model.loading import load_model, select_trainable

    torch.manual_seed(0)  # fit seeds with train.seed (0) right before building the model
    lm = load_model("cmalign-tiny", None)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    res = _fit(tmp_path, "--trainable", trainable, "--pretrained", "random", "--lr", "1e-2")
    assert res.exit_code == 0, res.output
    fitted, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'run' / 'model'}")
    after = dict(fitted.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in before if n.startswith(frozen_prefix))
    assert any(not torch.equal(after[n], before[n]) for n in before)
    counts = select_trainable(lm.model, "last:1")
    assert 0 < counts["trainable"] < counts["total"]


def test_unknown_model_and_bad_option_values(tmp_path):
    res = _fit(tmp_path, "--model", "no-such-model")
    assert res.exit_code == 2 and "unknown open_clip model 'no-such-model'" in " ".join(res.output.split())
    assert not (tmp_path / "run").exists()  # a fit whose set-up fails leaves no config.toml (nor run directory)
    res = _fit(tmp_path, "--pretrained", str(tmp_path / "missing.pt"))
    assert res.exit_code == 2 and "missing.pt" in res.output and not (tmp_path / "run").exists()
    res = _fit(tmp_path, "--distribution", "kl")
    assert res.exit_code == 2 and "distribution term must be one of" in " ".join(res.output.split())
    res = _fit(tmp_path, "--set", "train.nonsense=1")
    assert res.exit_code == 2 and "unknown config key 'train.nonsense'" in " ".join(res.output.split())


def test_toml_config_and_overrides_are_saved(tmp_path):
    (tmp_path / "cfg.toml").write_text("alpha_target = 0.05\n[curriculum]\nramp = \"cosine\"\n")
    res = _fit(tmp_path, "--config", str(tmp_path / "cfg.toml"), "--lambda-centroid", "2")
    assert res.exit_code == 0, res.output
    saved = (tmp_path / "run" / "config.toml").read_text()
    assert "alpha_target = 0.05" in saved and 'ramp = "cosine"' in saved and "lambda_centroid = 2.0" in saved


def test_help_explains_every_option():
    res = runner.invoke(app, ["fit", "--help"])
    assert res.exit_code == 0
    text_out = " ".join(res.output.replace("│", " ").split())  # undo rich's box and wrapping
    for text in ("--alpha-target", "(default: 0.5)", "--resume", "last:N", "--on-bad-sample", "(default: 300)"):
        assert text in text_out, text
    assert runner.invoke(app, ["--help"]).exit_code == 0
    assert runner.invoke(app, ["data", "synth", "--help"]).exit_code == 0


def test_data_synth_writes_open_clip_csvs(tmp_path):
    res = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "d"), "--train-images", "4",
                              "--val-images", "2", "--test-images", "2", "--captions-per-image", "3"])
    assert res.exit_code == 0, res.output
    with open(tmp_path / "d" / "train.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and set(rows[0]) == {"filepath", "title", "label"}
    img = Image.open(tmp_path / "d" / rows[0]["filepath"])
    assert img.size == (64, 64) and np.asarray(img).std() > 0


def test_grad_checkpointing_gives_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    for name, extra in (("plain", []), ("ckpt", ["--grad-checkpointing"])):
        res = runner.invoke(app, ["fit", *FAST_FIT, "--steps", "2", "--out", str(tmp_path / name), *extra])
        assert res.exit_code == 0, res.output
    a = load_file(tmp_path / "plain" / "model" / "open_clip_model.safetensors")
    b = load_file(tmp_path / "ckpt" / "model" / "open_clip_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_gradient_accumulation_runs_and_logs_each_optimizer_step(tmp_path):
    res = _fit(tmp_path, "--accum-steps", "2", "--batch-size", "8")
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["total"]) and r["lr"] > 0 for r in rows)


def test_an_accumulated_step_uses_the_mean_gradient_of_its_micro_batches(tmp_path):
    """--accum-steps 2: the step's gradient is the mean of the two micro-batches' gradients (each micro-batch its own
    contrastive batch, docs/limits.md). Measured again from the same start, one micro-batch at a time: the logged
    gradient norm and the updated weights match (measured: the norm to 3e-8 relative, the weights bit for bit, where
    dropping the first micro-batch moves them by 2e-5 and summing the two by 2e-6, in a step of 1e-5)."""
    from rich.console import Console
    from safetensors.torch import load_file

    from cmalign.objective.curriculum import alpha_at
    from cmalign.train.config import load_config
    from cmalign.train.optimizer import lr_at, step_optimizer
    from cmalign.train.setup import set_up

    res = _fit(tmp_path, "--accum-steps", "2", "--batch-size", "8", "--steps", "1", "--set", "optim.grad_clip=0")
    assert res.exit_code == 0, res.output
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])

    # the same run set up again (its saved config): the same initial model, optimizer state and batches
    cfg = load_config(tmp_path / "run" / "config.toml", {"train.out": str(tmp_path / "again")})
    r = set_up(cfg, False, Console(quiet=True))
    params = [p for p in r.model.parameters() if p.requires_grad]
    alpha, _ = alpha_at(0, cfg.train.steps, cfg.alpha_target, cfg.curriculum)
    batches, grads, scales = iter(r.loader), [], []
    r.model.train()
    for _ in range(2):
        images, tokens, _ = next(batches)
        _, decision = r.step_fn(images, tokens, alpha, r.autocast, r.scaler)
        grads.append([p.grad.clone() for p in params])
        scales.append(decision.lr_scale)
        r.optimizer.zero_grad(set_to_none=True)
    mean = [(a + b) / 2 for a, b in zip(*grads, strict=True)]
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in mean))  # float64: 7M entries
    assert logged["grad_norm"] == pytest.approx(norm, rel=1e-6)

    for p, g in zip(params, mean, strict=True):
        p.grad = g
    step_optimizer(r.model, r.optimizer, r.scaler, lr_at(0, cfg) * min(scales))
    fitted = load_file(tmp_path / "run" / "model" / "open_clip_model.safetensors")
    for name, p in r.model.state_dict().items():
        torch.testing.assert_close(fitted[name], p, rtol=0, atol=1e-8, msg=name)


def test_a_non_finite_gradient_stops_the_fit_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A finite loss whose gradient is not (an inf in one gradient entry at step 5): the fit stops before the optimizer
    applies it, names the step and the last checkpoint, keeps that checkpoint and writes no model."""
    from cmalign.objective.step import TPCCMAStep

    real = TPCCMAStep.__call__
    calls = {"n": 0}

    def inf_gradient(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:  # the 5th training step (one micro-batch per step)
            next(p for p in self.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(TPCCMAStep, "__call__", inf_gradient)
    # a fixed warm-up: α (and so the poisoned term) acts from step 3, settled loss or not
    res = _fit(tmp_path, "--steps", "10", "--checkpoint-every", "4", "--set", "curriculum.settle_tolerance=0")
    assert res.exit_code == 2
    msg = " ".join(res.output.split())
    assert "error: step 5: gradient norm is inf. Stopped; last good checkpoint:" in msg
    assert "step_00000004.pt" in msg and "Traceback" not in msg
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004.pt"]
    state = torch.load(run / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not (run / "model").exists() and not (run / "manifest.json").exists()  # not a finished run
    assert set(json.loads((run / "summary.json").read_text())) == {"before"}  # no "after" figures


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    from cmalign.objective.cma_loss import CMALoss

    real = CMALoss.alignment_terms
    calls = {"n": 0}

    def poisoned(self, fi, ft):
        calls["n"] += 1
        out = real(self, fi, ft)
        if calls["n"] == 6:  # the 6th training step
            out["cma"] = out["cma"] * float("nan")
        return out

    monkeypatch.setattr(CMALoss, "alignment_terms", poisoned)
    # a fixed warm-up: α (and so the poisoned term) acts from step 3, settled loss or not
    res = _fit(tmp_path, "--steps", "10", "--checkpoint-every", "4", "--set", "curriculum.settle_tolerance=0")
    assert res.exit_code == 2
    msg = " ".join(res.output.split())
    assert "step 6" in msg and "nan" in msg.lower() and "step_00000004.pt" in msg  # steps count from 1, as logged
    assert (tmp_path / "run" / "checkpoints" / "step_00000004.pt").exists()
    assert not (tmp_path / "run" / "model").exists()  # no model from a diverged run


def test_plain_progress_says_at_which_step_the_guard_figures_were_measured(tmp_path):
    """Without a terminal fit prints plain lines; guard figures (measured every --guard-every steps) carry their step,
    so a line between two evaluations does not pass old figures off as the current model's."""
    import re

    args = [a for a in FAST_FIT if a != "--quiet"]  # progress on; CliRunner's console is not a terminal
    res = runner.invoke(app, ["fit", *args, "--steps", "6", "--guard-every", "2", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    lines = dict(re.findall(r"step (\d)/6 (.*?)(?= step \d/6 |validation|$)", text))
    assert sorted(lines) == ["1", "2", "3", "4", "5", "6"], text
    assert "R@1" not in lines["1"]  # nothing measured yet
    found = {s: re.search(r"R@1 \S+ gap \S+ @step (\d)", lines[s]) for s in "23456"}
    assert all(found.values()), lines
    assert {s: m.group(1) for s, m in found.items()} == {"2": "2", "3": "2", "4": "4", "5": "4", "6": "4"}
    guards = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "guard"]
    assert guards == [2, 4]



def test_a_fixed_logit_scale_above_clips_ceiling_is_kept(tmp_path):
    """Once clamped back to CLIP's 100 after the first step, silently; the ceiling bounds a learnable scale only."""
    result = _fit(tmp_path, "--set", "model.fixed_logit_scale=200")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scales = [r["logit_scale"] for r in rows if "logit_scale" in r]
    assert len(scales) == 3 and all(math.isclose(s, 200, rel_tol=1e-5) for s in scales), scales


def test_the_learnable_logit_scale_is_clamped_at_the_configured_ceiling():
    from cmalign.train.optimizer import step_optimizer

    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.tensor(math.log(120.0)))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step_optimizer(model, opt, None, lr=0.0, max_logit_scale=150.0)
    assert math.isclose(model.logit_scale.exp().item(), 120.0, rel_tol=1e-6)
    step_optimizer(model, opt, None, lr=0.0)  # CLIP's 100 by default
    assert math.isclose(model.logit_scale.exp().item(), 100.0, rel_tol=1e-6)
