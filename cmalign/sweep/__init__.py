"""`cmalign sweep`: one fit + eval per alpha_target, the gap-vs-task analysis (R², frontier) and its report.

Public names load on first use: the analysis is numpy-only, the sweep itself needs torch."""

from cmalign._lazy import lazy_exports

_EXPORTS = {
    "SweepConfig": "cmalign.sweep.config",
    "SweepResult": "cmalign.sweep.run",
    "sweep": "cmalign.sweep.run",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
