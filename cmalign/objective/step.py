"""One TPC-CMA micro-batch step: forward, the two losses, their gradient-aware combination, backward.

This is the method itself (docs/method.md): the contrastive and alignment gradients are taken separately
on the features, measured against each other over all ranks, and combined by the scheduler before they
reach the parameters. The trainer around it (optimizer, accumulation, DDP, checkpoints) is in
:mod:`cmalign.train`; benchmarks and tests drive this step directly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cmalign.errors import CmalignError
from cmalign.objective.cma_loss import CMALoss
from cmalign.objective.grad_scheduler import Decision, GradScheduler


class TrainingDiverged(CmalignError, RuntimeError):
    """Loss or gradients became NaN/inf; the run stops and keeps its last good checkpoint."""


class TPCCMAStep:
    """Forward, losses, gradient-aware combination, backward — for one micro-batch."""

    def __init__(self, model, loss: CMALoss, scheduler: GradScheduler, world_size: int = 1):
        self.model, self.loss, self.scheduler, self.world_size = model, loss, scheduler, world_size

    def _global_sums(self, g_clip, g_cma) -> tuple[float, float, float]:
        sums = torch.stack([
            sum((a.float() * b.float()).sum() for a, b in zip(g_clip, g_cma, strict=False)),
            sum((a.float() ** 2).sum() for a in g_clip),
            sum((b.float() ** 2).sum() for b in g_cma),
        ]).double()
        if self.world_size > 1:
            dist.all_reduce(sums)
        dot, clip_sq, cma_sq = sums.tolist()
        return dot, clip_sq, cma_sq

    def __call__(self, images, tokens, alpha: float, autocast, scaler=None, grad_div: float = 1.0):
        """Accumulate this micro-batch's gradients (divided by ``grad_div``); returns (loss row, decision).

        ``autocast`` is a context-manager factory; ``scaler`` a GradScaler under fp16 AMP.
        """
        with autocast():
            out = self.model(images, tokens)
        fi, ft, ls = out[0], out[1], out[2]
        losses = self.loss(fi.float(), ft.float(), ls.float(), alpha)
        total = losses["total"]
        if not torch.isfinite(total):
            raise TrainingDiverged(f"loss is {total.item()} (clip {losses['clip'].item():.4g}, "
                                   f"cma {losses['cma'].item():.4g})")
        scaled = scaler.scale if scaler is not None else (lambda t: t)  # fp16 AMP: GradScaler owns the scale
        if alpha == 0 or self.scheduler.cfg.mode == "off":
            (scaled(total) / grad_div).backward()
            d = Decision(alpha=alpha, alpha_eff=alpha)
        else:
            # A frozen tower (or a fixed logit scale) gives outputs without grad: leave them out.
            feats = [f for f in (fi, ft) if f.requires_grad]
            outs = feats + ([ls] if ls.requires_grad else [])
            g_clip = torch.autograd.grad(scaled(losses["clip"]), outs, retain_graph=True)
            g_cma = torch.autograd.grad(scaled(losses["cma"]), feats, retain_graph=True)
            k = len(feats)
            dot, clip_sq, cma_sq = self._global_sums(g_clip[:k], g_cma)
            d = self.scheduler.decide(dot, clip_sq, cma_sq, alpha)
            g = self.scheduler.combine(list(g_clip[:k]), list(g_cma), d, dot, clip_sq) + list(g_clip[k:])
            torch.autograd.backward(outs, [x / grad_div for x in g])
        row = {k: float(v.detach()) for k, v in losses.items()}
        row["total"] = row["clip"] + d.alpha_eff * row["cma"]
        return row, d
