"""The TPC-CMA step (cmalign.objective.step) on a real tiny open_clip model: its gradients equal a plain backward
of L_clip + α_eff·L_cma wherever the scheduler leaves them alone, and differ exactly as it says where it acts."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch

from cmalign.objective.grad_scheduler import GradScheduler, GradSchedulerConfig
from cmalign.objective.step import TPCCMAStep

CAPTIONS = ["a red circle", "a blue square on gray", "two green stars", "a large pink ring",
            "an orange cross", "a small purple diamond", "three cyan hexagons", "a yellow triangle"]


@pytest.fixture(scope="module")
def tiny():
    from cmalign.model.loading import load_model

    torch.manual_seed(0)
    lm = load_model("cmalign-tiny", None)
    lm.model.eval()  # deterministic forward for comparing gradients between passes
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = lm.tokenizer(CAPTIONS)
    return lm.model, images, tokens


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _plain_grads(model, images, tokens, loss_fn, alpha: float) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    fi, ft, ls = model(images, tokens)[:3]
    out = loss_fn(fi, ft, ls, alpha)
    (out["clip"] + alpha * out["cma"]).backward()
    g = _grads(model)
    model.zero_grad(set_to_none=True)
    return g


def _step_grads(model, images, tokens, loss_fn, sched, alpha: float, grad_div: float = 1.0):
    model.zero_grad(set_to_none=True)
    row, d = TPCCMAStep(model, loss_fn, sched)(images, tokens, alpha, nullcontext, None, grad_div=grad_div)
    g = _grads(model)
    model.zero_grad(set_to_none=True)
    return row, d, g


def _assert_same_grads(a: dict, b: dict, rel: float = 1e-5) -> None:
    """Equal up to float summation order: |a − b| small relative to |b|, per parameter tensor.

    (Element-wise allclose is the wrong test here: entries that nearly cancel carry absolute noise of
    the order of the tensor's largest entries × 1e-7, whatever their own size.)
    """
    assert set(a) == set(b) and len(a) > 10
    for n, g in a.items():
        err = float((g - b[n]).norm() / b[n].norm().clamp_min(1e-12))
        assert err < rel, f"{n}: relative difference {err:.2e}"


def test_step_with_scheduler_off_matches_plain_backward(tiny) -> None:
    from cmalign.objective.cma_loss import CMALoss

    model, images, tokens = tiny
    loss_fn = CMALoss()
    ref = _plain_grads(model, images, tokens, loss_fn, 0.5)
    sched = GradScheduler(GradSchedulerConfig(mode="off"))
    row, d, got = _step_grads(model, images, tokens, loss_fn, sched, 0.5)
    _assert_same_grads(got, ref)
    assert set(row) == {"clip", "centroid2", "distribution", "paired2", "cma", "total"}
    assert row["total"] == pytest.approx(row["clip"] + 0.5 * row["cma"])
    assert d.alpha_eff == 0.5 and not d.projected and not d.capped
    assert sched.steps_seen == 0  # "off" measures nothing
    assert d.cos is None or math.isnan(d.cos)
    assert all(math.isfinite(v) for v in row.values())


@pytest.mark.parametrize("mode", ["project", "lr"])
def test_step_without_projection_or_cap_matches_plain_backward(tiny, mode: str) -> None:
    from cmalign.objective.cma_loss import CMALoss

    model, images, tokens = tiny
    loss_fn = _cma_loss_with_cos(tiny, positive=True) if mode == "project" else CMALoss()
    ref = _plain_grads(model, images, tokens, loss_fn, 0.5)
    sched = GradScheduler(GradSchedulerConfig(mode=mode, max_ratio=1e9))
    row, d, got = _step_grads(model, images, tokens, loss_fn, sched, 0.5)
    # this batch's gradients agree (cos > 0); were they to conflict, "lr" would still not touch them
    if mode == "project":
        assert d.cos > 0
    assert not d.projected and not d.capped and d.alpha_eff == 0.5
    assert sched.steps_seen == 1
    _assert_same_grads(got, ref)
    assert set(row) == {"clip", "centroid2", "distribution", "paired2", "cma", "total"}
    assert row["total"] == pytest.approx(row["clip"] + 0.5 * row["cma"])


def test_step_with_cap_equals_plain_backward_at_the_capped_alpha(tiny) -> None:
    from cmalign.objective.cma_loss import CMALoss

    model, images, tokens = tiny
    loss_fn = CMALoss()
    sched = GradScheduler(GradSchedulerConfig(mode="lr", max_ratio=0.01))
    row, d, got = _step_grads(model, images, tokens, loss_fn, sched, 0.5)
    assert d.capped and 0 < d.alpha_eff < 0.5
    assert d.alpha_eff / d.alpha == pytest.approx(0.01 / d.ratio)
    ref = _plain_grads(model, images, tokens, loss_fn, d.alpha_eff)
    _assert_same_grads(got, ref)
    assert row["total"] == pytest.approx(row["clip"] + d.alpha_eff * row["cma"])


def test_step_grad_div_divides_gradients(tiny) -> None:
    from cmalign.objective.cma_loss import CMALoss

    model, images, tokens = tiny
    loss_fn = CMALoss()
    sched = GradScheduler(GradSchedulerConfig(mode="project", max_ratio=1e9))
    _, _, full = _step_grads(model, images, tokens, loss_fn, sched, 0.5)
    _, _, half = _step_grads(model, images, tokens, loss_fn, sched, 0.5, grad_div=2.0)
    _assert_same_grads({n: g / 2 for n, g in full.items()}, half)


class _SignedCMALoss(torch.nn.Module):
    """CMALoss with the alignment term multiplied by ``sign``: ±1 picks whether its feature gradient agrees with the
    contrastive one on the test batch (which way a given batch leans is a fact of that batch, not of the step)."""

    def __init__(self, sign: float):
        super().__init__()
        from cmalign.objective.cma_loss import CMAConfig, CMALoss

        self.inner, self.sign = CMALoss(CMAConfig(scale_by_logit_scale=False)), sign

    def forward(self, fi, ft, ls, alpha: float = 0.0):
        out = self.inner(fi, ft, ls, 0.0)
        out["cma"] = self.sign * out["cma"]
        out["total"] = out["clip"] + alpha * out["cma"]
        return out


def _cma_loss_with_cos(tiny, positive: bool) -> _SignedCMALoss:
    """The signed loss whose feature-gradient cosine with the contrastive one has the asked-for sign."""
    model, images, tokens = tiny
    probe = _SignedCMALoss(1.0)
    fi, ft, ls = model(images, tokens)[:3]
    out = probe(fi, ft, ls)
    g_c = torch.autograd.grad(out["clip"], [fi, ft], retain_graph=True)
    g_a = torch.autograd.grad(out["cma"], [fi, ft])
    dot = float(sum((a * b).sum() for a, b in zip(g_c, g_a, strict=True)))
    return _SignedCMALoss(1.0 if (dot > 0) == positive else -1.0)


def test_step_projection_reaches_the_parameters(tiny) -> None:
    model, images, tokens = tiny
    loss_fn = _cma_loss_with_cos(tiny, positive=False)
    alpha = 0.5
    sched = GradScheduler(GradSchedulerConfig(mode="project", max_ratio=1e9))
    row, d, got = _step_grads(model, images, tokens, loss_fn, sched, alpha)
    assert d.projected and d.cos < 0 and not d.capped
    assert row["total"] == pytest.approx(row["clip"] + alpha * row["cma"])

    # Reference: projected feature gradient (1 − α·c)·g_c + α·g_a with c = <g_c,g_a>/|g_c|², while the
    # logit scale gets the contrastive gradient alone.
    model.zero_grad(set_to_none=True)
    fi, ft, ls = model(images, tokens)[:3]
    out = loss_fn(fi, ft, ls, alpha)
    g_c = torch.autograd.grad(out["clip"], [fi, ft], retain_graph=True)
    g_a = torch.autograd.grad(out["cma"], [fi, ft], retain_graph=True)
    coef = float(sum((a * b).sum() for a, b in zip(g_c, g_a, strict=False)) / sum((a * a).sum() for a in g_c))
    assert coef < 0
    clip_feat = loss_fn.inner.clip(fi, ft, ls.detach())
    clip_scale = loss_fn.inner.clip(fi.detach(), ft.detach(), ls)
    ((1 - alpha * coef) * clip_feat + clip_scale + alpha * out["cma"]).backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    _assert_same_grads(got, ref)

    # and it differs from the unprojected combination
    plain = _plain_grads(model, images, tokens, loss_fn, alpha)
    assert any(not torch.allclose(got[n], plain[n], atol=1e-6, rtol=1e-4) for n in got)


@pytest.mark.parametrize("mode", ["project", "off"])
def test_grad_scaler_path_in_fp32_on_cpu_unscales_to_the_same_gradients(tiny, mode) -> None:
    """The step's GradScaler path (the one fp16 AMP takes), run in fp32 on the CPU with a CPU scaler: no fp16
    arithmetic happens here (that needs CUDA); what is checked is that the step scales its gradients through
    the scaler and that unscaling gives the unscaled step's."""
    from cmalign.objective.cma_loss import CMALoss

    model, images, tokens = tiny
    step = TPCCMAStep(model, CMALoss(), GradScheduler(GradSchedulerConfig(mode=mode)))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model.zero_grad(set_to_none=True)
    step(images, tokens, 0.5, nullcontext)
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    step(images, tokens, 0.5, nullcontext, scaler)
    scaler.unscale_(opt)  # raised "Attempted unscale_ but _scale is None" when the step bypassed the scaler
    _assert_same_grads(_grads(model), ref)
    scaler.step(opt)
    scaler.update()
    model.zero_grad(set_to_none=True)
