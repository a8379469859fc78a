"""The three-phase α schedule of TPC-CMA (cmalign.objective.curriculum)."""

from __future__ import annotations

import itertools
import math

import pytest

from cmalign.errors import ConfigError
from cmalign.objective.curriculum import RAMPS, CurriculumConfig, WarmupGate, alpha_at

TOTAL = 100
TARGET = 0.8


def schedule(cfg: CurriculumConfig, total: int = TOTAL, target: float = TARGET) -> list[tuple[float, int]]:
    return [alpha_at(s, total, target, cfg) for s in range(total)]


# ------------------------------------------------------------------ the three phases


@pytest.mark.parametrize("ramp", RAMPS)
def test_warmup_gives_exactly_zero_before_warmup_fraction(ramp: str) -> None:
    cfg = CurriculumConfig(warmup_fraction=0.2, intro_fraction=0.3, ramp=ramp)
    for step in range(20):  # steps < 0.2 * 100
        alpha, phase = alpha_at(step, TOTAL, TARGET, cfg)
        assert alpha == 0.0
        assert phase == 1
    assert alpha_at(20, TOTAL, TARGET, cfg)[1] == 2


def test_phase_numbers_change_at_the_configured_steps() -> None:
    cfg = CurriculumConfig(warmup_fraction=0.2, intro_fraction=0.3)
    phases = [p for _, p in schedule(cfg)]
    assert phases == [1] * 20 + [2] * 30 + [3] * 50


def test_phase_numbers_for_a_short_run() -> None:
    cfg = CurriculumConfig(warmup_fraction=0.25, intro_fraction=0.5)
    assert [p for _, p in schedule(cfg, total=8)] == [1, 1, 2, 2, 2, 2, 3, 3]


def test_phase_three_starts_at_warmup_plus_intro_for_non_binary_fractions() -> None:
    cfg = CurriculumConfig(warmup_fraction=0.1, intro_fraction=0.2)
    assert [p for _, p in schedule(cfg, total=10)] == [1, 2, 2, 3, 3, 3, 3, 3, 3, 3]


@pytest.mark.parametrize("ramp", RAMPS)
def test_intro_ramps_monotonically_from_zero_to_intro_alpha(ramp: str) -> None:
    cfg = CurriculumConfig(warmup_fraction=0.2, intro_fraction=0.3, intro_alpha_ratio=0.25, ramp=ramp)
    intro_alpha = 0.25 * TARGET
    vals = [alpha_at(s, TOTAL, TARGET, cfg) for s in range(20, 50)]
    assert all(p == 2 for _, p in vals)
    alphas = [a for a, _ in vals]
    assert alphas[0] == pytest.approx(0.0, abs=1e-12)
    assert all(b >= a for a, b in itertools.pairwise(alphas))
    assert all(0.0 <= a <= intro_alpha + 1e-12 for a in alphas)
    assert alphas[-1] > 0.5 * intro_alpha  # gets there: ramp(29/30)
    # phase 3 starts exactly where the intro ramp is headed
    assert alpha_at(50, TOTAL, TARGET, cfg) == (pytest.approx(intro_alpha), 3)


def test_linear_intro_ramp_values() -> None:
    cfg = CurriculumConfig(warmup_fraction=0.2, intro_fraction=0.4, intro_alpha_ratio=0.5, ramp="linear")
    # u = (t - 0.2) / 0.4
    assert alpha_at(30, TOTAL, 1.0, cfg)[0] == pytest.approx(0.5 * 0.25)
    assert alpha_at(40, TOTAL, 1.0, cfg)[0] == pytest.approx(0.5 * 0.5)
    assert alpha_at(50, TOTAL, 1.0, cfg)[0] == pytest.approx(0.5 * 0.75)


@pytest.mark.parametrize("ramp", RAMPS)
def test_full_phase_reaches_target_after_full_ramp_fraction_and_holds(ramp: str) -> None:
    cfg = CurriculumConfig(warmup_fraction=0.2, intro_fraction=0.3, intro_alpha_ratio=0.1,
                           full_ramp_fraction=0.4, ramp=ramp)
    # phase 3 spans steps 50..99; the ramp covers 0.4 of it -> t = 0.5 + 0.2 = 0.7 -> step 70
    for step in range(70, TOTAL):
        alpha, phase = alpha_at(step, TOTAL, TARGET, cfg)
        assert phase == 3
        assert alpha == pytest.approx(TARGET, rel=1e-12)
    before = alpha_at(65, TOTAL, TARGET, cfg)[0]
    if ramp == "step":
        assert before == pytest.approx(TARGET)
    else:
        assert 0.1 * TARGET < before < TARGET - 1e-6  # still ramping half-way
    # and the run's last step (and beyond) holds it
    assert alpha_at(TOTAL - 1, TOTAL, TARGET, cfg)[0] == pytest.approx(TARGET)
    assert alpha_at(5 * TOTAL, TOTAL, TARGET, cfg) == (pytest.approx(TARGET), 3)


def test_full_ramp_fraction_zero_jumps_to_target_at_phase_three() -> None:
    cfg = CurriculumConfig(warmup_fraction=0.2, intro_fraction=0.3, full_ramp_fraction=0.0)
    assert alpha_at(50, TOTAL, TARGET, cfg) == (pytest.approx(TARGET), 3)
    assert alpha_at(49, TOTAL, TARGET, cfg)[1] == 2


def test_full_phase_linear_midpoint() -> None:
    cfg = CurriculumConfig(warmup_fraction=0.2, intro_fraction=0.4, intro_alpha_ratio=0.2, full_ramp_fraction=0.5)
    # phase 3: t in [0.6, 1), ramp over 0.2 -> midpoint at t = 0.7
    assert alpha_at(70, TOTAL, 1.0, cfg)[0] == pytest.approx(0.2 + 0.8 * 0.5)


# ------------------------------------------------------------------ ramp shapes


def _cfg(ramp: str) -> CurriculumConfig:
    # intro ramp over steps 20..59 (midpoint 40, quarter 30); full ramp over 60..79 (midpoint 70, quarter 65)
    return CurriculumConfig(warmup_fraction=0.2, intro_fraction=0.4, intro_alpha_ratio=0.2,
                            full_ramp_fraction=0.5, ramp=ramp)


@pytest.mark.parametrize("mid, quarter", [(40, 30), (70, 65)])
def test_cosine_meets_linear_at_midpoint_and_is_below_it_at_first_quarter(mid: int, quarter: int) -> None:
    lin, cos = _cfg("linear"), _cfg("cosine")
    assert alpha_at(mid, TOTAL, 1.0, cos)[0] == pytest.approx(alpha_at(mid, TOTAL, 1.0, lin)[0], rel=1e-9)
    lq, cq = alpha_at(quarter, TOTAL, 1.0, lin)[0], alpha_at(quarter, TOTAL, 1.0, cos)[0]
    assert cq < lq - 1e-3
    # and above it in the third quarter (the S-shape)
    three_q = 2 * mid - quarter
    assert alpha_at(three_q, TOTAL, 1.0, cos)[0] > alpha_at(three_q, TOTAL, 1.0, lin)[0] + 1e-3


def test_cosine_quarter_value() -> None:
    # intro ramp at u = 0.25: 0.5 - 0.5 cos(pi/4)
    expected = 0.2 * (0.5 - 0.5 * math.cos(math.pi / 4))
    assert alpha_at(30, TOTAL, 1.0, _cfg("cosine"))[0] == pytest.approx(expected)


def test_step_ramp_is_at_full_value_right_after_the_ramp_starts() -> None:
    cfg = _cfg("step")
    for s in range(21, 60):  # every intro step after the first
        assert alpha_at(s, TOTAL, 1.0, cfg) == (pytest.approx(0.2), 2)
    for s in range(61, TOTAL):  # every full-phase step after the first
        assert alpha_at(s, TOTAL, 1.0, cfg) == (pytest.approx(1.0), 3)
    # linear is still well below full at the same early steps
    assert alpha_at(25, TOTAL, 1.0, _cfg("linear"))[0] < 0.2 * 0.25
    assert alpha_at(62, TOTAL, 1.0, _cfg("linear"))[0] < 0.5


# ------------------------------------------------------------------ whole-run properties


@pytest.mark.parametrize("ramp", RAMPS)
@pytest.mark.parametrize("target", [0.3, 0.5, 1.7])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 1.0])
def test_alpha_is_non_decreasing_and_bounded_by_target(ramp: str, target: float, ratio: float) -> None:
    cfg = CurriculumConfig(intro_alpha_ratio=ratio, ramp=ramp)
    sched = schedule(cfg, total=97, target=target)
    alphas = [a for a, _ in sched]
    phases = [p for _, p in sched]
    assert all(b >= a for a, b in itertools.pairwise(alphas))
    assert all(b >= a for a, b in itertools.pairwise(phases))
    assert min(alphas) == 0.0
    assert max(alphas) <= target * (1 + 1e-12)
    assert alphas[-1] == pytest.approx(target)


@pytest.mark.parametrize("ramp", RAMPS)
def test_plateau_is_exactly_alpha_target(ramp: str) -> None:
    cfg = CurriculumConfig(intro_alpha_ratio=0.1, ramp=ramp)
    hold_from = math.ceil(TOTAL * (cfg.warmup_fraction + cfg.intro_fraction
                                   + (1 - cfg.warmup_fraction - cfg.intro_fraction) * cfg.full_ramp_fraction))
    assert all(alpha_at(step, TOTAL, 0.3, cfg) == (0.3, 3) for step in range(hold_from, TOTAL))


@pytest.mark.parametrize("ramp", RAMPS)
def test_zero_target_gives_zero_everywhere(ramp: str) -> None:
    cfg = CurriculumConfig(ramp=ramp)
    assert all(a == 0.0 for a, _ in schedule(cfg, target=0.0))


def test_alpha_depends_only_on_step() -> None:
    cfg = CurriculumConfig(ramp="cosine")
    first = [alpha_at(s, TOTAL, TARGET, cfg) for s in range(TOTAL)]
    again = [alpha_at(s, TOTAL, TARGET, cfg) for s in reversed(range(TOTAL))][::-1]
    assert first == again


# ------------------------------------------------------------------ validation


def test_defaults_are_valid() -> None:
    cfg = CurriculumConfig()
    assert cfg.ramp in RAMPS


def test_bad_ramp_name_raises() -> None:
    with pytest.raises(ValueError, match="ramp"):
        CurriculumConfig(ramp="exponential")


@pytest.mark.parametrize("name", ["warmup_fraction", "intro_fraction", "intro_alpha_ratio", "full_ramp_fraction"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_fractions_out_of_unit_interval_raise(name: str, value: float) -> None:
    kwargs = {"warmup_fraction": 0.0, "intro_fraction": 0.0, name: value}
    with pytest.raises(ValueError, match=name):
        CurriculumConfig(**kwargs)


def test_warmup_plus_intro_above_one_raises() -> None:
    with pytest.raises(ValueError, match="warmup_fraction"):
        CurriculumConfig(warmup_fraction=0.6, intro_fraction=0.5)
    CurriculumConfig(warmup_fraction=0.5, intro_fraction=0.5)  # exactly 1 is allowed


# ------------------------------------------------------------------ the warm-up's settle gate


def gated(cfg: CurriculumConfig, losses, total: int = TOTAL, target: float = TARGET):
    """(α, phase) per step, the gate fed ``losses[step]`` after each step, as the trainers do; and the gate."""
    gate = WarmupGate(cfg, total)
    out = []
    for step in range(total):
        out.append(gate.alpha_at(step, target))
        gate.observe(losses(step))
    return out, gate


def test_a_settled_loss_ends_the_warmup_at_warmup_fraction_as_the_fixed_schedule() -> None:
    cfg = CurriculumConfig(warmup_fraction=0.2)
    out, gate = gated(cfg, lambda s: 1.3 + 0.1 * (-1) ** s)  # flat, with noise
    assert out == schedule(CurriculumConfig(warmup_fraction=0.2, settle_tolerance=0.0))
    assert (gate.warmup_end, gate.settled) == (0.2, True)


def test_a_loss_still_falling_holds_the_warmup_until_warmup_max_fraction() -> None:
    cfg = CurriculumConfig(warmup_fraction=0.2, intro_fraction=0.3, warmup_max_fraction=0.6)
    out, gate = gated(cfg, lambda s: 70.0 * 0.9 ** s)  # 10 % down every step: never settles
    assert all(a == 0.0 and p == 1 for a, p in out[:60])
    assert (gate.warmup_end, gate.settled) == (0.6, False)
    # the introduction keeps its share of what is left: 0.3 of 0.8 before, 0.3 · 0.4 / 0.8 = 0.15 of the run now
    assert [p for _, p in out[60:]] == [2] * 15 + [3] * 25
    assert out[-1][0] == TARGET


def test_the_warmup_ends_when_the_loss_settles() -> None:
    # falling by 0.1 a step until step 40, flat after: windows of 5 steps; at step 49 the last window (44–48) is
    # 2 % below the one before (39–43), at step 48 still 5.7 %
    cfg = CurriculumConfig(warmup_fraction=0.2, settle_window=0.05, settle_tolerance=0.05)
    out, gate = gated(cfg, lambda s: 5.0 - 0.1 * min(s, 40))
    assert gate.settled is True and gate.warmup_end == 0.49
    end = round(gate.warmup_end * TOTAL)
    assert out[end - 1] == (0.0, 1) and out[end][1] == 2


def test_the_gate_resumes_exactly() -> None:
    cfg = CurriculumConfig(warmup_fraction=0.1)
    losses = lambda s: 10.0 * 0.95 ** s + 1.0  # noqa: E731
    whole, _ = gated(cfg, losses)
    first = WarmupGate(cfg, TOTAL)
    out = []
    for step in range(30):
        out.append(first.alpha_at(step, TARGET))
        first.observe(losses(step))
    second = WarmupGate(cfg, TOTAL)
    second.load_state_dict(first.state_dict())
    for step in range(30, TOTAL):
        out.append(second.alpha_at(step, TARGET))
        second.observe(losses(step))
    assert out == whole


def test_a_fixed_warmup_ignores_the_losses() -> None:
    cfg = CurriculumConfig(settle_tolerance=0.0)
    out, gate = gated(cfg, lambda s: 70.0 * 0.9 ** s)
    assert out == schedule(cfg) and gate.settled is None


def test_warmup_max_fraction_below_warmup_fraction_raises() -> None:
    with pytest.raises(ConfigError, match="warmup_max_fraction"):
        CurriculumConfig(warmup_fraction=0.5, warmup_max_fraction=0.4)
