"""The gradient-aware scheduler (cmalign.objective.grad_scheduler) on hand-made gradients; the TPC-CMA step that
uses it on a real model is in test_step.py."""

from __future__ import annotations

import math

import pytest
import torch

from cmalign.objective.grad_scheduler import MODES, Decision, GradScheduler, GradSchedulerConfig

# ------------------------------------------------------------------ hand-made gradients


def sums(g_clip: list[torch.Tensor], g_cma: list[torch.Tensor]) -> tuple[float, float, float]:
    dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(g_clip, g_cma, strict=False))
    clip_sq = sum(float((a.double() ** 2).sum()) for a in g_clip)
    cma_sq = sum(float((b.double() ** 2).sum()) for b in g_cma)
    return dot, clip_sq, cma_sq


def flat(gs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in gs])


def decide_and_combine(sched: GradScheduler, g_clip, g_cma, alpha: float):
    dot, clip_sq, cma_sq = sums(g_clip, g_cma)
    d = sched.decide(dot, clip_sq, cma_sq, alpha)
    return d, sched.combine(g_clip, g_cma, d, dot, clip_sq)


def two_tensors(*vals) -> list[torch.Tensor]:
    """Split a flat vector into an image part and a text part, as the step passes them."""
    v = torch.tensor(vals, dtype=torch.float64)
    return [v[:2].reshape(1, 2), v[2:].reshape(1, -1)]


ALIGNED = (two_tensors(1.0, 0.0, 1.0, 0.0), two_tensors(0.4, 0.3, 0.2, 0.0))  # cos > 0, |g_a| < |g_c|
CONFLICT = (two_tensors(1.0, 0.0, 1.0, 0.0), two_tensors(-0.3, 0.4, 0.0, 0.2))  # cos < 0, |g_a| < |g_c|


def _cos(g_clip, g_cma) -> float:
    dot, c, a = sums(g_clip, g_cma)
    return dot / math.sqrt(c * a)


def test_fixtures_have_the_intended_geometry() -> None:
    assert _cos(*ALIGNED) > 0
    assert _cos(*CONFLICT) < 0
    for g_clip, g_cma in (ALIGNED, CONFLICT):
        _, c, a = sums(g_clip, g_cma)
        assert a < c  # ratio < 1 at alpha <= 1: the dwarf guard stays out of the way


@pytest.mark.parametrize("mode", ["project", "lr", "alpha"])
def test_aligned_gradients_are_left_alone(mode: str) -> None:
    sched = GradScheduler(GradSchedulerConfig(mode=mode))
    g_clip, g_cma = ALIGNED
    d, combined = decide_and_combine(sched, g_clip, g_cma, alpha=0.7)
    assert d.cos == pytest.approx(_cos(g_clip, g_cma))
    assert not d.projected and not d.capped
    assert d.alpha_eff == 0.7 and d.lr_scale == 1.0
    expected = flat(g_clip) + 0.7 * flat(g_cma)
    assert torch.allclose(flat(combined), expected, atol=1e-12)
    assert sched.conflicts == 0 and sched.steps_seen == 1


def test_conflict_in_project_mode_removes_the_component_against_clip() -> None:
    sched = GradScheduler(GradSchedulerConfig(mode="project"))
    g_clip, g_cma = CONFLICT
    d, combined = decide_and_combine(sched, g_clip, g_cma, alpha=0.8)
    assert d.projected is True and d.capped is False
    assert d.cos < 0
    assert d.alpha_eff == 0.8 and d.lr_scale == 1.0
    gc = flat(g_clip)
    cma_part = flat(combined) - gc
    assert float(cma_part @ gc) == pytest.approx(0.0, abs=1e-12)
    # what is left of g_a is its component orthogonal to g_c, weighted by alpha_eff
    ga = flat(g_cma)
    orth = ga - (ga @ gc) / (gc @ gc) * gc
    assert torch.allclose(cma_part, 0.8 * orth, atol=1e-12)
    assert float(cma_part.norm()) > 0  # projection, not deletion
    assert sched.conflicts == 1


def test_projection_works_across_the_image_and_text_parts_jointly() -> None:
    # per part, g_a is aligned on the image part and opposed on the text part; the projection is global
    g_clip = two_tensors(1.0, 0.0, 1.0, 0.0)
    g_cma = two_tensors(0.1, 0.0, -0.6, 0.3)
    sched = GradScheduler(GradSchedulerConfig(mode="project"))
    d, combined = decide_and_combine(sched, g_clip, g_cma, alpha=1.0)
    assert d.projected
    gc = flat(g_clip)
    assert float((flat(combined) - gc) @ gc) == pytest.approx(0.0, abs=1e-12)
    assert [c.shape for c in combined] == [g.shape for g in g_clip]


@pytest.mark.parametrize("min_lr_scale", [0.25, 0.9])
def test_lr_mode_scales_lr_on_conflict_only(min_lr_scale: float) -> None:
    cfg = GradSchedulerConfig(mode="lr", min_lr_scale=min_lr_scale)
    g_clip, g_cma = CONFLICT
    c = _cos(g_clip, g_cma)
    d, combined = decide_and_combine(GradScheduler(cfg), g_clip, g_cma, alpha=0.5)
    assert d.lr_scale == pytest.approx(max(min_lr_scale, 1 + c))
    assert not d.projected and d.alpha_eff == 0.5
    assert torch.allclose(flat(combined), flat(g_clip) + 0.5 * flat(g_cma), atol=1e-12)

    d2, _ = decide_and_combine(GradScheduler(cfg), *ALIGNED, alpha=0.5)
    assert d2.lr_scale == 1.0


def test_lr_mode_floor_applies_for_strong_conflict() -> None:
    g_clip = two_tensors(1.0, 0.0, 0.0, 0.0)
    g_cma = two_tensors(-0.9, 0.1, 0.0, 0.0)  # cos ≈ -0.99
    d, _ = decide_and_combine(GradScheduler(GradSchedulerConfig(mode="lr", min_lr_scale=0.25)), g_clip, g_cma, 0.5)
    assert 1 + d.cos < 0.25
    assert d.lr_scale == 0.25


def test_alpha_mode_scales_alpha_by_one_plus_cos() -> None:
    g_clip, g_cma = CONFLICT
    c = _cos(g_clip, g_cma)
    sched = GradScheduler(GradSchedulerConfig(mode="alpha"))
    d, combined = decide_and_combine(sched, g_clip, g_cma, alpha=0.6)
    assert d.alpha_eff == pytest.approx(0.6 * (1 + c))
    assert d.alpha == 0.6 and d.lr_scale == 1.0 and not d.projected
    assert torch.allclose(flat(combined), flat(g_clip) + d.alpha_eff * flat(g_cma), atol=1e-12)
    d2, _ = decide_and_combine(sched, *ALIGNED, alpha=0.6)
    assert d2.alpha_eff == 0.6


@pytest.mark.parametrize("mode", ["project", "lr", "alpha"])
@pytest.mark.parametrize("max_ratio", [0.05, 1.0])
def test_dwarf_guard_caps_alpha_so_cma_never_outweighs_clip(mode: str, max_ratio: float) -> None:
    g_clip = two_tensors(0.1, 0.0, 0.1, 0.0)  # small contrastive gradient
    g_cma = two_tensors(2.0, 1.0, 0.5, 0.0)  # large alignment gradient, aligned
    sched = GradScheduler(GradSchedulerConfig(mode=mode, max_ratio=max_ratio))
    d, combined = decide_and_combine(sched, g_clip, g_cma, alpha=3.0)
    n_c, n_a = float(flat(g_clip).norm()), float(flat(g_cma).norm())
    assert d.ratio == pytest.approx(3.0 * n_a / n_c)
    assert d.ratio > max_ratio
    assert d.capped is True
    assert d.alpha == 3.0
    assert d.alpha_eff < 3.0
    assert d.alpha_eff * n_a == pytest.approx(max_ratio * n_c, rel=1e-12)
    assert float((flat(combined) - flat(g_clip)).norm()) == pytest.approx(max_ratio * n_c, rel=1e-12)
    assert sched.caps == 1


def test_dwarf_guard_leaves_small_ratios_alone() -> None:
    sched = GradScheduler(GradSchedulerConfig(max_ratio=1.0))
    d, _ = decide_and_combine(sched, *ALIGNED, alpha=1.0)
    assert d.ratio < 1.0 and not d.capped and d.alpha_eff == 1.0
    assert sched.caps == 0


def test_cap_and_projection_together() -> None:
    g_clip = two_tensors(0.1, 0.0, 0.1, 0.0)
    g_cma = two_tensors(-2.0, 1.0, 0.5, 0.0)
    sched = GradScheduler(GradSchedulerConfig(mode="project", max_ratio=0.5))
    d, combined = decide_and_combine(sched, g_clip, g_cma, alpha=2.0)
    assert d.capped and d.projected
    gc = flat(g_clip)
    assert float((flat(combined) - gc) @ gc) == pytest.approx(0.0, abs=1e-12)
    assert d.alpha_eff * float(flat(g_cma).norm()) == pytest.approx(0.5 * float(gc.norm()))


@pytest.mark.parametrize("mode", ["project", "lr", "alpha"])
def test_alpha_zero_measures_nothing(mode: str) -> None:
    sched = GradScheduler(GradSchedulerConfig(mode=mode))
    d, combined = decide_and_combine(sched, *CONFLICT, alpha=0.0)
    assert d.alpha_eff == 0.0
    assert not d.projected and not d.capped and d.lr_scale == 1.0
    assert sched.steps_seen == 0 and sched.conflicts == 0 and sched.caps == 0
    assert torch.equal(flat(combined), flat(CONFLICT[0]))


def test_zero_gradient_is_not_a_conflict() -> None:
    sched = GradScheduler(GradSchedulerConfig(mode="project"))
    zero = [torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)]
    d, combined = decide_and_combine(sched, CONFLICT[0], zero, alpha=0.5)
    assert not d.projected and not d.capped and math.isfinite(d.cos)
    assert sched.steps_seen == 0
    assert torch.equal(flat(combined), flat(CONFLICT[0]))


def test_counters_and_state_dict_round_trip() -> None:
    sched = GradScheduler(GradSchedulerConfig(mode="project", max_ratio=0.01))
    decide_and_combine(sched, *ALIGNED, alpha=1.0)  # capped
    decide_and_combine(sched, *CONFLICT, alpha=1.0)  # capped + conflict
    decide_and_combine(sched, *CONFLICT, alpha=0.0)  # not measured
    assert (sched.steps_seen, sched.conflicts, sched.caps) == (2, 1, 2)
    state = sched.state_dict()
    fresh = GradScheduler(GradSchedulerConfig(mode="project", max_ratio=0.01))
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state == {"steps_seen": 2, "conflicts": 1, "caps": 2}


def test_decision_log_keys() -> None:
    d, _ = decide_and_combine(GradScheduler(GradSchedulerConfig(mode="project")), *CONFLICT, alpha=0.5)
    log = d.to_log()
    assert set(log) == {"grad_cos", "grad_ratio", "alpha", "alpha_eff", "lr_scale", "projected", "capped",
                        "block_cos_min", "block_conflict_share", "block_ratio_max", "model_ratio",
                        "model_cos"}  # None: not a block measurement
    assert log["block_cos_min"] is None
    assert log["projected"] is True and log["grad_cos"] == d.cos


@pytest.mark.parametrize("mode", ["PCGrad", "", "none"])
def test_invalid_mode_raises(mode: str) -> None:
    with pytest.raises(ValueError, match="mode"):
        GradSchedulerConfig(mode=mode)


@pytest.mark.parametrize("max_ratio", [0.0, -1.0])
def test_invalid_max_ratio_raises(max_ratio: float) -> None:
    with pytest.raises(ValueError, match="max_ratio"):
        GradSchedulerConfig(max_ratio=max_ratio)


def test_all_documented_modes_construct() -> None:
    for m in MODES:
        assert GradSchedulerConfig(mode=m).mode == m


def test_decision_default_is_neutral() -> None:
    d = Decision()
    assert d.lr_scale == 1.0 and not d.projected and not d.capped
