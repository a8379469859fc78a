"""Setting up a `fit`: from a config to a model, optimizer, data loader and run directory ready for step one.

The order of these steps is part of the result: the seeds, the model's random init and the data order
depend on it, and a resumed run must retrace it to continue bit for bit (tests/test_resume.py). Data comes
before the model, so a schema problem surfaces before anything is built; the checkpoint is checked against
the config before anything is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmalign.artifacts.atomic import atomic_write, write_json
from cmalign.data.pair_set import PairSet
from cmalign.data.records import BadSampleError
from cmalign.data.splits import load_splits
from cmalign.data.torch_pairs import PairDataset, ResumableBatchSampler, collate_pairs
from cmalign.model.base import resolve_pretrained, wants_base_model
from cmalign.model.loading import load_model, require_softmax_clip, select_trainable
from cmalign.objective.block_scheduler import BlockScheduler, parameter_blocks
from cmalign.objective.cma_loss import CMALoss
from cmalign.objective.curriculum import WarmupGate
from cmalign.objective.grad_scheduler import GradScheduler
from cmalign.objective.step import TPCCMAStep
from cmalign.train.config import FitConfig, to_toml
from cmalign.train.distributed import DistEnv, autocast_for, device_kind, init_distributed, resolve_device
from cmalign.train.guard import guard_metrics
from cmalign.train.optimizer import build_optimizer
from cmalign.train.run_dir import (
    RunDir,
    RunDirectoryError,
    default_run_dir,
    load_checkpoint_state,
    set_rng_state,
)

log = logging.getLogger("cmalign.train.setup")


@dataclass
class FitRun:
    """A fit as :func:`set_up` built it: what the steps and the finish work on."""

    cfg: FitConfig
    env: DistEnv
    device: torch.device
    autocast: Callable  # context-manager factory
    scaler: Any  # GradScaler under fp16 AMP, else None
    precision: str
    run: RunDir
    splits: Any
    loaded: Any  # cmalign.model.loading.LoadedModel
    pretrained: str | None  # what the model was loaded from (None: random init)
    counts: dict  # trainable / total parameters
    optimizer: torch.optim.Optimizer
    scheduler: GradScheduler
    blocks: BlockScheduler | None  # the per-block scheduler (scheduler mode "block")
    warmup: WarmupGate  # when the curriculum's warm-up ends
    train_model: torch.nn.Module  # the model, DDP-wrapped under torchrun
    step_fn: TPCCMAStep
    loader: Any
    workers: int
    guard: PairSet | None  # rank 0 only
    start_step: int
    bad_seen: set[str]
    last_checkpoint: Path | None = None
    before: dict = field(default_factory=dict)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def run_guard(self, full: bool) -> dict:
        m = guard_metrics(self.model, self.guard, self.loaded.preprocess_val, self.loaded.tokenizer, self.device,
                          full=full, autocast=self.autocast)
        self.model.train()
        return m


def set_up(cfg: FitConfig, resume: bool, console) -> FitRun:
    """Everything up to the first step, in the order a resumed run must retrace; rank 0 also runs the "before" guard."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    env = init_distributed(device_kind(cfg.train.device))
    device = resolve_device(cfg.train.device, env)
    autocast, scaler, precision = autocast_for(device, cfg.train.precision)
    run, state = _open_run_dir(cfg, env, resume)

    # Data first: schema problems must surface before any model is built or trained.
    splits = load_splits(cfg.data)
    if splits.skipped and cfg.data.on_bad_sample == "fail":
        s = splits.skipped[0]
        raise BadSampleError(f"{s.source}: field '{s.field}': {s.reason} "
                             f"({len(splits.skipped)} bad samples; --on-bad-sample skip would skip them)")

    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    pretrained = _pretrained(cfg, env, console)
    loaded, counts = _build_model(cfg, pretrained, device)
    optimizer = build_optimizer(loaded.model, cfg)
    scheduler = GradScheduler(cfg.scheduler)
    blocks = (BlockScheduler(cfg.scheduler, list(parameter_blocks(loaded.model.named_parameters(),
                                                                  cfg.scheduler.blocks)))
              if cfg.scheduler.mode == "block" else None)
    warmup = WarmupGate(cfg.curriculum, cfg.train.steps)
    start_step, bad_seen = _restore(state, run, env, loaded.model, optimizer, scaler, scheduler, blocks, warmup)
    if env.main:  # only once the model is built: a fit whose set-up fails leaves no run directory behind
        run.path.mkdir(parents=True, exist_ok=True)
        with atomic_write(run.path / "config.toml") as f:
            f.write(to_toml(cfg))
    if env.main and splits.skipped:
        run.add_bad(env.rank, [b.to_dict() for b in splits.skipped], bad_seen)

    train_model = loaded.model
    if env.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            loaded.model, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn = TPCCMAStep(train_model, CMALoss(cfg.loss, rank=env.rank, world_size=env.world_size), scheduler,
                         env.world_size, blocks)
    workers = _num_workers(cfg)
    loader = _loader(cfg, splits, loaded, env, device, start_step, workers)
    # only rank 0 evaluates (it decodes every validation image once to drop unreadable ones)
    guard = PairSet.from_records(splits.val, splits.class_templates, cfg.data.val_max_images) if env.main else None
    r = FitRun(cfg=cfg, env=env, device=device, autocast=autocast, scaler=scaler, precision=precision, run=run,
               splits=splits, loaded=loaded, pretrained=pretrained, counts=counts, optimizer=optimizer,
               scheduler=scheduler, blocks=blocks, warmup=warmup, train_model=train_model, step_fn=step_fn,
               loader=loader, workers=workers, guard=guard, start_step=start_step, bad_seen=bad_seen,
               last_checkpoint=run.checkpoints()[-1] if run.checkpoints() else None)
    if env.main:
        if state is not None and run.summary.exists():
            r.before = json.loads(run.summary.read_text()).get("before", {})
        else:
            r.before = r.run_guard(full=True)
            write_json(run.summary, {"before": r.before})
    env.barrier()
    return r


def _open_run_dir(cfg: FitConfig, env: DistEnv, resume: bool) -> tuple[RunDir, dict | None]:
    """The run directory, and with ``resume`` its last checkpoint (which must be of this very config)."""
    if cfg.train.out is None:
        if env.world_size > 1 or resume:
            raise RunDirectoryError("pass --out RUN (under torchrun every rank must name the same directory)")
        cfg.train.out = default_run_dir(cfg)
    run = RunDir(cfg.train.out)
    state = None
    if resume:
        state = load_checkpoint_state(run)
        if state is None:
            hint = ("; the fit stopped before its first one, so it is not a run yet: start it again without --resume"
                    if not run.has_run() else "")
            raise RunDirectoryError(f"--resume: no checkpoint found in {run.ckpt_dir}{hint}")
        if state["config_hash"] != cfg.hash():
            raise RunDirectoryError(
                f"--resume: the config differs from the one {run.path} was started with "
                f"(hash {cfg.hash()} vs {state['config_hash']}); resume with the run's own config.toml")
    elif run.has_run():
        raise RunDirectoryError(f"{run.path} already holds a run; pass --resume to continue it, "
                                "or choose another --out")
    return run, state


def _pretrained(cfg: FitConfig, env: DistEnv, console) -> str | None:
    """The weights to start from; rank 0 builds the embedded base (once, cached) while the others wait."""
    name, pretrained = cfg.model.name, cfg.model.pretrained
    if wants_base_model(name, pretrained):
        if env.main:
            resolve_pretrained(name, pretrained, console=console)
        env.barrier()
    elif pretrained is None and not name.startswith(("local-dir:", "hf-hub:")):
        log.warning("no --pretrained given for %s: starting from random weights. TPC-CMA is meant to "
                    "fine-tune a pretrained CLIP; pass a tag or a checkpoint file.", name)
    return resolve_pretrained(name, pretrained)


def _build_model(cfg: FitConfig, pretrained: str | None, device):
    """(LoadedModel, parameter counts): loaded, checked, partly frozen as the config says."""
    loaded = load_model(cfg.model.name, pretrained, device=device)
    model = loaded.model
    require_softmax_clip(model, cfg.model.name)
    counts = select_trainable(model, cfg.model.trainable)
    if cfg.model.fixed_logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.model.fixed_logit_scale))
        model.logit_scale.requires_grad_(False)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return loaded, counts


def _restore(state: dict | None, run: RunDir, env: DistEnv, model, optimizer, scaler,
             scheduler: GradScheduler, blocks: BlockScheduler | None, warmup: WarmupGate) -> tuple[int, set[str]]:
    """(first step, bad samples listed so far): from the checkpoint, or a clean log for a new run."""
    if state is None:
        if env.main:
            run.metrics.unlink(missing_ok=True)
        run.bad_file(env.rank).unlink(missing_ok=True)
        return 0, set()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    scheduler.load_state_dict(state["grad_scheduler"])
    if blocks is not None:
        blocks.load_state_dict(state["block_scheduler"])
    if "warmup" in state:  # checkpoints of a fixed warm-up (and of earlier versions) carry none: nothing to restore
        warmup.load_state_dict(state["warmup"])
    if state.get("world_size", 1) != env.world_size:
        raise RunDirectoryError(
            f"--resume: {run.path} was trained with {state.get('world_size', 1)} processes, now "
            f"{env.world_size}; the data order and global batch depend on it, resume with the same count")
    bad_seen = run.listed_bad(env.rank)
    set_rng_state(state["rng"])
    if env.main:
        run.truncate_metrics(state["step"])
    return state["step"], bad_seen


def _num_workers(cfg: FitConfig) -> int:
    if cfg.data.num_workers >= 0:
        return cfg.data.num_workers
    cpus = os.cpu_count() or 1
    return 1 if cpus <= 2 else min(8, cpus - 1)  # one worker still overlaps decoding with compute


def _loader(cfg: FitConfig, splits, loaded, env: DistEnv, device, start_step: int, workers: int):
    """Micro-batches in a seeded order that continues where ``start_step`` left off."""
    accum = cfg.optim.accum_steps
    dataset = PairDataset(splits.train, loaded.preprocess_train, loaded.tokenizer, seed=cfg.train.seed,
                          on_bad_sample=cfg.data.on_bad_sample)
    sampler = ResumableBatchSampler(len(dataset), cfg.train.batch_size, seed=cfg.train.seed, rank=env.rank,
                                    world_size=env.world_size, start=start_step * accum,
                                    total=cfg.train.steps * accum)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       collate_fn=collate_pairs, pin_memory=device.type == "cuda",
                                       persistent_workers=False)
