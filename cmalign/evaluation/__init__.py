"""`cmalign eval`: the aligned space measured on the protocols of DESIGN.md §3, with a report a person reads."""

from cmalign.evaluation.config import EvalConfig
from cmalign.evaluation.runner import EvalResult, evaluate

__all__ = ["EvalConfig", "EvalResult", "evaluate"]
