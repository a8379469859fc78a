"""`cmalign fit`: TPC-CMA fine-tuning of an open_clip model, as a library function.

open_clip's trainer has no hook for a custom loss, so the loop is written here on open_clip's
library API (``create_model_and_transforms``, ``get_tokenizer``, ``ClipLoss``), in the shape of
its trainer: AdamW with its parameter groups, warm-up + cosine lr, accumulation, clipping, AMP,
DDP. What it adds is the TPC-CMA step (:class:`TPCCMAStep`), the curriculum, a guard evaluation,
and a run directory that can be resumed exactly::

    RUN/config.toml            resolved config
    RUN/metrics.jsonl          one row per step (losses, α, scheduler decisions, lr) + guard rows
    RUN/bad_samples.jsonl      skipped samples: source, field, reason
    RUN/checkpoints/step_*.pt  resume state, written atomically
    RUN/model/                 open_clip local-dir layout: create_model_and_transforms("local-dir:RUN/model")
    RUN/summary.json           gaps and guard figures before/after
    RUN/manifest.json          what made this run
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import cmalign
from cmalign.artifacts.atomic import atomic_write, write_json
from cmalign.data.records import BadSampleError
from cmalign.data.splits import load_splits
from cmalign.data.torch_pairs import PairDataset, ResumableBatchSampler, collate_pairs
from cmalign.errors import CmalignError, ConfigError
from cmalign.model.loading import load_model, param_groups, save_local_dir, select_trainable
from cmalign.objective.cma_loss import CMALoss
from cmalign.objective.curriculum import alpha_at
from cmalign.objective.grad_scheduler import Decision, GradScheduler
from cmalign.train.config import FitConfig, to_toml
from cmalign.train.guard import GuardSet, guard_metrics

log = logging.getLogger("cmalign.train.loop")
LOGIT_SCALE_MAX = math.log(100.0)
# Test hook: SIGKILL this process right after this optimizer step (a real kill -9 at a reproducible point).
_FAULT_KILL_AT_STEP = int(os.environ.get("CMALIGN_FAULT_KILL_AT_STEP", "0"))


class TrainingDiverged(CmalignError, RuntimeError):
    """Loss or gradients became NaN/inf; the run stops and keeps its last good checkpoint."""


class RunDirectoryError(CmalignError, RuntimeError):
    pass


@dataclass
class FitResult:
    run_dir: Path
    model_dir: Path
    steps: int
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    skipped_samples: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------- environment


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device_kind: str) -> DistEnv:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, env: DistEnv) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} asked for, but torch sees no CUDA device")
        if name == "cuda":
            name = f"cuda:{env.local_rank}"
        torch.cuda.set_device(torch.device(name))
    return torch.device(name)


def autocast_for(device: torch.device, precision: str):
    """(autocast context factory, GradScaler or None); AMP only on CUDA, bf16 by default there."""
    if precision == "auto":
        precision = "amp_bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return (lambda: nullcontext()), None, "fp32"
    if device.type != "cuda":
        raise ConfigError(f"precision '{precision}' needs a CUDA device; use fp32 on {device}")
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler, precision


def lr_at(step: int, cfg: FitConfig) -> float:
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, cfg.train.steps - o.warmup_steps)
    u = min(1.0, (step - o.warmup_steps) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * u)))


# --------------------------------------------------------------------------- the step


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


# --------------------------------------------------------------------------- run directory


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        self.model_dir = self.path / "model"
        self.metrics = self.path / "metrics.jsonl"
        self.bad = self.path / "bad_samples.jsonl"

    def bad_file(self, rank: int) -> Path:
        """Rank 0 lists read-time and its own training-time skips; other ranks their own."""
        return self.bad if rank == 0 else self.path / f"bad_samples.rank{rank}.jsonl"

    def checkpoints(self) -> list[Path]:
        return sorted(self.ckpt_dir.glob("step_*.pt"))

    def has_run(self) -> bool:
        return bool(self.checkpoints()) or (self.model_dir / "open_clip_config.json").exists()

    def listed_bad(self, rank: int) -> set[str]:
        """Sources this rank has listed already (on resume); rewrites its file without a torn last line.

        Derived from the file, not the checkpoint: only rank 0 writes checkpoints, and a sample found
        bad after the checkpoint is still bad, so it stays listed (once).
        """
        path = self.bad_file(rank)
        if not path.exists():
            return set()
        keep, listed = [], set()
        for line in path.read_text().splitlines():
            try:
                src = json.loads(line)["source"]
            except (json.JSONDecodeError, KeyError):
                continue
            if src not in listed:
                listed.add(src)
                keep.append(line)
        with atomic_write(path) as f:
            f.write("".join(x + "\n" for x in keep))
        return listed

    def truncate_metrics(self, last_step: int) -> None:
        """Drop log rows past the checkpoint we resume from (they will be written again)."""
        if not self.metrics.exists():
            return
        keep = []
        for line in self.metrics.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    keep.append(line)
            except json.JSONDecodeError:  # a torn last line from a kill
                break
        with atomic_write(self.metrics) as f:
            f.write("".join(x + "\n" for x in keep))


def default_run_dir(cfg: FitConfig, root: str = "runs") -> str:
    """``runs/<model>-a<alpha>``, or with ``-2``, ``-3``... when taken (never reuses a run)."""
    name = cfg.model.name.split(":")[-1].replace("/", "-").strip("-") or "model"
    base = Path(root) / f"{name}-a{cfg.alpha_target:g}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return str(path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():  # this device's only: a resume may see a different GPU count
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run: RunDir, step: int, model, optimizer, scaler, scheduler: GradScheduler,
                    cfg: FitConfig, keep: int) -> Path:
    path = run.ckpt_dir / f"step_{step:08d}.pt"
    state = {
        "step": step,
        "model": getattr(model, "module", model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "grad_scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "config_hash": cfg.hash(),
        "cmalign_version": cmalign.__version__,
    }
    with atomic_write(path, "wb") as f:
        torch.save(state, f)
    for old in run.checkpoints()[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint_state(run: RunDir) -> dict | None:
    for path in reversed(run.checkpoints()):
        try:
            # Our own file: it holds numpy RNG state and Python objects, so not weights_only.
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a checkpoint torn by a crash mid-write cannot exist (atomic), but be safe
            log.warning("cannot read checkpoint %s (%s); trying an older one", path, e)
    return None


# --------------------------------------------------------------------------- the run


def _resolve_pretrained(cfg: FitConfig, env: DistEnv, console) -> str | None:
    from cmalign.model.base import BASE_TAG, ensure_base_model
    from cmalign.model.loading import TINY_MODEL

    p = cfg.model.pretrained
    if p is None and cfg.model.name == TINY_MODEL:
        p = BASE_TAG
    if p == BASE_TAG:
        if cfg.model.name != TINY_MODEL:
            raise ConfigError(f"--pretrained {BASE_TAG} is the embedded base of {TINY_MODEL}, not of {cfg.model.name}")
        if env.main:
            path = ensure_base_model(console=console)
        env.barrier()
        path = ensure_base_model(console=None)
        return str(path / "open_clip_model.safetensors")
    if p in (None, "random"):
        if p is None and not cfg.model.name.startswith(("local-dir:", "hf-hub:")):
            log.warning("no --pretrained given for %s: starting from random weights. TPC-CMA is meant to "
                        "fine-tune a pretrained CLIP; pass a tag or a checkpoint file.", cfg.model.name)
        return None
    return p


def _check_supported(model, name: str) -> None:
    """TPC-CMA is defined on softmax-contrastive dual encoders (CLIP, CustomTextCLIP)."""
    if type(model).__name__ == "CoCa":
        raise ConfigError(f"{name} is a CoCa model (contrastive + captioning loss); cmalign fit supports "
                         "softmax-contrastive CLIP models only")
    if getattr(model, "logit_bias", None) is not None:
        raise ConfigError(f"{name} is a SigLIP-style model (sigmoid loss with logit_bias); cmalign fit's "
                         "objective builds on open_clip's softmax ClipLoss and would train it with the wrong loss")


def _num_workers(cfg: FitConfig) -> int:
    if cfg.data.num_workers >= 0:
        return cfg.data.num_workers
    cpus = os.cpu_count() or 1
    return 1 if cpus <= 2 else min(8, cpus - 1)  # one worker still overlaps decoding with compute


def _write_bad(path: Path, bad: list[dict], bad_seen: set) -> int:
    new = []
    for b in bad:
        if b["source"] not in bad_seen:
            bad_seen.add(b["source"])
            new.append(b)
    if new:
        with open(path, "a") as f:
            f.writelines(json.dumps(b) + "\n" for b in new)
    return len(new)


def fit(cfg: FitConfig, resume: bool = False, console=None, show_progress: bool = True) -> FitResult:
    """Fine-tune ``cfg.model`` with TPC-CMA into ``cfg.train.out``; see the module docstring."""
    from rich.console import Console

    cfg.resolve_defaults().validate()
    console = console or Console(stderr=True)
    t_start = time.time()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device_kind = "cuda" if cfg.train.device.startswith("cuda") or (
        cfg.train.device == "auto" and torch.cuda.is_available()) else "cpu"
    env = init_distributed(device_kind)
    device = resolve_device(cfg.train.device, env)
    autocast, scaler, precision = autocast_for(device, cfg.train.precision)
    if cfg.train.out is None:
        if env.world_size > 1 or resume:
            raise RunDirectoryError("pass --out RUN (under torchrun every rank must name the same directory)")
        cfg.train.out = default_run_dir(cfg)
    run = RunDir(cfg.train.out)

    state = None
    if resume:
        state = load_checkpoint_state(run)
        if state is None:
            raise RunDirectoryError(f"--resume: no checkpoint found in {run.ckpt_dir}")
        if state["config_hash"] != cfg.hash():
            raise RunDirectoryError(
                f"--resume: the config differs from the one {run.path} was started with "
                f"(hash {cfg.hash()} vs {state['config_hash']}); resume with the run's own config.toml")
    elif run.has_run():
        raise RunDirectoryError(f"{run.path} already holds a run; pass --resume to continue it, "
                                "or choose another --out")

    # Data first: schema problems must surface before any model is built or trained.
    splits = load_splits(cfg.data)
    if splits.skipped and cfg.data.on_bad_sample == "fail":
        s = splits.skipped[0]
        raise BadSampleError(f"{s.source}: field '{s.field}': {s.reason} "
                             f"({len(splits.skipped)} bad samples; --on-bad-sample skip would skip them)")
    if env.main:
        run.path.mkdir(parents=True, exist_ok=True)
        with atomic_write(run.path / "config.toml") as f:
            f.write(to_toml(cfg))

    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    random.seed(cfg.train.seed)

    pretrained = _resolve_pretrained(cfg, env, console)
    loaded = load_model(cfg.model.name, pretrained, device=device)
    model = loaded.model
    _check_supported(model, cfg.model.name)
    counts = select_trainable(model, cfg.model.trainable)
    if cfg.model.fixed_logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.model.fixed_logit_scale))
        model.logit_scale.requires_grad_(False)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)

    groups = param_groups(model, cfg.optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps)
    scheduler = GradScheduler(cfg.scheduler)
    bad_seen: set[str] = set()
    start_step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        scheduler.load_state_dict(state["grad_scheduler"])
        if state.get("world_size", 1) != env.world_size:
            raise RunDirectoryError(
                f"--resume: {run.path} was trained with {state.get('world_size', 1)} processes, now "
                f"{env.world_size}; the data order and global batch depend on it, resume with the same count")
        bad_seen = run.listed_bad(env.rank)
        start_step = state["step"]
        _set_rng_state(state["rng"])
        if env.main:
            run.truncate_metrics(start_step)
    else:
        if env.main:
            run.metrics.unlink(missing_ok=True)
        run.bad_file(env.rank).unlink(missing_ok=True)
    if env.main and splits.skipped:
        _write_bad(run.bad, [b.to_dict() for b in splits.skipped], bad_seen)

    train_model = model
    if env.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = CMALoss(cfg.loss, rank=env.rank, world_size=env.world_size)
    step_fn = TPCCMAStep(train_model, loss_fn, scheduler, env.world_size)

    accum = cfg.optim.accum_steps
    dataset = PairDataset(splits.train, loaded.preprocess_train, loaded.tokenizer, seed=cfg.train.seed,
                          on_bad_sample=cfg.data.on_bad_sample)
    sampler = ResumableBatchSampler(len(dataset), cfg.train.batch_size, seed=cfg.train.seed, rank=env.rank,
                                    world_size=env.world_size, start=start_step * accum,
                                    total=cfg.train.steps * accum)
    workers = _num_workers(cfg)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         collate_fn=collate_pairs, pin_memory=device.type == "cuda",
                                         persistent_workers=False)

    # only rank 0 evaluates (it decodes every validation image once to drop unreadable ones)
    guard = GuardSet.from_records(splits.val, splits.class_templates, cfg.data.val_max_images) if env.main else None
    ac = autocast()

    def run_guard(full: bool) -> dict:
        m = guard_metrics(model, guard, loaded.preprocess_val, loaded.tokenizer, device, full=full, autocast=ac)
        model.train()
        return m

    before = {}
    summary_path = run.path / "summary.json"
    if env.main:
        if state is not None and summary_path.exists():
            before = json.loads(summary_path.read_text()).get("before", {})
        else:
            before = run_guard(full=True)
            write_json(summary_path, {"before": before})
    env.barrier()

    if env.main:
        _print_start(console, cfg, loaded, counts, splits, guard, device, precision, env, workers, start_step)

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    last_guard: dict = {}
    metrics_f = open(run.metrics, "a", buffering=1) if env.main else None
    progress = _make_progress(console, show_progress and env.main)
    # Without a terminal (CI logs, nohup) the bar cannot redraw: print a plain line every 5 %.
    plain_every = max(1, cfg.train.steps // 20) if show_progress and not console.is_terminal else 0
    task = progress.add_task("fit", total=cfg.train.steps, completed=start_step, info="")
    data_iter = iter(loader)
    step = start_step
    last_ckpt = run.checkpoints()[-1] if run.checkpoints() else None
    try:
        with progress:
            while step < cfg.train.steps:
                t0 = time.time()
                alpha, phase = alpha_at(step, cfg.train.steps, cfg.alpha_target, cfg.curriculum)
                rows, decisions = [], []
                for micro in range(accum):
                    images, tokens, bad = next(data_iter)
                    if bad:
                        _write_bad(run.bad_file(env.rank), bad, bad_seen)
                    images, tokens = images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
                    # under DDP, all-reduce gradients once per optimizer step, not per micro-batch
                    sync = nullcontext() if env.world_size == 1 or micro == accum - 1 else train_model.no_sync()
                    try:
                        with sync:
                            row, d = step_fn(images, tokens, alpha, autocast, scaler, grad_div=accum)
                    except TrainingDiverged as e:
                        raise TrainingDiverged(f"step {step + 1}: {e}. Stopped; last good checkpoint: "
                                               f"{last_ckpt or 'none (no checkpoint written yet)'}. "
                                               "Try a lower --lr or --alpha-target.") from None
                    rows.append(row)
                    decisions.append(d)
                lr_scale = min(d.lr_scale for d in decisions)
                lr = lr_at(step, cfg) * lr_scale
                for g in optimizer.param_groups:
                    g["lr"] = lr
                if scaler is not None:
                    scaler.unscale_(optimizer)
                # max_norm = inf (grad_clip 0) clips nothing and still returns the total norm
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or math.inf))
                if not math.isfinite(grad_norm) and scaler is None:
                    raise TrainingDiverged(f"step {step + 1}: gradient norm is {grad_norm}. Stopped; last good "
                                           f"checkpoint: {last_ckpt or 'none'}. Try a lower --lr.")
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
                step += 1
                if step == _FAULT_KILL_AT_STEP:  # fault injection for the kill -9 resume test
                    os.kill(os.getpid(), 9)

                entry = {"step": step, "kind": "train", "phase": phase, "lr": lr, "grad_norm": grad_norm,
                         "logit_scale": float(model.logit_scale.detach().exp()), "seconds": time.time() - t0}
                for k in rows[0]:
                    entry[k] = sum(r[k] for r in rows) / len(rows)
                dlog = [d.to_log() for d in decisions]
                for k in dlog[0]:
                    vals = [x[k] for x in dlog]
                    if isinstance(vals[0], bool):
                        entry[k] = any(vals)
                    else:
                        vals = [v for v in vals if v is not None]
                        entry[k] = sum(vals) / len(vals) if vals else None
                entry["lr_scale"] = lr_scale
                if metrics_f:
                    metrics_f.write(json.dumps(entry) + "\n")

                if cfg.train.guard and cfg.train.guard_every > 0 and step % cfg.train.guard_every == 0 \
                        and step < cfg.train.steps:
                    if env.main:
                        last_guard = run_guard(full=False)
                        metrics_f.write(json.dumps({"step": step, "kind": "guard", **last_guard}) + "\n")
                    env.barrier()
                if cfg.train.checkpoint_every > 0 and step % cfg.train.checkpoint_every == 0 \
                        and step < cfg.train.steps:
                    if env.main:
                        last_ckpt = save_checkpoint(run, step, model, optimizer, scaler, scheduler, cfg,
                                                    cfg.train.keep_checkpoints)
                    env.barrier()
                info = f"loss {entry['total']:.3f}"
                if cfg.alpha_target > 0:
                    info += f"  α {entry['alpha_eff']:.3f}  phase {phase}"
                if last_guard:
                    info += f"  R@1 {last_guard['r1_t2i']:.2f}  gap {last_guard['raw']:.3f}"
                progress.update(task, completed=step, info=info)
                if plain_every and env.main and (step % plain_every == 0 or step == cfg.train.steps):
                    console.print(f"step {step}/{cfg.train.steps}  {info}", highlight=False)
    finally:
        if metrics_f:
            metrics_f.close()

    result = FitResult(run_dir=run.path, model_dir=run.model_dir, steps=step, before=before,
                       skipped_samples=len(bad_seen))
    if env.main:
        after = run_guard(full=True)
        result.after = after
        save_local_dir(model, loaded.model_cfg, loaded.preprocess_cfg, run.model_dir,
                       extra={"alpha_target": cfg.alpha_target, "config_hash": cfg.hash(),
                              "cmalign_version": cmalign.__version__})
        write_json(summary_path, {"before": before, "after": after})
        result.seconds = time.time() - t_start
        write_json(run.path / "manifest.json", {
            "kind": "cmalign-run",
            "cmalign_version": cmalign.__version__,
            "model": cfg.model.name,
            "pretrained": pretrained,
            "alpha_target": cfg.alpha_target,
            "config_hash": cfg.hash(),
            "steps": step,
            "world_size": env.world_size,
            "device": str(device),
            "precision": precision,
            "data": splits.description,
            "train_samples": len(splits.train),
            "val_images": len(guard.images),
            "skipped_samples": len(bad_seen),
            "grad_scheduler": {"mode": cfg.scheduler.mode, **scheduler.state_dict()},  # steps measured, conflicts, caps
            "trainable_parameters": counts["trainable"],
            "total_parameters": counts["total"],
            "seconds": round(result.seconds, 1),
            "versions": {"torch": torch.__version__, "open_clip": _open_clip_version(),
                         "python": sys.version.split()[0], "platform": platform.platform()},
        })
    env.barrier()
    return result


def _open_clip_version() -> str:
    import open_clip

    return getattr(open_clip, "__version__", "unknown")


def _make_progress(console, enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]fit"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=console, disable=not enabled, transient=False)


def _print_start(console, cfg, loaded, counts, splits, guard, device, precision, env, workers, start_step):
    what = f"resuming at step {start_step}" if start_step else "starting"
    console.print(
        f"[bold]cmalign fit[/] {what}: model {cfg.model.name} "
        f"({counts['trainable'] / 1e6:.2f}M of {counts['total'] / 1e6:.2f}M parameters train, "
        f"trainable={cfg.model.trainable}), α_target {cfg.alpha_target}, {cfg.train.steps} steps × batch "
        f"{cfg.train.batch_size}×{env.world_size}×{cfg.optim.accum_steps}, {device} {precision}, "
        f"{workers} data workers\n  train {len(splits.train)} pairs ({splits.description.get('train')}), "
        f"val {len(guard.images)} images / {len(guard.captions)} captions"
        + (f", {len(splits.skipped)} samples skipped (see bad_samples.jsonl)" if splits.skipped else "")
        + (f", {len(guard.dropped)} unreadable val images dropped" if guard.dropped else "")
        + f"\n  run directory: {cfg.train.out}")
