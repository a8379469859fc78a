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
from cmalign.objective.block_scheduler import BlockScheduler, block_of
from cmalign.objective.cma_loss import CMALoss
from cmalign.objective.grad_scheduler import Decision, GradScheduler


class TrainingDiverged(CmalignError, RuntimeError):
    """Loss or gradients became NaN/inf; the run stops and keeps its last good checkpoint."""


class TPCCMAStep:
    """Forward, losses, gradient-aware combination, backward — for one micro-batch."""

    def __init__(self, model, loss: CMALoss, scheduler: GradScheduler, world_size: int = 1,
                 blocks: BlockScheduler | None = None):
        self.model, self.loss, self.scheduler, self.world_size = model, loss, scheduler, world_size
        self.blocks = blocks
        named = [(n, p) for n, p in getattr(model, "module", model).named_parameters() if p.requires_grad]
        self._params = [p for _, p in named]
        self._param_blocks = [block_of(n, scheduler.cfg.blocks) for n, _ in named]

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

    def __call__(self, images, tokens, alpha: float, autocast, scaler=None, grad_div: float = 1.0,
                 measure_blocks: bool = False, alpha_scale: float = 1.0):
        """Accumulate this micro-batch's gradients (divided by ``grad_div``); returns (loss row, decision).

        ``autocast`` is a context-manager factory; ``scaler`` a GradScaler under fp16 AMP. ``measure_blocks``:
        take the two losses' parameter gradients apart and update the block scheduler's learning-rate scales.
        ``alpha_scale``: the block scheduler's balance, α_eff = α · alpha_scale.
        """
        nominal, alpha = alpha, alpha * alpha_scale
        with autocast():
            out = self.model(images, tokens)
        fi, ft, ls = out[0], out[1], out[2]
        losses = self.loss(fi.float(), ft.float(), ls.float(), alpha)
        total = losses["total"]
        if not torch.isfinite(total):
            raise TrainingDiverged(f"loss is {total.item()} (clip {losses['clip'].item():.4g}, "
                                   f"cma {losses['cma'].item():.4g})")
        scaled = scaler.scale if scaler is not None else (lambda t: t)  # fp16 AMP: GradScaler owns the scale
        if measure_blocks and alpha > 0 and self.blocks is not None:
            d = Decision(alpha=nominal, alpha_eff=alpha)
            d.blocks = self._measure_blocks(losses, alpha, scaled, grad_div)
        elif alpha == 0 or self.scheduler.cfg.mode in ("off", "block"):
            (scaled(total) / grad_div).backward()
            d = Decision(alpha=nominal, alpha_eff=alpha)
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

    def _measure_blocks(self, losses: dict, alpha: float, scaled, grad_div: float):
        """Both losses' parameter gradients, apart: per-block sums for the scheduler, and this micro-batch's update.

        Two backward passes instead of one (every ``every`` steps). On one process their sum is accumulated into
        ``.grad`` directly; under DDP the gradients are averaged over ranks for the measurement and a third,
        ordinary backward lets DDP reduce the update as on every other step.
        """
        ddp = self.world_size > 1
        params = self._params
        g_clip = torch.autograd.grad(scaled(losses["clip"]), params, retain_graph=True, allow_unused=True)
        g_cma = torch.autograd.grad(scaled(losses["cma"]), params, retain_graph=ddp, allow_unused=True)
        g_clip = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_clip, strict=True)]
        g_cma = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_cma, strict=True)]
        if ddp:
            for grads in (g_clip, g_cma):
                flat = torch.cat([g.reshape(-1).float() for g in grads])
                dist.all_reduce(flat)
                flat /= self.world_size
                grads[:] = [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)]
        per_param = torch.stack([torch.stack([(a.float() * b.float()).sum(), (a.float() ** 2).sum(),
                                              (b.float() ** 2).sum()]) for a, b in zip(g_clip, g_cma, strict=True)])
        sums: dict[str, list[float]] = {}
        for block, (dot, cc, aa) in zip(self._param_blocks, per_param.double().tolist(), strict=True):
            acc = sums.setdefault(block, [0.0, 0.0, 0.0])
            acc[0] += dot
            acc[1] += cc
            acc[2] += aa
        measurement = self.blocks.update({b: tuple(v) for b, v in sums.items()}, alpha)
        if ddp:
            (scaled(losses["total"]) / grad_div).backward()
        else:
            with torch.no_grad():  # in place: the measured gradients are not needed again
                for p, gc, ga in zip(params, g_clip, g_cma, strict=True):
                    g = gc.add_(ga, alpha=alpha)
                    if grad_div != 1:
                        g.div_(grad_div)
                    p.grad = g if p.grad is None else p.grad.add_(g)
        return measurement
