"""`cmalign fit`: the configuration, the training loop, distributed/precision setup and the resumable run directory.

    config.py       FitConfig: nested dataclasses, TOML in and out, --set overrides, the hash that names a run
    setup.py        everything before the first step: data, model, optimizer, resume state, the guard set
    loop.py         fit(): the steps (curriculum α, the TPC-CMA step, accumulation, logging) and the finish
    optimizer.py    AdamW groups, warm-up + cosine lr, clipping
    distributed.py  torchrun ranks, device choice, AMP
    run_dir.py      the run directory: checkpoints (atomic), metrics log, bad samples, RNG state
    guard.py        the guard evaluation on the validation split (gaps, R@1, zero-shot)
    console.py      progress bar and start line

Public names load on first use: the configuration needs no torch, the loop does."""

from cmalign._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "config": ("FitConfig", "load_config", "to_toml"),
    "loop": ("FitResult", "fit"),
})
