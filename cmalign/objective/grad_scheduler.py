"""Gradient-aware scheduling: keep the alignment term from fighting the contrastive one.

The two losses meet at the embeddings, which every trainable weight feeds. So the scheduler
compares their gradients *with respect to the batch embeddings* (image and text features, and the
gathered batch under DDP): two small ``autograd.grad`` calls through the loss head, no second pass
through the towers. With ``g_c`` = ∂L_clip/∂f and ``g_a`` = ∂L_cma/∂f (unweighted), α = α(t):

* cosine ``c = <g_c, g_a> / (|g_c| |g_a|)``; ratio ``r = α |g_a| / |g_c|``;
* dwarf guard: if ``r > max_ratio`` the effective weight becomes ``α_eff = α · max_ratio / r``;
* on conflict (``c < 0``), by ``mode``:
  - ``project`` (default): remove from ``g_a`` its component along ``g_c`` (PCGrad), so the
    alignment step never undoes contrastive progress;
  - ``lr``: scale this step's learning rate by ``max(min_lr_scale, 1 + c)``;
  - ``alpha``: scale ``α_eff`` by ``max(0, 1 + c)``;
* ``off``: plain ``L_clip + α·L_cma``, nothing measured;
* ``block`` (the default): nothing here; the per-parameter-block scheduler
  (:mod:`cmalign.objective.block_scheduler`) lowers the learning rate of conflicting blocks instead. Measured on
  the base at α = 0.5, the embedding-space cosine is ~0.002 (the centroid term's gradient is one row repeated,
  so the cosine is O(1/√n)) and these modes changed nothing; they remain for comparison.

The combined embedding gradient ``g_c + α_eff · g_a'`` is then pushed through the towers in one
backward pass. Every decision is returned for the step log.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cmalign.objective.block_scheduler import NOT_MEASURED, BlockMeasurement
from cmalign.objective.config import MODES, GradSchedulerConfig  # noqa: F401  (re-exported)


@dataclass
class Decision:
    cos: float | None = None  # None: not measured this step (α = 0 or mode off)
    ratio: float | None = None
    alpha: float = 0.0
    alpha_eff: float = 0.0
    lr_scale: float = 1.0
    projected: bool = False
    capped: bool = False
    blocks: BlockMeasurement | None = None  # the block scheduler's measurement, on the steps it measures

    def to_log(self) -> dict:
        return {"grad_cos": self.cos, "grad_ratio": self.ratio, "alpha": self.alpha, "alpha_eff": self.alpha_eff,
                "lr_scale": self.lr_scale, "projected": self.projected, "capped": self.capped,
                **(self.blocks.to_log() if self.blocks else NOT_MEASURED)}


@dataclass
class GradScheduler:
    cfg: GradSchedulerConfig = field(default_factory=GradSchedulerConfig)
    steps_seen: int = 0
    conflicts: int = 0
    caps: int = 0

    def decide(self, dot: float, clip_sq: float, cma_sq: float, alpha: float) -> Decision:
        """The rule, on global (all-rank) sums: <g_c, g_a>, |g_c|², |g_a|²."""
        d = Decision(alpha=alpha, alpha_eff=alpha)
        n_c, n_a = clip_sq**0.5, cma_sq**0.5
        if alpha == 0:
            return d  # nothing to weigh: cos/ratio stay None ("not measured")
        if n_c == 0 or n_a == 0:
            d.cos, d.ratio = 0.0, 0.0
            return d
        d.cos = dot / (n_c * n_a)
        d.ratio = alpha * n_a / n_c
        self.steps_seen += 1
        if d.ratio > self.cfg.max_ratio:
            d.alpha_eff = alpha * self.cfg.max_ratio / d.ratio
            d.capped = True
            self.caps += 1
        if d.cos < 0:
            self.conflicts += 1
            if self.cfg.mode == "project":
                d.projected = True
            elif self.cfg.mode == "lr":
                d.lr_scale = max(self.cfg.min_lr_scale, 1.0 + d.cos)
            elif self.cfg.mode == "alpha":
                d.alpha_eff *= max(0.0, 1.0 + d.cos)
        return d

    def combine(self, g_clip: list[torch.Tensor], g_cma: list[torch.Tensor], d: Decision,
                dot: float, clip_sq: float) -> list[torch.Tensor]:
        """Embedding gradient to push through the towers: g_c + α_eff · (g_a − projection)."""
        coef = dot / clip_sq if d.projected and clip_sq > 0 else 0.0
        return [gc + d.alpha_eff * (ga - coef * gc) for gc, ga in zip(g_clip, g_cma, strict=False)]

    def state_dict(self) -> dict:
        return {"steps_seen": self.steps_seen, "conflicts": self.conflicts, "caps": self.caps}

    def load_state_dict(self, state: dict) -> None:
        self.steps_seen, self.conflicts, self.caps = state["steps_seen"], state["conflicts"], state["caps"]
