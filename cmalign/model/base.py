"""The embedded stand-in for a pretrained CLIP: cmalign-tiny trained contrastively on the generated set.

TPC-CMA fine-tunes a *pretrained* CLIP that already has a modality gap, and no hub is reachable
here, so cmalign builds its own base once, by a fixed recipe, and caches it. The recipe trains
like CLIP where it matters for the gap: the logit scale is fixed at 100 (where CLIP's converges;
a learnable scale that stays low closes most of the gap by itself and would make a poor stand-in)
and excluded from weight decay. The result is a plain open_clip ``local-dir:`` model.

Cache: ``$CMALIGN_CACHE`` or ``~/.cache/cmalign``, one directory per recipe hash, built under a
file lock so parallel processes (DDP ranks, test workers) build it once.

:func:`resolve_pretrained` is the one place that turns a ``--pretrained`` value (the ``cmalign-base`` tag,
``random``, or none) into what open_clip loads; fit and eval both use it.

Building the base *is* a fit run, so :func:`_train` calls the trainer, and the trainer calls
:func:`resolve_pretrained`: the one deliberate import circle of the package, closed by a function-local
import in :func:`_train` (at load time this module imports neither torch nor the trainer).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from cmalign.errors import ConfigError

BASE_TAG = "cmalign-base"
RECIPE = {
    # 2: English plurals ("crosses", was "crosss"), a colour in every caption (the class is colour + shape)
    "version": 2,
    "model": "cmalign-tiny",
    "steps": 500,
    "batch_size": 128,
    "lr": 1e-3,
    "weight_decay": 0.1,
    "warmup_steps": 50,
    "fixed_logit_scale": 100.0,
    "seed": 0,
    "synth_seed": 0,
}


def cache_root() -> Path:
    return Path(os.environ.get("CMALIGN_CACHE", Path.home() / ".cache" / "cmalign"))


def recipe_hash(recipe: dict = RECIPE) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def base_model_dir(recipe: dict = RECIPE) -> Path:
    return cache_root() / f"base-{recipe['model']}-{recipe_hash(recipe)}"


def ensure_base_model(recipe: dict = RECIPE, console=None) -> Path:
    """Directory of the base model (``local-dir:`` layout), training it first if not cached."""
    out = base_model_dir(recipe)
    if (out / "open_clip_model.safetensors").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "open_clip_model.safetensors").exists():
            return out
        if console is not None:
            console.print(f"[bold]Building the embedded base model[/] (once; {recipe['steps']} contrastive steps "
                          f"on the generated set, cached in {out})")
        _train(recipe, out, console)
    return out


def wants_base_model(name: str, pretrained: str | None) -> bool:
    """Whether ``name`` with ``pretrained`` means the embedded base (cmalign-tiny's default weights)."""
    return name == RECIPE["model"] and pretrained in (None, BASE_TAG)


def resolve_pretrained(name: str, pretrained: str | None, console=None) -> str | None:
    """What to pass open_clip as ``pretrained`` for ``--model name --pretrained pretrained``.

    cmalign-tiny without a tag, or with ``cmalign-base``: the embedded base's weights file (built first
    if not cached, announced on ``console``). ``random`` or none: None (random init). Anything else
    (an open_clip tag, a checkpoint file) as given.
    """
    if wants_base_model(name, pretrained):
        return str(ensure_base_model(console=console) / "open_clip_model.safetensors")
    if pretrained == BASE_TAG:
        raise ConfigError(f"--pretrained {BASE_TAG} is the embedded base of {RECIPE['model']}, not of {name}")
    return None if pretrained == "random" else pretrained


def _train(recipe: dict, out: Path, console) -> None:
    # The deliberate import circle (see the module docstring): the base is trained by the trainer, which
    # imports this module to resolve its weights. Function-local, so neither module needs the other to load.
    from cmalign.train.config import FitConfig
    from cmalign.train.loop import fit

    cfg = FitConfig(alpha_target=0.0)
    cfg.model.name = recipe["model"]
    cfg.model.pretrained = "random"
    cfg.model.fixed_logit_scale = recipe["fixed_logit_scale"]
    cfg.data.synth_seed = recipe["synth_seed"]
    cfg.optim.lr = recipe["lr"]
    cfg.optim.weight_decay = recipe["weight_decay"]
    cfg.optim.warmup_steps = recipe["warmup_steps"]
    cfg.train.steps = recipe["steps"]
    cfg.train.batch_size = recipe["batch_size"]
    cfg.train.seed = recipe["seed"]
    cfg.train.device = "cpu"  # bit-for-bit the same base everywhere
    cfg.train.checkpoint_every = 0
    cfg.train.guard_every = 0
    cfg.scheduler.mode = "off"
    # The base is built inside a torchrun rank too: train it single-process.
    saved = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK") if k in os.environ}
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    try:
        cfg.train.out = str(tmp / "run")
        result = fit(cfg, console=console, show_progress=console is not None)
        staging = tmp / "model"
        shutil.copytree(result.model_dir, staging)
        (staging / "base_manifest.json").write_text(json.dumps(
            {"kind": "cmalign-base", "recipe": recipe, "gap": result.after}, indent=2))
        os.replace(staging, out)
    finally:
        os.environ.update(saved)
        shutil.rmtree(tmp, ignore_errors=True)
