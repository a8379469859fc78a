"""What a sweep's rows say: R² of each gap measure against each task metric, the Pareto frontier of alignment
against zero-shot accuracy, and which alpha_target to pick.

Pure numpy/scipy over plain dicts, so it reads a sweep.json as well as a live sweep.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import linregress

from cmalign.errors import ConfigError
from cmalign.metrics.gap import GAP_MEASURES

# (key in a row's "metrics", label)
TASK_METRICS = (
    ("clustering.kmeans_ari", "joint KMeans ARI"),
    ("caption.cider_d", "caption CIDEr-D"),
    ("mixed.text_query_image_share@10", "mixed: image share@10 (text queries)"),
    ("retrieval.i2t_R@1", "R@1 image→text"),
    ("retrieval.t2i_R@1", "R@1 text→image"),
    ("zeroshot.top1", "zero-shot top-1"),
)
SELECT = {"gap": "raw_gap_reduction", "ari": "clustering.kmeans_ari", "cider": "caption.cider_d"}


def flatten(systems_entry: dict) -> dict:
    """One eval system's tasks → {"task.key": value} for the numeric figures."""
    out = {}
    for task, figures in systems_entry.items():
        for key, value in figures.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{task}.{key}"] = float(value)
    return out


def r_squared(x, y) -> dict:
    """Least-squares line of y on x: R², slope, intercept, n. R² is NaN with fewer than 3 points or no spread."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"r2": math.nan, "slope": math.nan, "intercept": math.nan, "n": int(len(x))}
    fit = linregress(x, y)
    return {"r2": float(fit.rvalue ** 2), "slope": float(fit.slope), "intercept": float(fit.intercept),
            "n": int(len(x))}


def r2_table(rows: list[dict], gaps=GAP_MEASURES, metrics=TASK_METRICS) -> dict:
    """{gap: {metric: r_squared(...)}} over every row that has both figures."""
    out = {}
    for g in gaps:
        out[g] = {}
        for key, _ in metrics:
            pairs = [(r["metrics"].get(f"gap.{g}"), r["metrics"].get(key)) for r in rows]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            out[g][key] = r_squared([a for a, _ in pairs], [b for _, b in pairs])
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both: higher is better), by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def recommend(rows: list[dict], max_zeroshot_drop: float, select: str = "gap") -> dict | None:
    """The alpha run with the best ``select`` figure whose relative zero-shot drop stays within the bound."""
    if select not in SELECT:
        raise ConfigError(f"select must be one of {', '.join(SELECT)}, got {select!r}")
    key = SELECT[select]
    eligible = [r for r in rows if r.get("kind") == "alpha" and r.get("zeroshot_drop") is not None
                and r["zeroshot_drop"] <= max_zeroshot_drop and _value(r, key) is not None]
    if not eligible:
        return None
    best = max(eligible, key=lambda r: (_value(r, key), -r["alpha_target"]))
    return {"name": best["name"], "alpha_target": best["alpha_target"], "by": key, "value": _value(best, key),
            "zeroshot_drop": best["zeroshot_drop"], "run_dir": best["run_dir"]}


def _value(row: dict, key: str):
    return row.get(key) if key in row else row.get("metrics", {}).get(key)
