"""The run directory and its checkpoints: what makes a `fit` resumable exactly, after a kill -9 too.

    RUN/config.toml            resolved config (its hash is the run's identity)
    RUN/metrics.jsonl          one row per step + guard rows
    RUN/bad_samples.jsonl      skipped samples: source, field, reason (other ranks: bad_samples.rankN.jsonl)
    RUN/checkpoints/step_*.pt  resume state, written atomically
    RUN/model/                 open_clip local-dir layout
    RUN/summary.json           guard figures before/after
    RUN/manifest.json          what made this run

A checkpoint holds only built-in types, tensors and numpy state (no cmalign classes), so moving or
renaming code never makes an old checkpoint unreadable; its ``config_hash`` must equal the resumed
config's :meth:`~cmalign.train.config.FitConfig.hash`.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import cmalign
from cmalign.artifacts.atomic import atomic_write
from cmalign.errors import CmalignError
from cmalign.objective.block_scheduler import BlockScheduler
from cmalign.objective.grad_scheduler import GradScheduler
from cmalign.train.config import FitConfig

log = logging.getLogger("cmalign.train.run_dir")


class RunDirectoryError(CmalignError, RuntimeError):
    """A run directory that cannot be started or resumed as asked (taken, no checkpoint, other config)."""


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        self.model_dir = self.path / "model"
        self.metrics = self.path / "metrics.jsonl"
        self.bad = self.path / "bad_samples.jsonl"
        self.summary = self.path / "summary.json"
        self.manifest = self.path / "manifest.json"

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

    def add_bad(self, rank: int, bad: list[dict], listed: set[str]) -> int:
        """Append the samples of ``bad`` not in ``listed`` (updated) to this rank's file; returns how many."""
        new = []
        for b in bad:
            if b["source"] not in listed:
                listed.add(b["source"])
                new.append(b)
        if new:
            with open(self.bad_file(rank), "a") as f:
                f.writelines(json.dumps(b) + "\n" for b in new)
        return len(new)

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


def rng_state() -> dict:
    """Every RNG's state as tensors and plain Python values, so a checkpoint loads with ``weights_only``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():  # this device's only: a resume may see a different GPU count
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    if isinstance(n, dict):
        n = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)  # a tuple with an ndarray in checkpoints written before 0.1 loaded them safely
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run: RunDir, step: int, model, optimizer, scaler, scheduler: GradScheduler,
                    cfg: FitConfig, keep: int, blocks: BlockScheduler | None = None, warmup=None) -> Path:
    """Write ``checkpoints/step_<step>.pt`` atomically and keep the newest ``keep`` (0: all)."""
    path = run.ckpt_dir / f"step_{step:08d}.pt"
    state = {
        "step": step,
        "model": getattr(model, "module", model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "grad_scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "config_hash": cfg.hash(),
        "cmalign_version": cmalign.__version__,
    }
    if blocks is not None:  # only then: a checkpoint of any other mode keeps the keys it always had
        state["block_scheduler"] = blocks.state_dict()
    if warmup is not None and cfg.curriculum.settle_tolerance > 0:  # the same: a fixed warm-up has no state
        state["warmup"] = warmup.state_dict()
    with atomic_write(path, "wb") as f:
        torch.save(state, f)
    for old in run.checkpoints()[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def _numpy_array_globals() -> list:
    """What a numpy array in a pickle refers to: earlier checkpoints held numpy's RNG state that way."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]  # the keys are uint32


def load_checkpoint_state(run: RunDir) -> dict | None:
    """The newest readable checkpoint's state, or None when the run has none.

    A checkpoint is loaded with ``weights_only=True``: tensors, plain Python values and numpy arrays, nothing that
    runs code. A run directory from elsewhere can hold a crafted pickle; it is refused, never executed.
    """
    for path in reversed(run.checkpoints()):
        try:
            with torch.serialization.safe_globals(_numpy_array_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            what = re.search(r"(Unsupported global: [^\n]*|but got [^\n]*)", str(e))
            raise RunDirectoryError(
                f"{path}: refused: it holds objects other than tensors and plain values, which loading would "
                f"have to execute ({what.group(1) if what else 'not a plain checkpoint'}). cmalign does not load "
                "it; a run directory from someone else can carry code. Start a new run, or remove the file to "
                "resume from an older checkpoint") from None
        except Exception as e:  # a checkpoint torn by a crash mid-write cannot exist (atomic), but be safe
            log.warning("cannot read checkpoint %s (%s); trying an older one", path, e)
    return None
