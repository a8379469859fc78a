"""The three-phase α schedule of TPC-CMA.

1. warm-up      — α = 0: plain contrastive fine-tuning settles on the new data;
2. introduction — α ramps from 0 to ``intro_alpha_ratio · α_target`` (a small weight);
3. full         — α ramps from there to ``α_target`` over ``full_ramp_fraction`` of the phase, then holds.

Phase lengths are fractions of the run's steps. α is a pure function of the step, so resuming a
run needs no curriculum state beyond the step counter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cmalign.errors import ConfigError

RAMPS = ("linear", "cosine", "step")


@dataclass
class CurriculumConfig:
    warmup_fraction: float = 0.2
    intro_fraction: float = 0.3
    intro_alpha_ratio: float = 0.1
    full_ramp_fraction: float = 0.3
    ramp: str = "linear"  # linear | cosine | step

    def __post_init__(self):
        if self.ramp not in RAMPS:
            raise ConfigError(f"curriculum ramp must be one of {', '.join(RAMPS)}, got '{self.ramp}'")
        for name in ("warmup_fraction", "intro_fraction", "intro_alpha_ratio", "full_ramp_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"curriculum.{name} must be in [0, 1], got {v}")
        if self.warmup_fraction + self.intro_fraction > 1.0:
            raise ConfigError("curriculum.warmup_fraction + curriculum.intro_fraction must not exceed 1")


def _ramp(u: float, shape: str) -> float:
    u = min(max(u, 0.0), 1.0)
    if shape == "linear":
        return u
    if shape == "cosine":
        return 0.5 - 0.5 * math.cos(math.pi * u)
    return 1.0 if u > 0 else 0.0  # step: jump at the start of the ramp


def alpha_at(step: int, total_steps: int, alpha_target: float, cfg: CurriculumConfig) -> tuple[float, int]:
    """(α, phase) at optimizer step ``step`` (0-based) of a ``total_steps`` run; phase is 1, 2 or 3."""
    t = step / max(total_steps, 1)
    tol = 1e-9  # phase boundaries are float sums (0.1 + 0.2 != 0.3)
    w_end = cfg.warmup_fraction
    i_end = w_end + cfg.intro_fraction
    intro_alpha = cfg.intro_alpha_ratio * alpha_target
    if t < w_end - tol:
        return 0.0, 1
    if t < i_end - tol:
        return intro_alpha * _ramp((t - w_end) / cfg.intro_fraction, cfg.ramp), 2
    full_len = (1.0 - i_end) * cfg.full_ramp_fraction
    u = 1.0 if full_len <= 0 else (t - i_end) / full_len
    if u >= 1.0 - tol:
        return alpha_target, 3
    return min(alpha_target, intro_alpha + (alpha_target - intro_alpha) * _ramp(u, cfg.ramp)), 3
