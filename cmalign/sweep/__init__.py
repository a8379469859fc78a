"""`cmalign sweep`: one fit + eval per alpha_target, the gap-vs-task analysis (R², frontier) and its report.

    config.py    what a sweep is, and which settings make two sweeps the same
    run.py       the runs and evaluations, resumable, in parallel jobs
    analysis.py  R² of each gap measure against each task metric, the Pareto frontier, the recommendation
    report.py    report.md and the figures

Public names load on first use: the analysis is numpy-only, the sweep itself needs torch."""

from cmalign._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "config": ("SweepConfig",),
    "run": ("SweepResult", "sweep"),
})
