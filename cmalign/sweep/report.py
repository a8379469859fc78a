"""A sweep's report.md and figures: the paper's table, the frontier, R² of gap against task, the recommendation."""

from __future__ import annotations

import math
from pathlib import Path

from cmalign.artifacts.atomic import atomic_write
from cmalign.evaluation.figures import pyplot
from cmalign.evaluation.report import markdown_table
from cmalign.metrics.gap import LITERATURE_NAMES
from cmalign.sweep.analysis import (
    TASK_METRICS,
    gap_reductions,
    pareto_front,
    r2_by_population,
    r_squared,
    reference_rows,
    row_intervals,
)

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
    lines += _interval_table(summary)
    lines += _reduction_tables(summary)
    lines += ["## Which gap measure predicts the tasks (R² of a least-squares line)", "",
              f"For comparison, {PAPER_R2}. The paper fits over its α sweep plus the post-hoc baselines; both "
              "populations are shown, each with its n.", ""]
    metrics = [k for k, _ in TASK_METRICS]
    header = ["gap measure"] + [label for _, label in TASK_METRICS]
    for pop in r2_by_population(summary["rows"]).values():
        table = pop["table"]
        lines += [f"### Over {pop['label']} (n = {pop['rows']}: {', '.join(pop['names']) or 'none'})", ""]
        if not table:
            lines += ["(no gap figures)", ""]
            continue
        lines += markdown_table(header, [[_gap_label(g)] + [_num(table[g][k]["r2"]) for k in metrics]
                                         for g in table])
        n = max((table[g][k]["n"] for g in table for k in metrics), default=0)
        lines += ["", f"({n} points per cell at most; R² needs 3, and with few points it is fragile — read it as a "
                  "direction.)", ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    with atomic_write(out / "report.md") as f:
        f.write("\n".join(lines) + "\n")


def _gap_label(g: str) -> str:
    return {"centroid": "centroid (L2M)", "l2i_first": "L2I (first caption)",
            "l2i_mean_caption": "L2I (mean caption)", "raw_mean_caption": "raw (mean caption)"}.get(g, g)


INTERVAL_COLUMNS = (("gap.raw", "raw gap"), ("gap.l2i_first", "L2I"), ("gap.mmd2", "MMD²"),
                    ("clustering.kmeans_ari", "ARI (KMeans)"), ("zeroshot.top1", "zero-shot top-1"),
                    ("retrieval.i2t_R@1", "R@1 i→t"), ("caption.cider_d", "CIDEr-D"), ("caption.rouge_l", "ROUGE-L"))


def _interval_table(summary: dict) -> list[str]:
    """Headline figures of each row with the 95 % intervals its eval wrote (none for evals without them)."""
    rows = [r for r in summary["rows"] if "metrics" in r]
    cis = {r["name"]: row_intervals(r) for r in rows}
    if not any(cis.values()):
        return []
    cols = [(k, lbl) for k, lbl in INTERVAL_COLUMNS if any(k in r["metrics"] for r in rows)]
    table = []
    for r in rows:
        cells = []
        for k, _ in cols:
            v, ci = r["metrics"].get(k), cis[r["name"]].get(k)
            cells.append("—" if v is None else _num(v, 4) + (f" [{_num(ci[0], 4)}, {_num(ci[1], 4)}]" if ci else ""))
        table.append([r["name"]] + cells)
    return (["## Figures with 95 % intervals", "",
             "Percentile bootstrap over the evaluation images, from each run's eval (metrics.json → `ci`).", ""]
            + markdown_table(["run"] + [lbl for _, lbl in cols], table) + [""])


def _reduction_tables(summary: dict) -> list[str]:
    """Every gap measure's reduction against the original model and against α = 0, where each is present."""
    lines = []
    titles = {"base": "the original model (base)", "alpha0": "α = 0 (plain fine-tuning of equal length)"}
    for key, ref in reference_rows(summary["rows"]).items():
        red = gap_reductions(summary["rows"], ref)
        measures = [g for g in ("raw", "centroid", "l2i_first", "l2i_mean_caption", "mmd2", "bures", "w2", "rmg")
                    if any(g in v for v in red.values())]
        if not red or not measures:
            continue
        lines += [f"## Gap reduction against {titles[key]}: {ref['name']}", ""]
        lines += markdown_table(["run"] + [_gap_label(g) for g in measures],
                                [[name] + [_pct(v.get(g)) for g in measures] for name, v in red.items()])
        lines += ["", "gap reduction = 1 − gap(run) / gap(reference), measure by measure ("
                  + "; ".join(f"{g}: {LITERATURE_NAMES[g]}" for g in measures if g in LITERATURE_NAMES)
                  + "). The runs were evaluated separately, so these reductions carry no paired interval; "
                  "`cmalign eval RUN --baseline REF` gives one.", ""]
    return lines


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
