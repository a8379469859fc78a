"""Regression tests for defects found in review: fp16 GradScaler path, Bures gradients on rank-deficient
batches, unsupported model families, file permissions, bad-sample rows after a resume."""

import json
import os
from contextlib import nullcontext

import pytest
import torch

from cmalign.artifacts.atomic import atomic_write
from cmalign.model.loading import load_model
from cmalign.objective.cma_loss import CMAConfig, CMALoss
from cmalign.objective.grad_scheduler import GradScheduler, GradSchedulerConfig
from cmalign.train.loop import RunDir, TPCCMAStep, _check_supported


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    lm = load_model("cmalign-tiny", None)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = lm.tokenizer([f"a red square number {i}" for i in range(8)])
    return lm.model, images, tokens


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["project", "off"])
def test_grad_scaler_path_runs_and_unscales_to_the_same_gradients(tiny, mode):
    model, images, tokens = tiny
    step = TPCCMAStep(model, CMALoss(), GradScheduler(GradSchedulerConfig(mode=mode)))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model.zero_grad(set_to_none=True)
    step(images, tokens, 0.5, nullcontext)
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    step(images, tokens, 0.5, nullcontext, scaler)
    scaler.unscale_(opt)  # raised "Attempted unscale_ but _scale is None" before the fix
    got = _grads(model)
    for n, g in ref.items():
        assert float((got[n] - g).norm() / g.norm().clamp_min(1e-12)) < 1e-5, n
    scaler.step(opt)
    scaler.update()


def test_bures_term_has_finite_gradients_when_batch_is_smaller_than_dim():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(16, 128, generator=g), dim=-1).requires_grad_(True)
    y = torch.nn.functional.normalize(torch.randn(16, 128, generator=g) + 0.3, dim=-1).requires_grad_(True)
    out = CMALoss(CMAConfig(distribution="bures"))(x, y, torch.tensor(100.0), alpha=0.5)
    out["total"].backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    assert out["distribution"].item() > 0


def test_alpha_zero_keeps_the_alignment_term_out_of_the_gradient():
    x = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1).requires_grad_(True)
    y = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1).requires_grad_(True)
    loss = CMALoss()
    out = loss(x, y, torch.tensor(100.0), alpha=0.0)
    assert torch.equal(out["total"], out["clip"])


def test_sigmoid_and_coca_models_are_refused(tiny):
    model = tiny[0]
    _check_supported(model, "cmalign-tiny")  # plain CLIP is fine
    model.logit_bias = torch.nn.Parameter(torch.zeros(1))
    try:
        with pytest.raises(ValueError, match="SigLIP"):
            _check_supported(model, "some-siglip")
    finally:
        model.logit_bias = None


def test_atomic_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "f.json") as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644


def test_resume_lists_each_bad_sample_once(tmp_path):
    from cmalign.train.loop import _write_bad

    run = RunDir(tmp_path)
    rows = [{"source": s, "field": "image", "reason": "x"} for s in ("a.csv:2", "a.csv:3", "a.csv:9", "a.csv:2")]
    # a kill -9 can tear the last line mid-write
    run.bad.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"source": "a.csv:1')
    seen = run.listed_bad(0)
    assert seen == {"a.csv:2", "a.csv:3", "a.csv:9"}
    assert _write_bad(run.bad, [{"source": "a.csv:3", "field": "image", "reason": "x"},
                                {"source": "a.csv:10", "field": "image", "reason": "x"}], seen) == 1
    listed = [json.loads(x)["source"] for x in run.bad.read_text().splitlines()]
    assert listed == ["a.csv:2", "a.csv:3", "a.csv:9", "a.csv:10"]
    assert run.bad_file(1).name == "bad_samples.rank1.jsonl"
    assert run.listed_bad(1) == set()
