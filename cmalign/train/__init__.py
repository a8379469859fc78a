"""`cmalign fit`: the configuration, the training loop, distributed/precision setup and the resumable run directory.

Public names load on first use: the configuration needs no torch, the loop does."""

from cmalign._lazy import lazy_exports

_EXPORTS = {
    "FitConfig": "cmalign.train.config",
    "load_config": "cmalign.train.config",
    "to_toml": "cmalign.train.config",
    "FitResult": "cmalign.train.loop",
    "fit": "cmalign.train.loop",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
