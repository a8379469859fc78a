"""`cmalign adapt`: train an alignment adapter on stored paired embeddings with the TPC-CMA objective.

The second trainer of the one objective: the loss (:class:`cmalign.objective.cma_loss.CMALoss`), the curriculum
(:func:`cmalign.objective.curriculum.alpha_at`), the gradient-aware scheduler and the step
(:class:`cmalign.objective.step.TPCCMAStep`) are fit's, applied to the adapter's outputs. What differs is the data
(vectors from memory maps, no images decoded) and the product (a map and a derived export, not a new backbone).

    ADAPTER/config.json        the resolved config (its hash is the run's identity)
    ADAPTER/metrics.jsonl      one row per step
    ADAPTER/checkpoints/       step_N.pt, resume state (written atomically)
    ADAPTER/adapter.npz        the trained maps (numpy; :mod:`cmalign.adapter.weights`)
    ADAPTER/summary.json       gap and retrieval on held-out pairs: stored vectors vs adapted
    ADAPTER/export/            the base export with the adapter fused into its graphs
    ADAPTER/manifest.json      what made it; written last (an adapter without it is unfinished)
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import cmalign
from cmalign.adapter.config import AdaptConfig
from cmalign.adapter.pairs import PairedVectors
from cmalign.adapter.weights import AdapterError, AdapterWeights
from cmalign.artifacts.atomic import atomic_write, write_json
from cmalign.errors import OutputExistsError
from cmalign.objective.config import legacy_settings

KIND = "cmalign-adapter"
EXPORT_DIR = "export"


@dataclass
class AdaptResult:
    out: Path
    steps: int
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    export: Path | None = None
    seconds: float = 0.0


def _base_export(cfg: AdaptConfig, pairs: PairedVectors) -> Path:
    """The export the stored vectors came from; the derived export is built on it, so it must be that one."""
    from cmalign.export import manifest as mf

    path = Path(cfg.export or pairs.manifest.get("export") or "")
    hint = "pass --export with the export directory the embeddings were made with"
    if not cfg.export and not (path / mf.MANIFEST).is_file():
        raise AdapterError(f"{pairs.path / 'manifest.json'} names export {path}, which is not there; {hint}")
    fp = mf.read_manifest(path)["fingerprint"]
    if fp != pairs.fingerprint:
        raise AdapterError(f"{path} has fingerprint {fp}, but {pairs.path} was embedded with export "
                           f"{pairs.manifest.get('export')} (fingerprint {pairs.fingerprint}); an adapter trained on "
                           f"these vectors only fits that export. {hint}")
    return path


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step_*.pt"))  # step numbers are zero-padded: name order is step order


def _open(cfg: AdaptConfig, resume: bool) -> dict | None:
    """Start ``cfg.out`` or resume it; returns the checkpoint to resume from (None: start at step 0)."""
    out = Path(cfg.out)
    if (out / "manifest.json").is_file():
        raise OutputExistsError(f"{out} holds a finished adapter{' (nothing to resume)' if resume else ''}; choose "
                                "another --out")
    if out.exists() and any(out.iterdir()) and not resume:
        raise OutputExistsError(f"{out} exists and is not empty; pass --resume to continue the adapter run there, "
                                "or choose another --out")
    if not resume:
        return None
    saved = out / "config.json"
    if saved.is_file():
        written = json.loads(saved.read_text())
        # A run started before a setting existed trained with what its absence meant (a fixed warm-up before the
        # settle gate): it resumes with that.
        for section, meant in legacy_settings(written.get("config") or {}).items():
            for key, value in meant.items():
                setattr(getattr(cfg, section), key, value)
        old = written.get("config_hash")
        if old != cfg.hash():
            raise AdapterError(f"{saved}: config hash {old}, but these settings hash to {cfg.hash()}; resume with "
                               "the settings the run started with, or choose another --out")
    ckpts = _checkpoints(out)
    return torch.load(ckpts[-1], map_location="cpu", weights_only=False) if ckpts else None


def _evaluate(model, held: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict:
    """Gap measures and R@1 of the held-out pairs (each image against its first caption for the gap)."""
    from cmalign.metrics.gap import first_caption_index, gap_report
    from cmalign.metrics.retrieval import retrieval_metrics

    img, txt, cap_img = held
    with torch.no_grad():
        fi, ft, _ = model(torch.from_numpy(img), torch.from_numpy(txt))
    fi, ft = fi.numpy(), ft.numpy()
    g = gap_report(fi, ft[first_caption_index(cap_img)])
    r = retrieval_metrics(fi, ft, cap_img)
    return {"raw_gap": g.raw, "centroid_gap": g.centroid, "mmd2": g.mmd2, "paired_residual": g.paired_residual,
            "r1_i2t": r["i2t_R@1"], "r1_t2i": r["t2i_R@1"], "images": int(len(img)), "captions": int(len(txt))}


def adapt(cfg: AdaptConfig, resume: bool = False, console=None, show_progress: bool = True) -> AdaptResult:
    """Train, evaluate, save the adapter and its derived export into ``cfg.out``; see the module docstring."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from cmalign.adapter.graphs import derive_export
    from cmalign.adapter.model import AlignmentAdapter
    from cmalign.model.loading import param_groups
    from cmalign.objective.block_scheduler import BlockScheduler, parameter_blocks
    from cmalign.objective.cma_loss import CMALoss
    from cmalign.objective.curriculum import WarmupGate
    from cmalign.objective.grad_scheduler import GradScheduler
    from cmalign.objective.step import TPCCMAStep, TrainingDiverged
    from cmalign.train.optimizer import (
        apply_block_scales,
        clip_gradients,
        lr_schedule,
        split_by_block,
        step_optimizer,
    )

    t0 = time.time()
    cfg.validate()
    console = console or Console(stderr=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pairs = PairedVectors(cfg.embeddings)
    base_export = _base_export(cfg, pairs)
    state = _open(cfg, resume)
    out = Path(cfg.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"config_hash": cfg.hash(), "config": cfg.to_dict(),
                                     "embeddings_fingerprint": pairs.fingerprint})
    train_images, val_images = pairs.split(cfg.val_fraction, cfg.val_max_images, cfg.seed)

    torch.manual_seed(cfg.seed)
    model = AlignmentAdapter(pairs.dim, cfg.kind, cfg.rank, cfg.logit_scale, cfg.seed, cfg.hidden)
    groups = param_groups(model, cfg.weight_decay)
    if cfg.scheduler.mode == "block":
        groups = split_by_block(model, groups, cfg.scheduler.blocks)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = GradScheduler(cfg.scheduler)
    blocks = (BlockScheduler(cfg.scheduler, list(parameter_blocks(model.named_parameters(), cfg.scheduler.blocks)))
              if cfg.scheduler.mode == "block" else None)
    step_fn = TPCCMAStep(model, CMALoss(cfg.loss), scheduler, blocks=blocks)
    start = 0
    warmup = WarmupGate(cfg.curriculum, cfg.steps)
    if state is not None:
        if state["config_hash"] != cfg.hash() or state["embeddings_fingerprint"] != pairs.fingerprint:
            raise AdapterError(f"{out}: its checkpoint was made with other settings or other embeddings")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if blocks is not None:
            blocks.load_state_dict(state["blocks"])
        if state.get("warmup"):
            warmup.load_state_dict(state["warmup"])
        start = int(state["step"])
    held = pairs.held_out(val_images) if len(val_images) else None  # read once for the before and after figures
    before = _evaluate(AlignmentAdapter(pairs.dim, cfg.kind, cfg.rank, hidden=cfg.hidden), held) if held else {}
    _keep_metrics_until(out / "metrics.jsonl", start)
    shape = f"MLP of {cfg.hidden} hidden units" if cfg.hidden else f"rank {cfg.rank or 'full'}"
    console.print(f"adapting {pairs.images.n} images / {pairs.texts.n} captions (d = {pairs.dim}) from "
                  f"{pairs.path}: kind {cfg.kind}, {shape}, α {cfg.alpha_target}, {cfg.steps} steps"
                  + (f", resuming at step {start}" if start else ""), highlight=False, soft_wrap=True)
    params = [p for p in model.parameters() if p.requires_grad]
    t_train = time.time()
    with open(out / "metrics.jsonl", "a", buffering=1) as log, Progress(
            TextColumn("adapt"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
            disable=not show_progress) as bar:
        task = bar.add_task("adapt", total=cfg.steps, completed=start, info="")
        for step in range(start, cfg.steps):
            alpha, phase = warmup.alpha_at(step, cfg.alpha_target)
            img, txt = pairs.batch(train_images, cfg.seed, step, cfg.batch_size)
            measure = blocks is not None and blocks.due(step, phase, alpha)
            try:
                row, d = step_fn(torch.from_numpy(img), torch.from_numpy(txt), alpha, nullcontext,
                                 measure_blocks=measure, alpha_scale=blocks.alpha_scale if blocks else 1.0)
            except TrainingDiverged as e:
                raise TrainingDiverged(f"step {step + 1}: {e}. Try a lower --lr.") from None
            grad_norm = clip_gradients(optimizer, None, params, cfg.grad_clip)
            if not math.isfinite(grad_norm):
                raise TrainingDiverged(f"step {step + 1}: gradient norm is {grad_norm}. Try a lower --lr.")
            if blocks is not None:
                apply_block_scales(optimizer, blocks.scales)
            lr = lr_schedule(step, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio, cfg.steps) * d.lr_scale
            step_optimizer(model, optimizer, None, lr)
            warmup.observe(row["clip"])
            entry = {"step": step + 1, "phase": phase, "alpha": alpha, "alpha_eff": d.alpha_eff, "lr": lr,
                     "grad_norm": grad_norm, **row,
                     "logit_scale": float(model.logit_scale.detach().exp())}
            if blocks is not None:
                entry.update(blocks.to_log())
            log.write(json.dumps(entry) + "\n")
            bar.update(task, completed=step + 1, info=f"loss {row['total']:.3f} α {alpha:.3f}")
            done = step + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                _save_checkpoint(out, done, cfg, pairs, model, optimizer, scheduler, blocks, warmup)

    train_seconds = time.time() - t_train
    weights = AdapterWeights({f"{t}.{n}": p.detach().numpy().copy() for t, m in model.towers().items()
                              for n, p in m.named_parameters()})
    weights.save(out)
    model.eval()
    after = _evaluate(model, held) if held else {}
    write_json(out / "summary.json", {"before": before, "after": after,
                                      "held_out": "images held out of training, with all their captions"})
    manifest = {"kind": KIND, "cmalign_version": cmalign.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "adapter_kind": cfg.kind, "rank": cfg.rank, "hidden": cfg.hidden, "dim": pairs.dim,
                "towers": weights.towers,
                "config_hash": cfg.hash(), "alpha_target": cfg.alpha_target, "steps": cfg.steps,
                "embeddings": str(pairs.path.resolve()), "base_export": str(base_export.resolve()),
                "base_fingerprint": pairs.fingerprint, "pairs": {"images": int(pairs.images.n),
                                                                 "captions": int(pairs.texts.n),
                                                                 "held_out_images": int(len(val_images))},
                "logit_scale": float(model.logit_scale.detach().exp()),
                "block_scheduler": ({"measurements": blocks.measurements, "throttles": blocks.throttles,
                                     "min_lr_scale_reached": blocks.min_scale_seen} if blocks is not None else None),
                "weights": "adapter.npz", "export": EXPORT_DIR, "versions": {"torch": torch.__version__},
                "train_seconds": round(train_seconds, 2),  # this process's steps (a resumed run: since resuming)
                "pairs_per_second": round((cfg.steps - start) * min(cfg.batch_size, len(train_images))
                                          / max(train_seconds, 1e-9), 1)}
    console.print(f"fusing the adapter into a derived export of {base_export}", highlight=False)
    exp = derive_export(base_export, out, out / EXPORT_DIR, manifest)
    manifest["export_fingerprint"] = exp["fingerprint"]
    manifest["seconds"] = round(time.time() - t0, 1)
    write_json(out / "manifest.json", manifest)
    for p in _checkpoints(out):
        p.unlink()
    return AdaptResult(out, cfg.steps, before, after, out / EXPORT_DIR, time.time() - t0)


def _keep_metrics_until(path: Path, step: int) -> None:
    """The step log up to ``step`` (rows a killed run wrote after its last checkpoint are redone, not doubled)."""
    rows = path.read_text().splitlines() if path.is_file() and step else []
    keep = [r for r in rows if r.strip() and _row_step(r) <= step]
    with atomic_write(path) as f:
        f.write("".join(r + "\n" for r in keep))


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line: dropped


def _save_checkpoint(out: Path, step: int, cfg: AdaptConfig, pairs, model, optimizer, scheduler, blocks,
                     warmup) -> None:
    state = {"step": step, "config_hash": cfg.hash(), "embeddings_fingerprint": pairs.fingerprint,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "blocks": blocks.state_dict() if blocks is not None else None, "warmup": warmup.state_dict()}
    with atomic_write(out / "checkpoints" / f"step_{step:08d}.pt", "wb") as f:
        torch.save(state, f)
    for old in _checkpoints(out)[:-2]:
        old.unlink()
