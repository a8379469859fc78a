"""The three-phase α schedule of TPC-CMA.

1. warm-up      — α = 0: plain contrastive fine-tuning settles on the new data;
2. introduction — α ramps from 0 to ``intro_alpha_ratio · α_target`` (a small weight);
3. full         — α ramps from there to ``α_target`` over ``full_ramp_fraction`` of the phase, then holds.

Phase lengths are fractions of the run's steps. The warm-up does not end before the contrastive loss has
*settled* (:class:`WarmupGate`): on a domain the model has not seen, a short run's contrastive signal is still
forming when the fixed warm-up ends, and the alignment term then overrides it (measured: 60 steps on photographic
negatives, α = 0.5 lost 52 % zero-shot against α = 0 with a fixed 20 % warm-up). The later phases keep their
proportions in what is left. Given the step the warm-up ended at, α is a pure function of the step; that one step
(and the recent losses while it is open) is the curriculum's state in a checkpoint.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from cmalign.errors import ConfigError

RAMPS = ("linear", "cosine", "step")


@dataclass
class CurriculumConfig:
    warmup_fraction: float = 0.2
    intro_fraction: float = 0.3
    intro_alpha_ratio: float = 0.1
    full_ramp_fraction: float = 0.3
    ramp: str = "linear"  # linear | cosine | step
    # The warm-up ends once the mean contrastive loss of the last window (this share of the steps, ≥ 5 steps) is
    # less than this much below the window's before it. 0: a fixed warm-up (configs written before the gate).
    settle_tolerance: float = 0.05
    settle_window: float = 0.05
    warmup_max_fraction: float = 0.8  # ... and at the latest here, settled or not

    def __post_init__(self):
        if self.ramp not in RAMPS:
            raise ConfigError(f"curriculum ramp must be one of {', '.join(RAMPS)}, got '{self.ramp}'")
        for name in ("warmup_fraction", "intro_fraction", "intro_alpha_ratio", "full_ramp_fraction",
                     "settle_tolerance", "settle_window", "warmup_max_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"curriculum.{name} must be in [0, 1], got {v}")
        if self.warmup_fraction + self.intro_fraction > 1.0:
            raise ConfigError("curriculum.warmup_fraction + curriculum.intro_fraction must not exceed 1")
        if self.warmup_max_fraction < self.warmup_fraction:
            raise ConfigError(f"curriculum.warmup_max_fraction ({self.warmup_max_fraction}) must not be below "
                              f"curriculum.warmup_fraction ({self.warmup_fraction})")


def _ramp(u: float, shape: str) -> float:
    u = min(max(u, 0.0), 1.0)
    if shape == "linear":
        return u
    if shape == "cosine":
        return 0.5 - 0.5 * math.cos(math.pi * u)
    return 1.0 if u > 0 else 0.0  # step: jump at the start of the ramp


def alpha_at(step: int, total_steps: int, alpha_target: float, cfg: CurriculumConfig,
             warmup_end: float | None = None) -> tuple[float, int]:
    """(α, phase) at optimizer step ``step`` (0-based) of a ``total_steps`` run; phase is 1, 2 or 3.

    ``warmup_end``: the share of the run at which the warm-up ended (:class:`WarmupGate`); None: at
    ``cfg.warmup_fraction``. A later end shrinks the introduction to the same share of what is left.
    """
    t = step / max(total_steps, 1)
    tol = 1e-9  # phase boundaries are float sums (0.1 + 0.2 != 0.3)
    w_end = cfg.warmup_fraction if warmup_end is None else warmup_end
    rest = 1.0 - cfg.warmup_fraction
    intro = cfg.intro_fraction if rest <= 0 else cfg.intro_fraction * (1.0 - w_end) / rest
    i_end = w_end + intro
    intro_alpha = cfg.intro_alpha_ratio * alpha_target
    if t < w_end - tol:
        return 0.0, 1
    if t < i_end - tol:
        return intro_alpha * _ramp((t - w_end) / intro, cfg.ramp), 2
    full_len = (1.0 - i_end) * cfg.full_ramp_fraction
    u = 1.0 if full_len <= 0 else (t - i_end) / full_len
    if u >= 1.0 - tol:
        return alpha_target, 3
    return min(alpha_target, intro_alpha + (alpha_target - intro_alpha) * _ramp(u, cfg.ramp)), 3


@dataclass
class WarmupGate:
    """Holds the warm-up open until the contrastive loss has settled; see the module docstring.

    :meth:`observe` takes each optimizer step's contrastive loss; :attr:`warmup_end` is the share of the run at which
    the warm-up ended (None while it lasts), for :func:`alpha_at`.
    """

    cfg: CurriculumConfig
    total_steps: int
    warmup_end: float | None = None
    settled: bool | None = None  # True: the loss settled; False: the warm-up hit warmup_max_fraction first
    recent: deque = field(default_factory=deque)

    def __post_init__(self):
        if self.cfg.settle_tolerance <= 0:  # a fixed warm-up
            self.warmup_end, self.settled = self.cfg.warmup_fraction, None
        self.window = max(5, round(self.cfg.settle_window * self.total_steps))
        self.recent = deque(self.recent, maxlen=2 * self.window)

    def alpha_at(self, step: int, alpha_target: float) -> tuple[float, int]:
        """(α, phase) at ``step``, first closing the warm-up if it is due (call once per step, before it runs)."""
        if self.warmup_end is None:
            t = step / max(self.total_steps, 1)
            if t >= self.cfg.warmup_max_fraction - 1e-9:
                self.warmup_end, self.settled = t, False
            elif t >= self.cfg.warmup_fraction - 1e-9 and self._has_settled():
                self.warmup_end, self.settled = t, True
        if self.warmup_end is None:
            return 0.0, 1
        return alpha_at(step, self.total_steps, alpha_target, self.cfg, self.warmup_end)

    def observe(self, clip_loss: float) -> None:
        if self.warmup_end is None and math.isfinite(clip_loss):
            self.recent.append(clip_loss)

    def _has_settled(self) -> bool:
        w = self.window
        if len(self.recent) < 2 * w:
            return False
        values = list(self.recent)
        before, last = sum(values[:w]) / w, sum(values[w:]) / w
        return before <= 0 or 1.0 - last / before < self.cfg.settle_tolerance

    def state_dict(self) -> dict:
        return {"warmup_end": self.warmup_end, "settled": self.settled, "recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.warmup_end, self.settled = state["warmup_end"], state["settled"]
        self.recent = deque(state["recent"], maxlen=2 * self.window)
