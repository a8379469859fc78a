"""`cmalign eval`: one evaluator object per task, the runner, the report and figures, the post-hoc fixes.

Public names load on first use, so the metric and post-hoc modules import alone."""

from cmalign._lazy import lazy_exports

_EXPORTS = {
    "EvalConfig": "cmalign.evaluation.config",
    "EvalResult": "cmalign.evaluation.runner",
    "evaluate": "cmalign.evaluation.runner",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
