"""`cmalign fit`: TPC-CMA fine-tuning of an open_clip model, as a library function.

open_clip's trainer has no hook for a custom loss, so the loop is written here on open_clip's
library API (``create_model_and_transforms``, ``get_tokenizer``, ``ClipLoss``), in the shape of
its trainer: AdamW with its parameter groups, warm-up + cosine lr and clipping
(:mod:`cmalign.train.optimizer`), accumulation, AMP and DDP (:mod:`cmalign.train.distributed`).
What it adds is the TPC-CMA step (:class:`cmalign.objective.step.TPCCMAStep`), the curriculum, a guard
evaluation, and a run directory that can be resumed exactly (:mod:`cmalign.train.run_dir`).

:func:`fit` reads as its three parts: :func:`cmalign.train.setup.set_up` (process group, run
directory, data, model, optimizer, resume state, loader, the "before" guard), :func:`_train_steps`
(one optimizer step per iteration, with logging, guard evaluations and checkpoints) and
:func:`_finish` (the "after" guard, the fitted model, summary and manifest).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

import cmalign
from cmalign.artifacts.atomic import write_json
from cmalign.model.loading import save_local_dir
from cmalign.objective.step import TrainingDiverged
from cmalign.train.config import FitConfig
from cmalign.train.console import FitProgress, alpha_in_paper_units, print_start
from cmalign.train.optimizer import apply_block_scales, clip_gradients, lr_at, step_optimizer
from cmalign.train.run_dir import save_checkpoint
from cmalign.train.setup import FitRun, set_up

# Test hook: SIGKILL this process right after this optimizer step (a real kill -9 at a reproducible point).
_FAULT_KILL_AT_STEP = int(os.environ.get("CMALIGN_FAULT_KILL_AT_STEP", "0"))


@dataclass
class FitResult:
    run_dir: Path
    model_dir: Path
    steps: int
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    skipped_samples: int = 0
    seconds: float = 0.0
    warmup: dict = field(default_factory=dict)  # where the curriculum's warm-up ended, and why


def fit(cfg: FitConfig, resume: bool = False, console=None, show_progress: bool = True) -> FitResult:
    """Fine-tune ``cfg.model`` with TPC-CMA into ``cfg.train.out``; see the module docstring."""
    from rich.console import Console

    cfg.resolve_defaults().validate()
    console = console or Console(stderr=True)
    t_start = time.time()
    r = set_up(cfg, resume, console)
    if r.env.main:
        print_start(console, cfg, r.counts, r.splits, r.guard, r.device, r.precision, r.env, r.workers,
                    r.start_step, float(r.model.logit_scale.detach().exp()))
    progress = FitProgress(console, cfg.train.steps, r.start_step, enabled=show_progress and r.env.main,
                           show_alpha=cfg.alpha_target > 0)
    steps = _train_steps(r, progress)
    return _finish(r, steps, t_start)


# --------------------------------------------------------------------------- steps


def _train_steps(r: FitRun, progress: FitProgress) -> int:
    """Optimizer steps from ``r.start_step`` to the end; returns the last step done."""
    cfg, env = r.cfg, r.env
    r.model.train()
    params = [p for p in r.model.parameters() if p.requires_grad]
    batches = iter(r.loader)
    step = r.start_step
    metrics_f = open(r.run.metrics, "a", buffering=1) if env.main else None
    try:
        with progress:
            while step < cfg.train.steps:
                entry = _optimizer_step(r, step, batches, params)
                step += 1
                if step == _FAULT_KILL_AT_STEP:  # fault injection for the kill -9 resume test
                    os.kill(os.getpid(), 9)
                if metrics_f:
                    metrics_f.write(json.dumps(entry) + "\n")
                if cfg.train.guard and _due(step, cfg.train.guard_every, cfg.train.steps):
                    if env.main:
                        figures = r.run_guard(full=False)
                        metrics_f.write(json.dumps({"step": step, "kind": "guard", **figures}) + "\n")
                        progress.guard(step, figures)
                    env.barrier()
                if _due(step, cfg.train.checkpoint_every, cfg.train.steps):
                    if env.main:
                        r.last_checkpoint = save_checkpoint(r.run, step, r.model, r.optimizer, r.scaler,
                                                            r.scheduler, cfg, cfg.train.keep_checkpoints, r.blocks,
                                                            r.warmup)
                    env.barrier()
                progress.update(step, entry)
    finally:
        if metrics_f:
            metrics_f.close()
    return step


def _due(step: int, every: int, total: int) -> bool:
    """Every ``every`` steps, not at the end (the finish does the final guard and saves the model)."""
    return every > 0 and step % every == 0 and step < total


def _optimizer_step(r: FitRun, step: int, batches, params: list) -> dict:
    """Accumulate ``accum_steps`` micro-batches, update once; returns the step's log row (its step is ``step + 1``)."""
    t0 = time.time()
    cfg, env = r.cfg, r.env
    alpha, phase = r.warmup.alpha_at(step, cfg.alpha_target)
    accum = cfg.optim.accum_steps
    measure = r.blocks is not None and r.blocks.due(step, phase, alpha)  # on the first micro-batch
    alpha_scale = r.blocks.alpha_scale if r.blocks is not None else 1.0  # α_eff = α · alpha_scale
    rows, decisions = [], []
    for micro in range(accum):
        images, tokens, bad = next(batches)
        if bad:
            r.run.add_bad(env.rank, bad, r.bad_seen)
        images, tokens = images.to(r.device, non_blocking=True), tokens.to(r.device, non_blocking=True)
        # under DDP, all-reduce gradients once per optimizer step, not per micro-batch
        sync = nullcontext() if env.world_size == 1 or micro == accum - 1 else r.train_model.no_sync()
        try:
            with sync:
                row, d = r.step_fn(images, tokens, alpha, r.autocast, r.scaler, grad_div=accum,
                                   measure_blocks=measure and micro == 0, alpha_scale=alpha_scale)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"step {step + 1}: {e}. Stopped; last good checkpoint: "
                                   f"{r.last_checkpoint or 'none (no checkpoint written yet)'}. "
                                   "Try a lower --lr or --alpha-target.") from None
        rows.append(row)
        decisions.append(d)
    lr_scale = min(d.lr_scale for d in decisions)
    lr = lr_at(step, cfg) * lr_scale
    grad_norm = clip_gradients(r.optimizer, r.scaler, params, cfg.optim.grad_clip)
    if not math.isfinite(grad_norm) and r.scaler is None:
        raise TrainingDiverged(f"step {step + 1}: gradient norm is {grad_norm}. Stopped; last good "
                               f"checkpoint: {r.last_checkpoint or 'none'}. Try a lower --lr.")
    if r.blocks is not None:
        apply_block_scales(r.optimizer, r.blocks.scales)
    step_optimizer(r.model, r.optimizer, r.scaler, lr, cfg.model.max_logit_scale)

    entry = {"step": step + 1, "kind": "train", "phase": phase, "lr": lr, "grad_norm": grad_norm,
             "logit_scale": float(r.model.logit_scale.detach().exp()), "seconds": time.time() - t0}
    for k in rows[0]:
        entry[k] = sum(row[k] for row in rows) / len(rows)
    dlog = [d.to_log() for d in decisions]
    for k in dlog[0]:
        vals = [x[k] for x in dlog]
        if isinstance(vals[0], bool):
            entry[k] = any(vals)
        else:
            vals = [v for v in vals if v is not None]
            entry[k] = sum(vals) / len(vals) if vals else None
    entry["lr_scale"] = lr_scale
    if r.warmup.warmup_end is None:  # while the gate is open: it reads the contrastive loss
        r.warmup.observe(_mean_over_ranks(entry["clip"], r))
    if r.blocks is not None:
        entry.update(r.blocks.to_log())
    return entry


def _mean_over_ranks(value: float, r: FitRun) -> float:
    """The same figure on every rank, so that every rank ends the warm-up at the same step."""
    if r.env.world_size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=r.device)
    dist.all_reduce(t)
    return float(t.item()) / r.env.world_size


# --------------------------------------------------------------------------- finish


def _finish(r: FitRun, steps: int, t_start: float) -> FitResult:
    """Rank 0: the "after" guard, the fitted model in open_clip's layout, summary.json and manifest.json."""
    cfg, env, run = r.cfg, r.env, r.run
    result = FitResult(run_dir=run.path, model_dir=run.model_dir, steps=steps, before=r.before,
                       skipped_samples=len(r.bad_seen), warmup=_warmup_summary(r))
    if env.main:
        result.after = r.run_guard(full=True)
        save_local_dir(r.model, r.loaded.model_cfg, r.loaded.preprocess_cfg, run.model_dir,
                       extra={"alpha_target": cfg.alpha_target, "config_hash": cfg.hash(),
                              "cmalign_version": cmalign.__version__})
        write_json(run.summary, {"before": r.before, "after": result.after})
        result.seconds = time.time() - t_start
        write_json(run.manifest, {
            "kind": "cmalign-run",
            "cmalign_version": cmalign.__version__,
            "model": cfg.model.name,
            "pretrained": r.pretrained,
            "alpha_target": cfg.alpha_target,
            # the paper's α (its CMA term is not multiplied by the logit scale s): α·s with s at the end of the run
            "alpha_target_paper_units": alpha_in_paper_units(
                cfg.alpha_target, float(r.model.logit_scale.detach().exp()), cfg.loss.scale_by_logit_scale),
            "config_hash": cfg.hash(),
            "steps": steps,
            "world_size": env.world_size,
            "device": str(r.device),
            "precision": r.precision,
            "data": r.splits.description,
            "train_samples": len(r.splits.train),
            "val_images": len(r.guard.images),
            "skipped_samples": len(r.bad_seen),
            "warmup": result.warmup,
            "grad_scheduler": {"mode": cfg.scheduler.mode, **r.scheduler.state_dict(),  # steps, conflicts, caps
                               **(_block_summary(r) if r.blocks is not None else {})},
            "trainable_parameters": r.counts["trainable"],
            "total_parameters": r.counts["total"],
            "seconds": round(result.seconds, 1),
            "versions": {"torch": torch.__version__, "open_clip": _open_clip_version(),
                         "python": sys.version.split()[0], "platform": platform.platform()},
        })
    env.barrier()
    return result


def _block_summary(r: FitRun) -> dict:
    """What the block scheduler did: measurements, throttle events, and over the steps it acted in, the mean
    share of blocks below full learning rate and the lowest scale any block reached (from the step log)."""
    rows = [json.loads(line) for line in r.run.metrics.read_text().splitlines() if line.strip()]
    acting = [row for row in rows if row.get("kind") == "train" and row.get("phase", 0) >= r.cfg.scheduler.from_phase]
    shares = [row["blocks_throttled"] for row in acting if "blocks_throttled" in row]
    return {"block_measurements": r.blocks.measurements, "block_throttles": r.blocks.throttles,
            "blocks": len(r.blocks.blocks),
            "min_alpha_scale_reached": min(r.blocks.min_alpha_scale_seen, 1.0),
            "mean_share_throttled": sum(shares) / len(shares) if shares else 0.0,
            "min_lr_scale_reached": min(r.blocks.min_scale_seen, 1.0)}


def _warmup_summary(r: FitRun) -> dict:
    """Where the warm-up ended, and why: the loss settled, the warm-up hit its maximum, or it was fixed."""
    w, steps = r.warmup, r.cfg.train.steps
    end = w.warmup_end
    return {"ended_at_step": None if end is None else round(end * steps),
            "reason": {True: "settled", False: "warmup_max_fraction", None: "fixed"}[w.settled]
            if end is not None else "not ended"}


def _open_clip_version() -> str:
    import open_clip

    return getattr(open_clip, "__version__", "unknown")
