"""The optimizer side of `fit`, as open_clip's trainer does it: AdamW in its parameter groups, warm-up +
cosine learning rate, gradient clipping, the clamped logit scale.

Kept apart from the loop so the schedule and the update can be read (and tested) without a run around them.
"""

from __future__ import annotations

import math

import torch

from cmalign.model.loading import param_groups
from cmalign.objective.block_scheduler import block_of
from cmalign.train.config import FitConfig


def build_optimizer(model: torch.nn.Module, cfg: FitConfig) -> torch.optim.AdamW:
    """AdamW over open_clip's groups (no weight decay on gains, biases, the logit scale).

    Under the block scheduler each group is further split by parameter block (``group["block"]``), so a block's
    learning rate can be lowered on its own.
    """
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if cfg.scheduler.mode == "block":
        groups = split_by_block(model, groups, cfg.scheduler.blocks)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def split_by_block(model: torch.nn.Module, groups: list[dict], level: str) -> list[dict]:
    block = {id(p): block_of(n, level) for n, p in model.named_parameters()}
    out: dict[tuple, dict] = {}
    for gi, g in enumerate(groups):
        for p in g["params"]:
            key = (block[id(p)], gi)
            out.setdefault(key, {**{k: v for k, v in g.items() if k != "params"}, "params": [], "block": key[0]})
            out[key]["params"].append(p)
    return list(out.values())


def apply_block_scales(optimizer, scales: dict[str, float]) -> None:
    """Give each block's optimizer groups the block scheduler's learning-rate scale for the next update."""
    for g in optimizer.param_groups:
        if "block" in g:
            g["lr_scale"] = scales.get(g["block"], 1.0)


def lr_at(step: int, cfg: FitConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to ``min_lr_ratio``."""
    o = cfg.optim
    return lr_schedule(step, o.lr, o.warmup_steps, o.min_lr_ratio, cfg.train.steps)


def lr_schedule(step: int, lr: float, warmup_steps: int, min_lr_ratio: float, steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` to ``min_lr_ratio × lr`` at ``steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, steps - warmup_steps)
    u = min(1.0, (step - warmup_steps) / span)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * u)))


def clip_gradients(optimizer, scaler, params: list, grad_clip: float) -> float:
    """Unscale (fp16 AMP) and clip the accumulated gradients; returns their global norm before clipping.

    The norm is NaN/inf when the gradients are: a GradScaler then skips the step by itself, without one
    the caller must stop the run.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    # max_norm = inf (grad_clip 0) clips nothing and still returns the total norm
    return float(torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf))


def step_optimizer(model, optimizer, scaler, lr: float, max_logit_scale: float = 100.0) -> None:
    """One update at ``lr`` (× a group's ``lr_scale``, the block scheduler's; through the GradScaler under fp16),
    then zero the gradients, clamp a learnable logit scale at ``max_logit_scale`` (a fixed one stays as set)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if model.logit_scale.requires_grad:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(max_logit_scale))
