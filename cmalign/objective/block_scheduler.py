"""The gradient-aware scheduler of TPC-CMA, per parameter block: lower the learning rate where alignment fights.

In phase 3 the paper's scheduler compares the norms and directions of the contrastive and the alignment
gradients and *temporarily lowers the learning rate of the problematic parameters*. Every ``every`` optimizer
steps, on one micro-batch, :class:`cmalign.objective.step.TPCCMAStep` takes g_c = ∂L_clip/∂θ and
g_a = ∂L_cma/∂θ separately and hands their per-block sums here. For each block p (a transformer layer, or one
tensor: ``blocks = "layer" | "tensor"``):

* cosine ``c_p = <g_c,p, g_a,p> / (|g_c,p| |g_a,p|)``, ratio ``r_p = α |g_a,p| / |g_c,p|``;
* target scale ``t_p = 1``; on conflict (``c_p < −conflict_cos``) ``t_p = max(min_lr_scale, 1 + c_p)``; when the
  alignment gradient dwarfs the contrastive one (``r_p > block_max_ratio``) ``t_p = min(t_p, max(min_lr_scale,
  block_max_ratio / r_p))``;
* the block's learning-rate scale drops to ``t_p`` at once and recovers towards it by ``recovery`` of the
  distance per measurement (an EMA), so a passing conflict does not leave a block slowed for the rest of the run.

Over the whole model, when the alignment gradient outweighs the contrastive one by more than ``balance_ratio``
(``R = α |g_a| / |g_c| > ρ_α``), α itself is scaled (``α_eff = α · alpha_scale``, target ``ρ_α / R``), dropping at
once and recovering like the block scales. Why: a lower learning rate slows both terms alike, and Adam follows
the sum's direction, which is the alignment's when α·g_a dwarfs g_c whatever the rate (on a new domain, 60 steps
of negatives, the contrastive loss stalled at 4.4 under α = 0.5, 2.7 at α = 0, with the block scales at 0.48).
Opt-in: measured, it did not save that run alone (its first measurement comes after phase 3's ramp); the
curriculum's settle gate (:class:`cmalign.objective.curriculum.WarmupGate`) did.

The scales hold between measurements and multiply the block's optimizer-group learning rate
(:func:`cmalign.train.optimizer.step_optimizer`). The measurement was once taken on the batch *embeddings*
(:mod:`cmalign.objective.grad_scheduler`): there the centroid term's gradient is the same row for every sample,
the cosine is O(1/√n), and the scheduler never acted; per parameter block the same gradients conflict strongly
(cosines to −0.6 on the base at α = 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cmalign.objective.config import BLOCK_LEVELS, GradSchedulerConfig  # noqa: F401  (re-exported)


def block_of(name: str, level: str = "layer") -> str:
    """The block a parameter belongs to: its transformer layer (``…resblocks.N``) or its module; or itself."""
    if level == "tensor":
        return name
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "resblocks":
            return ".".join(parts[:i + 2])
    return ".".join(parts[:-1]) or name


def parameter_blocks(named_parameters, level: str = "layer") -> dict[str, list[str]]:
    """{block: [parameter names]} over the trainable parameters, in model order."""
    blocks: dict[str, list[str]] = {}
    for name, p in named_parameters:
        if p.requires_grad:
            blocks.setdefault(block_of(name, level), []).append(name)
    return blocks


@dataclass
class BlockMeasurement:
    """One measurement: per block (cos, ratio), and the scales it left."""

    cos: dict[str, float | None]
    ratio: dict[str, float]
    model_ratio: float | None = None  # α·|g_a| / |g_c| over the whole model, at the α that acted
    model_cos: float | None = None  # cosine of g_c and g_a over the whole model

    def to_log(self) -> dict:
        cos = [c for c in self.cos.values() if c is not None]
        return {"block_cos_min": min(cos) if cos else None,
                "block_conflict_share": sum(c < 0 for c in cos) / len(cos) if cos else None,
                "block_ratio_max": max(self.ratio.values()) if self.ratio else None,
                "model_ratio": self.model_ratio, "model_cos": self.model_cos}


NOT_MEASURED = {"block_cos_min": None, "block_conflict_share": None, "block_ratio_max": None,  # a step's log row
                "model_ratio": None, "model_cos": None}


@dataclass
class BlockScheduler:
    cfg: GradSchedulerConfig
    blocks: list[str]
    scales: dict[str, float] = field(default_factory=dict)
    measurements: int = 0
    throttles: int = 0  # block-measurements that lowered a scale
    min_scale_seen: float = 1.0
    alpha_scale: float = 1.0  # α_eff / α, lowered when the alignment gradient outweighs the contrastive one
    min_alpha_scale_seen: float = 1.0

    def __post_init__(self):
        self.scales = {b: self.scales.get(b, 1.0) for b in self.blocks}

    def due(self, step: int, phase: int, alpha: float) -> bool:
        """Measure at this optimizer step (0-based)? Every ``every`` steps of the phases it acts in, α > 0."""
        c = self.cfg
        return c.mode == "block" and alpha > 0 and phase >= c.from_phase and step % c.every == 0

    def update(self, sums: dict[str, tuple[float, float, float]], alpha: float) -> BlockMeasurement:
        """Apply one measurement: ``sums[block] = (<g_c, g_a>, |g_c|², |g_a|²)`` over all ranks; ``alpha`` is the
        α that weighted the alignment term this step (α_eff)."""
        c = self.cfg
        self.measurements += 1
        cos, ratio = {}, {}
        finite = {b: v for b, v in sums.items() if all(math.isfinite(x) for x in v)}  # fp16 overflow: says nothing
        dot, total_c, total_a = (sum(v[i] for v in finite.values()) for i in range(3))
        model_ratio = alpha * math.sqrt(total_a / total_c) if total_c > 0 else None
        model_cos = dot / math.sqrt(total_c * total_a) if total_c > 0 and total_a > 0 else None
        if c.balance_ratio > 0 and model_ratio is not None:
            # the α scale at which R would be ρ_α, never above 1
            target = min(1.0, self.alpha_scale * c.balance_ratio / model_ratio) if model_ratio > 0 else 1.0
            if target < self.alpha_scale:
                self.alpha_scale = target
                self.min_alpha_scale_seen = min(self.min_alpha_scale_seen, target)
            else:
                self.alpha_scale += c.recovery * (target - self.alpha_scale)
        for block, (dot, clip_sq, cma_sq) in finite.items():
            n_c, n_a = math.sqrt(clip_sq), math.sqrt(cma_sq)
            if n_a == 0:
                cos[block], ratio[block] = None, 0.0  # the alignment term does not reach it (e.g. logit_scale)
                target = 1.0
            elif n_c == 0:
                cos[block], ratio[block] = None, math.inf
                target = c.min_lr_scale
            else:
                cos[block], ratio[block] = dot / (n_c * n_a), alpha * n_a / n_c
                target = 1.0
                if cos[block] < -c.conflict_cos:
                    target = max(c.min_lr_scale, 1.0 + cos[block])
                if ratio[block] > c.block_max_ratio:
                    target = min(target, max(c.min_lr_scale, c.block_max_ratio / ratio[block]))
            old = self.scales[block]
            if target < old:
                self.scales[block] = target
                self.throttles += 1
                self.min_scale_seen = min(self.min_scale_seen, target)
            else:
                self.scales[block] = old + c.recovery * (target - old)
        return BlockMeasurement(cos=cos, ratio=ratio, model_ratio=model_ratio, model_cos=model_cos)

    def to_log(self) -> dict:
        """Per step: the share of blocks running below full learning rate, and the mean scale."""
        vals = list(self.scales.values())
        return {"blocks_throttled": sum(v < 1.0 - 1e-9 for v in vals) / len(vals) if vals else 0.0,
                "block_lr_scale_mean": sum(vals) / len(vals) if vals else 1.0,
                "alpha_scale": self.alpha_scale}

    def state_dict(self) -> dict:
        return {"scales": dict(self.scales), "measurements": self.measurements, "throttles": self.throttles,
                "min_scale_seen": self.min_scale_seen, "alpha_scale": self.alpha_scale,
                "min_alpha_scale_seen": self.min_alpha_scale_seen}

    def load_state_dict(self, state: dict) -> None:
        self.scales = {b: float(state["scales"].get(b, 1.0)) for b in self.blocks}
        self.measurements, self.throttles = int(state["measurements"]), int(state["throttles"])
        self.min_scale_seen = float(state["min_scale_seen"])
        # checkpoints written before the α balance existed: α was never scaled
        self.alpha_scale = float(state.get("alpha_scale", 1.0))
        self.min_alpha_scale_seen = float(state.get("min_alpha_scale_seen", 1.0))
