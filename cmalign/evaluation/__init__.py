"""`cmalign eval`: one evaluator object per task, the runner, the report and figures, the post-hoc fixes.

``EvalConfig`` and ``evaluate`` are loaded on first use, so the metric and post-hoc modules import alone.
"""

from importlib import import_module

_EXPORTS = {"EvalConfig": "cmalign.evaluation.config", "EvalResult": "cmalign.evaluation.runner",
            "evaluate": "cmalign.evaluation.runner"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cmalign.evaluation' has no attribute '{name}'")
