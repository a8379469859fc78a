"""What a sweep's rows say: R² of each gap measure against each task metric, the Pareto frontier of alignment
against zero-shot accuracy, and which alpha_target to pick.

Pure numpy/scipy over plain dicts, so it reads a sweep.json as well as a live sweep.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import linregress

from cmalign.errors import ConfigError
from cmalign.metrics.gap import EVAL_GAP_MEASURES, GAP_MEASURES

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


# --------------------------------------------------------------------------- read beside sweep.json (report-side)

POPULATIONS = {
    "alpha_runs": ("the alpha runs only", lambda r: r.get("kind") == "alpha"),
    "all": ("every run, the base model and its post-hoc fixes", lambda r: True),
}


def r2_by_population(rows: list[dict], gaps=EVAL_GAP_MEASURES, metrics=TASK_METRICS) -> dict:
    """R² tables over the alpha runs alone and over every row (runs + base + post-hoc fixes), each with its n.

    The paper fits over a sweep *plus* post-hoc baselines; the fixes sit at other places on the gap axes, so the
    two populations can disagree, and each is reported.
    """
    out = {}
    for key, (label, keep) in POPULATIONS.items():
        chosen = [r for r in rows if "metrics" in r and keep(r)]
        present = [g for g in gaps if any(f"gap.{g}" in r["metrics"] for r in chosen)]
        out[key] = {"label": label, "rows": len(chosen), "names": [r["name"] for r in chosen],
                    "table": r2_table(chosen, present, metrics)}
    return out


def gap_reductions(rows: list[dict], reference: dict | None, gaps=EVAL_GAP_MEASURES) -> dict:
    """{row name: {measure: 1 − gap(row) / gap(reference)}} for every measured row but the reference itself."""
    if reference is None:
        return {}
    ref = reference["metrics"]
    out = {}
    for r in rows:
        if "metrics" not in r or r is reference:
            continue
        out[r["name"]] = {g: 1 - r["metrics"][f"gap.{g}"] / ref[f"gap.{g}"] for g in gaps
                          if f"gap.{g}" in r["metrics"] and ref.get(f"gap.{g}", 0) > 0}
    return out


def reference_rows(rows: list[dict]) -> dict:
    """The rows gap reductions are quoted against: the original model ("base") and the α = 0 run, where present."""
    measured = [r for r in rows if "metrics" in r]
    out = {}
    base = next((r for r in measured if r.get("kind") == "base"), None)
    if base is not None:
        out["base"] = base
    alpha0 = next((r for r in measured if r.get("kind") == "alpha" and r.get("alpha_target") == 0), None)
    if alpha0 is not None:
        out["alpha0"] = alpha0
    return out


def row_intervals(row: dict) -> dict:
    """{"task.figure": [low, high]} of a sweep row, from its eval's metrics.json (empty if it has none)."""
    import json
    from pathlib import Path

    if not row.get("eval_dir"):
        return {}
    path = Path(row["eval_dir"]) / "metrics.json"
    try:
        ci = json.loads(path.read_text()).get("ci", {}) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    system = "model" if row.get("kind") in ("alpha", "variant", "base") else row["name"].replace("base+", "model+", 1)
    return {f"{task}.{key}": v for task, figures in ci.get(system, {}).items() for key, v in figures.items()
            if v is not None}
