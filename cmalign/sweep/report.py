"""A sweep's report.md and figures: the paper's table, the frontier, R² of gap against task, the recommendation."""

from __future__ import annotations

import math
from pathlib import Path

from cmalign.artifacts.atomic import atomic_write
from cmalign.evaluation.figures import pyplot
from cmalign.evaluation.report import markdown_table
from cmalign.metrics.gap import GAP_MEASURES
from cmalign.sweep.analysis import TASK_METRICS, pareto_front, r_squared

R2_GAPS = ("raw", "centroid", "mmd2", "bures", "coral", "rmg")
PAPER_R2 = "the paper reports R²(distribution gap) = 0.986 against R²(raw gap) = 0.691"


def _pct(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:+.1f} %"


def _num(v, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def table_rows(summary: dict) -> list[list[str]]:
    """| name | alpha_target | gap reduction | zero-shot drop | ARI | CIDEr change | R@1 i→t / t→i | stability |"""
    out = []
    for r in summary["rows"]:
        m = r.get("metrics", {})
        st = r.get("stability")
        stab = "" if not st else (f"{st['spikes']} spikes, {st['non_finite']} NaN" if st["steps"] else "")
        if r.get("error"):
            out.append([r["name"], _num(r["alpha_target"], 3), "—", "—", "—", "—", "—", r["error"][:80]])
            continue
        out.append([r["name"], "—" if r["alpha_target"] is None else f"{r['alpha_target']:g}",
                    _pct(r.get("raw_gap_reduction")), _pct(-r["zeroshot_drop"]) if "zeroshot_drop" in r else "—",
                    _num(m.get("clustering.kmeans_ari")), _pct(r.get("cider_change")),
                    f"{_num(m.get('retrieval.i2t_R@1'))} / {_num(m.get('retrieval.t2i_R@1'))}", stab])
    return out


TABLE_HEADER = ["run", "alpha_target", "gap reduction", "zero-shot change", "ARI (KMeans, joint)", "CIDEr change",
                "R@1 i→t / t→i", "stability"]


def write_sweep_report(out: Path, summary: dict) -> None:
    figures = write_sweep_figures(out, summary)
    s = summary["settings"]
    ref = summary["reference"]
    lines = ["# cmalign sweep", "",
             f"- model: {s['model'] or 'cmalign-tiny (embedded base)'}"
             + (f", pretrained {s['pretrained']}" if s["pretrained"] else ""),
             f"- training data: {s['data'] or 'generated'}; "
             f"evaluation data: {s['val'] or 'generated validation split'}",
             f"- steps: {s['steps'] or 'fit default'}; seed {s['seed']}; fit overrides: {s['fit_overrides'] or 'none'}",
             f"- reference for gap reduction, zero-shot change and CIDEr change: **{ref}**",
             f"- written {summary['created']} by cmalign {summary['cmalign_version']}; this invocation "
             f"{summary['seconds']:.0f} s, the whole sweep's fits and evals {summary['compute_seconds'] / 60:.1f} min",
             "", "## Runs", ""]
    lines += markdown_table(TABLE_HEADER, table_rows(summary))
    lines += ["", "gap reduction = 1 − raw gap / reference's; zero-shot change = relative change of top-1; "
              "stability = loss spikes (> 1.5× the median of the previous 20 steps) and non-finite losses.", ""]
    rec = summary["recommendation"]
    lines += ["## Recommendation", ""]
    if rec:
        lines += [f"**alpha_target = {rec['alpha_target']:g}** ({rec['name']}): the best {rec['by']} "
                  f"({_num(rec['value'])}) among runs whose zero-shot drop stays within "
                  f"{100 * s['max_zeroshot_drop']:.1f} % (this one: {100 * rec['zeroshot_drop']:.1f} %).", "",
                  f"    {rec['export_command']}", ""]
    else:
        lines += [f"No alpha run keeps the zero-shot drop within {100 * s['max_zeroshot_drop']:.1f} % "
                  "(or none was evaluated); loosen --max-zeroshot-drop or add smaller alphas.", ""]
    lines += ["## Which gap measure predicts the tasks (R² of a least-squares line, over every run and baseline)",
              "", f"For comparison, {PAPER_R2}.", ""]
    metrics = [k for k, _ in TASK_METRICS]
    header = ["gap measure"] + [label for _, label in TASK_METRICS]
    rows = [[g] + [_num(summary["r2"][g][k]["r2"]) for k in metrics] for g in GAP_MEASURES]
    lines += markdown_table(header, rows)
    n = max((summary["r2"]["raw"][k]["n"] for k in metrics), default=0)
    lines += ["", f"({n} points per cell at most; with few points R² is fragile — read it as a direction.)", ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    with atomic_write(out / "report.md") as f:
        f.write("\n".join(lines) + "\n")


def write_sweep_figures(out: Path, summary: dict) -> list[str]:
    rows = [r for r in summary["rows"] if "metrics" in r]
    if len(rows) < 2:
        return []
    plt = pyplot()
    written = []
    zs = [r["metrics"].get("zeroshot.top1") for r in rows]

    # the frontier: alignment (raw gap reduction) against zero-shot top-1
    pts = [(z, r.get("raw_gap_reduction")) for z, r in zip(zs, rows, strict=True)]
    ok = [i for i, (z, g) in enumerate(pts) if z is not None and g is not None]
    if ok:
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        for i in ok:
            kind = rows[i]["kind"]
            ax.scatter(*pts[i], marker={"alpha": "o", "variant": "s"}.get(kind, "^"),
                       color={"alpha": "#1f77b4", "variant": "#ff7f0e"}.get(kind, "#2ca02c"), s=40)
            ax.annotate(rows[i]["name"], pts[i], fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = [ok[j] for j in pareto_front([pts[i] for i in ok])]
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="gray", lw=1, label="Pareto front")
        ax.set_xlabel("zero-shot top-1")
        ax.set_ylabel(f"raw gap reduction vs {summary['reference']}")
        ax.legend(fontsize=8)
        ax.set_title("alignment against zero-shot accuracy (● alpha, ■ variant, ▲ base / post-hoc)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=110)
        plt.close(fig)
        written.append("pareto.png")

    # ARI and CIDEr against zero-shot
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label) in zip(axes, (("clustering.kmeans_ari", "joint KMeans ARI"),
                                       ("caption.cider_d", "caption CIDEr-D")), strict=True):
        for z, r in zip(zs, rows, strict=True):
            if z is not None and key in r["metrics"]:
                ax.scatter(z, r["metrics"][key], s=30)
                ax.annotate(r["name"], (z, r["metrics"][key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("zero-shot top-1")
        ax.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(out / "tradeoffs.png", dpi=110)
    plt.close(fig)
    written.append("tradeoffs.png")

    # gap measure against task metric, with fitted lines and R²
    metrics = [(k, lbl) for k, lbl in TASK_METRICS if k != "retrieval.t2i_R@1"]
    fig, axes = plt.subplots(len(R2_GAPS), len(metrics), figsize=(3 * len(metrics), 2.6 * len(R2_GAPS)),
                             squeeze=False)
    for i, g in enumerate(R2_GAPS):
        for j, (key, label) in enumerate(metrics):
            ax = axes[i, j]
            xy = [(r["metrics"].get(f"gap.{g}"), r["metrics"].get(key)) for r in rows]
            xy = [(x, y) for x, y in xy if x is not None and y is not None]
            if not xy:
                continue
            x, y = zip(*xy, strict=True)
            ax.scatter(x, y, s=14)
            fit = r_squared(x, y)
            if not math.isnan(fit["r2"]):
                lo, hi = min(x), max(x)
                ax.plot([lo, hi], [fit["intercept"] + fit["slope"] * lo, fit["intercept"] + fit["slope"] * hi],
                        color="gray", lw=1)
            ax.set_title(f"R² {_num(fit['r2'], 2)}", fontsize=8)
            ax.tick_params(labelsize=6)
            ax.locator_params(axis="x", nbins=3)
            if i == len(R2_GAPS) - 1:
                ax.set_xlabel(g, fontsize=8)
            else:
                ax.set_xlabel(g, fontsize=6)
            if j == 0:
                ax.set_ylabel(label, fontsize=7)
            else:
                ax.set_ylabel(label, fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "gap_vs_task.png", dpi=100)
    plt.close(fig)
    written.append("gap_vs_task.png")
    return written
