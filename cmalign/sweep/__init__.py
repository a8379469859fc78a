"""`cmalign sweep`: one fit + eval per alpha_target, the gap-vs-task analysis (R², frontier) and its report.

The names below are loaded on first use: the analysis is numpy-only, the sweep itself needs torch.
"""

from importlib import import_module

_EXPORTS = {"SweepConfig": "cmalign.sweep.config", "SweepResult": "cmalign.sweep.run", "sweep": "cmalign.sweep.run"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cmalign.sweep' has no attribute '{name}'")
