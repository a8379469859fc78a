"""The method's own settings (the CMA loss, the gradient-aware scheduler), apart from the torch code using them.

They are sections of fit's configuration (``[loss]``, ``[scheduler]`` in RUN/config.toml), and reading a
config (and every CLI command's help) must import no torch, so they live here rather than beside
:mod:`cmalign.objective.cma_loss` and :mod:`cmalign.objective.grad_scheduler`. Field names are TOML keys
and part of the config hash: renaming one breaks every existing run directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cmalign.errors import ConfigError

DISTRIBUTION_TERMS = ("mmd", "coral", "bures")
# Keys added to a section after config files of it were written: a *complete* section written without them (a
# RUN/config.toml of an earlier version, recognised by a key cmalign always writes) meant these values.
LEGACY_DEFAULTS = {"loss": ("scale_by_logit_scale", {"lambda_paired": 0.0, "text_share": 1.0}),
                   "scheduler": ("mode", {"balance_ratio": 0.0}),
                   "curriculum": ("ramp", {"settle_tolerance": 0.0})}
# The warm-up's settle gate: at settle_tolerance 0 a fixed warm-up, and its other keys are not read.
SETTLE_SETTINGS = ("settle_tolerance", "settle_window", "warmup_max_fraction")


def legacy_settings(saved: dict) -> dict[str, dict]:
    """Per section of a saved config, the values its missing LEGACY_DEFAULTS keys meant when it was written."""
    out = {}
    for section, (always_written, added) in LEGACY_DEFAULTS.items():
        table = saved.get(section)
        if isinstance(table, dict) and always_written in table:
            out[section] = {k: v for k, v in added.items() if k not in table}
    return out


def drop_inert_settings(d: dict) -> dict:
    """``d`` (a config as a dict) without the objective's settings that sit at their "off" value and did not exist
    when earlier runs were written (the α balance, the settle gate, both towers moved alike): those runs keep their
    identity."""
    if d["loss"].get("text_share") == 1.0:
        d["loss"].pop("text_share", None)
    if not d["scheduler"].get("balance_ratio"):
        d["scheduler"].pop("balance_ratio", None)
    if not d["curriculum"].get("settle_tolerance"):
        for k in SETTLE_SETTINGS:
            d["curriculum"].pop(k, None)
    return d


MODES = ("block", "project", "lr", "alpha", "off")  # gradient-aware scheduler modes
BLOCK_LEVELS = ("layer", "tensor")
# Settings only the block scheduler reads: inert in the other modes, so a run's identity (its config hash) leaves
# them out there, and configs written before they existed keep their hashes.
BLOCK_ONLY_SETTINGS = ("every", "from_phase", "conflict_cos", "block_max_ratio", "recovery", "blocks", "balance_ratio")


@dataclass
class CMAConfig:
    lambda_centroid: float = 1.0
    # MMD² of a real gap is ~50× smaller than its centroid² (0.015 vs 0.7 on the default base), so
    # the distribution term gets the larger weight; with 1.0 it barely moved (README, "Measured").
    lambda_distribution: float = 10.0
    distribution: str = "mmd"  # mmd | coral | bures
    # Paired residual G_P² = mean ||x̃_i − ỹ_i||² (the centred pairs' distance; G_R² = G_C² + G_P²). Not in the paper:
    # once the centroid and distribution terms are at their floor (−98 %, −99 %) the residual was 99.7 % of what was
    # left of the raw gap, and only this term reaches it. On the default base (300 steps, α = 0.5, seed 0) the raw
    # gap fell 66 % without it, 83 / 85 / 89 % at 1 / 1.5 / 3; R@1 and zero-shot were the same at 1 and 3
    # (docs/method.md). With text_share 0.25 the text tower moves less, and 5 closes 87 % (3 with both towers moved
    # alike: 89 %). 0 is the paper's loss, and leaves the term out of a run's identity; a config file written before the
    # term existed means 0 (see LEGACY_DEFAULTS).
    lambda_paired: float = 5.0
    # The share of the alignment terms' gradient that reaches the text tower (the image tower gets all of it); the
    # terms' values are unchanged. Not in the paper (1: both towers alike). Moving the text tower is what cost
    # text→image R@1: on the default base (300 steps, α = 0.5, seed 0) t→i R@1 was 0.136 at 1 (λ_p 3), 0.148 at 0.25
    # (λ_p 5), 0.153 at 0 (α = 0: 0.153); but at 0 the image tower alone closed 72 % of the raw gap (docs/method.md).
    # A config file written before the setting existed means 1 (see LEGACY_DEFAULTS).
    text_share: float = 0.25
    mmd_bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    # Measure the CMA term in logit units (× the detached logit scale, 100 for a trained CLIP), as
    # the contrastive logits are: otherwise its gradients are ~100× weaker than InfoNCE's and α
    # would need to be in the tens to matter, unlike the paper's 0.05–0.5.
    scale_by_logit_scale: bool = True

    def __post_init__(self):
        if self.distribution not in DISTRIBUTION_TERMS:
            raise ConfigError(f"distribution term must be one of {', '.join(DISTRIBUTION_TERMS)}, "
                             f"got '{self.distribution}'")
        for name in ("lambda_centroid", "lambda_distribution", "lambda_paired"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"loss.{name} must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.text_share) and 0 <= self.text_share <= 1):
            raise ConfigError(f"loss.text_share must be in [0, 1] (the share of the alignment gradient the text tower "
                              f"gets), got {self.text_share}")
        bandwidths = tuple(self.mmd_bandwidths)
        if not bandwidths or not all(math.isfinite(b) and b > 0 for b in bandwidths):
            raise ConfigError("loss.mmd_bandwidths must be one or more finite numbers > 0 (multiples of the median "
                              f"pairwise distance), got {bandwidths}")


@dataclass
class GradSchedulerConfig:
    """``block`` (default): per parameter block, lower the learning rate of conflicting blocks
    (:mod:`cmalign.objective.block_scheduler`); ``project`` / ``lr`` / ``alpha``: the embedding-space variants
    (:mod:`cmalign.objective.grad_scheduler`); ``off``: plain L_clip + α·L_cma."""

    mode: str = "block"
    max_ratio: float = 1.0  # embedding modes: cap of α·|g_cma| / |g_clip| at the embeddings
    min_lr_scale: float = 0.25  # floor of a throttled learning-rate scale
    every: int = 10  # block: measure every this many optimizer steps
    from_phase: int = 3  # block: acts from this curriculum phase on (the paper: phase 3)
    conflict_cos: float = 0.0  # block: a block conflicts when its cosine is below −conflict_cos
    # block: ρ, throttle a block whose α·|g_cma| exceeds this times |g_clip|. At 1 (the embedding modes' cap) it
    # throttled 92 % of the base's blocks through phase 3 at α = 0.5 (ratios 2–8): a brake on the whole model that
    # slowed alignment (120-step joint-index partner hits 0.2 % vs 2.8 %); at 10 it leaves the throttling to conflicts.
    block_max_ratio: float = 10.0
    recovery: float = 0.5  # block: per measurement, a scale moves this share of the way back up to its target
    blocks: str = "layer"  # block: "layer" (one transformer layer / module) or "tensor"
    # block: ρ_α, the most the alignment gradient may outweigh the contrastive one over the whole model
    # (α·|g_cma| / |g_clip|); above it α itself is scaled down (α_eff = α·ρ_α/R), recovering like the lr scales.
    # 0: off, the default: it lifted neither t→i R@1 nor, alone, a short run on a new domain (docs/method.md); and
    # what configs written before it mean.
    balance_ratio: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"scheduler mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if not (math.isfinite(self.max_ratio) and self.max_ratio > 0):
            raise ConfigError(f"scheduler.max_ratio must be a finite number > 0, got {self.max_ratio}")
        if not 0 < self.min_lr_scale <= 1:
            raise ConfigError(f"scheduler.min_lr_scale must be in (0, 1], got {self.min_lr_scale}")
        if not (isinstance(self.every, int) and self.every >= 1):
            raise ConfigError(f"scheduler.every must be a whole number >= 1, got {self.every}")
        if self.from_phase not in (1, 2, 3):
            raise ConfigError(f"scheduler.from_phase must be 1, 2 or 3, got {self.from_phase}")
        if not (math.isfinite(self.block_max_ratio) and self.block_max_ratio > 0):
            raise ConfigError(f"scheduler.block_max_ratio must be a finite number > 0, got {self.block_max_ratio}")
        if not 0 <= self.conflict_cos < 1:
            raise ConfigError(f"scheduler.conflict_cos must be in [0, 1), got {self.conflict_cos}")
        if not (math.isfinite(self.balance_ratio) and self.balance_ratio >= 0):
            raise ConfigError(f"scheduler.balance_ratio must be a finite number >= 0 (0: off), "
                              f"got {self.balance_ratio}")
        if not 0 < self.recovery <= 1:
            raise ConfigError(f"scheduler.recovery must be in (0, 1], got {self.recovery}")
        if self.blocks not in BLOCK_LEVELS:
            raise ConfigError(f"scheduler.blocks must be one of {', '.join(BLOCK_LEVELS)}, got '{self.blocks}'")
