"""The paper's table in miniature: `cmalign sweep` on the embedded default, with the ablations the paper reports.

    .venv/bin/python benchmarks/paper_table.py [--out sweeps/paper-table] [--alphas 0,0.01,0.05,0.1,0.2,0.5] [--jobs 1]

Fits one run per alpha from the cached base (default recipe: 300 steps, seed 0) plus three ablations at α = 0.5 —
without the distribution term (centroid only), without the curriculum (full α from step 0), without the
gradient-aware scheduler — evaluates each with `cmalign eval`, adds the base model and the post-hoc fixes, and
prints the table next to the paper's rows. Resumable (it is a sweep). Writes benchmarks/results/paper_table.md,
paper_table.json and paper_table/ (the sweep's report and figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
from pathlib import Path

from cmalign.sweep.run import SweepConfig, sweep

ABLATIONS = {
    "a0.5-centroid-only": {"alpha_target": 0.5, "loss.lambda_distribution": 0.0},
    "a0.5-no-curriculum": {"alpha_target": 0.5, "curriculum.warmup_fraction": 0.0, "curriculum.intro_fraction": 0.0,
                           "curriculum.full_ramp_fraction": 0.0},
    "a0.5-no-scheduler": {"alpha_target": 0.5, "scheduler.mode": "off"},
}
PAPER = [  # ViT-B/32, COCO / CIFAR-10 (arXiv 2604.00279 as reported)
    ("paper α=0.05", "−66.6 %", "−4.84 %", "—", "—", "—"),
    ("paper α=0.5", "−82.3 %", "—", "0.318 → 0.516", "+57.1 %", "—"),
]


def _pct(v):
    return "—" if v is None else f"{100 * v:+.1f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="sweeps/paper-table")
    ap.add_argument("--alphas", default="0,0.01,0.05,0.1,0.2,0.5")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    cfg = SweepConfig(alphas=tuple(float(a) for a in args.alphas.split(",")), out=args.out, jobs=args.jobs,
                      variants={} if args.no_ablations else ABLATIONS)
    result = sweep(cfg, log=print)
    s = result.summary
    rows = {r["name"]: r for r in s["rows"]}
    base = rows.get("base", {}).get("metrics", {})
    lines = ["| run | alpha_target | gap reduction vs α=0 | gap reduction vs base | zero-shot change | "
             "ARI (KMeans, joint) | CIDEr change | R@1 i→t / t→i | stability |", "|" + "---|" * 9]
    for r in s["rows"]:
        m = r.get("metrics")
        if m is None:
            lines.append(f"| {r['name']} | {r['alpha_target']} | {r.get('error', 'not evaluated')} |||||||")
            continue
        vs_base = 1 - m["gap.raw"] / base["gap.raw"] if base.get("gap.raw") else None
        st = r.get("stability") or {}
        stab = f"{st['spikes']} spikes, {st['non_finite']} NaN, max loss {st['max_loss']:.2f}" if st.get("steps") \
            else ""
        lines.append(
            f"| {r['name']} | {'—' if r['alpha_target'] is None else format(r['alpha_target'], 'g')} | "
            f"{_pct(r.get('raw_gap_reduction'))} | {_pct(vs_base)} | "
            f"{_pct(-r['zeroshot_drop']) if 'zeroshot_drop' in r else '—'} | {m['clustering.kmeans_ari']:.3f} | "
            f"{_pct(r.get('cider_change'))} | {m['retrieval.i2t_R@1']:.3f} / {m['retrieval.t2i_R@1']:.3f} | {stab} |")
    for row in PAPER:
        lines.append(f"| {row[0]} | {row[0].split('=')[1]} | {row[1]} | — | {row[2]} | {row[3]} | {row[4]} | — | |")
    r2 = s["r2"]
    r2_lines = ["| gap measure | " + " | ".join(k for k in r2["raw"]) + " |", "|" + "---|" * (1 + len(r2["raw"]))]
    for g, cells in r2.items():
        r2_lines.append(f"| {g} | " + " | ".join(f"{c['r2']:.3f}" for c in cells.values()) + " |")

    checks = []
    a0, a005, a05 = rows.get("a0"), rows.get("a0.05"), rows.get("a0.5")
    if a0 and a05 and "metrics" in a05:
        checks.append(("α=0.5 raw gap reduction ≥ 50 % vs α=0", a05["raw_gap_reduction"] >= 0.5,
                       _pct(a05["raw_gap_reduction"])))
        checks.append(("α=0.5 raises joint ARI", a05["metrics"]["clustering.kmeans_ari"] >
                       a0["metrics"]["clustering.kmeans_ari"], f"{a0['metrics']['clustering.kmeans_ari']:.3f} → "
                       f"{a05['metrics']['clustering.kmeans_ari']:.3f}"))
        checks.append(("α=0.5 raises caption CIDEr-D", a05["cider_change"] > 0, _pct(a05["cider_change"])))
    if a005 and "metrics" in a005:
        checks.append(("α=0.05 zero-shot drop ≤ 5 %", a005["zeroshot_drop"] <= 0.05, _pct(-a005["zeroshot_drop"])))

    from cmalign.evaluation.runner import versions as package_versions

    versions = ", ".join(f"{k} {v}" for k, v in package_versions().items() if k not in ("platform", "python"))
    text = "\n".join([
        "# The paper's table in miniature (`benchmarks/paper_table.py`)", "",
        f"cmalign-tiny from its cached base, generated data, default fit recipe; {s['created']}; "
        f"{os.cpu_count()} CPU cores, {platform.platform()}, Python {platform.python_version()}; {versions}; "
        f"the sweep's compute {s['compute_seconds'] / 60:.1f} min (fits + evals, from their own records; this "
        f"invocation {result.seconds:.0f} s).", "",
        "Reference for gap reduction, zero-shot and CIDEr change: the α = 0 run (plain fine-tuning, same steps). "
        "The paper's reference is the original model, hence the \"vs base\" column too.", "",
        *lines, "", "## Quality bars", "",
        *[f"- {'PASS' if ok else 'FAIL'}: {name} ({val})" for name, ok, val in checks], "",
        "## R² of each gap measure against each task metric (all runs, the base and the post-hoc fixes)", "",
        "The paper: R²(distribution gap) = 0.986, R²(raw gap) = 0.691.", "", *r2_lines, "",
        f"Recommendation (max raw gap reduction, zero-shot drop ≤ 5 %): {s['recommendation']}", ""])
    results = Path(args.results)
    (results / "paper_table.md").write_text(text)
    (results / "paper_table.json").write_text(json.dumps({"summary": s, "checks": checks}, indent=2, default=str))
    dest = results / "paper_table"
    dest.mkdir(exist_ok=True)
    for f in ("report.md", "sweep.json", "pareto.png", "tradeoffs.png", "gap_vs_task.png"):
        if (result.out / f).exists():
            shutil.copy(result.out / f, dest / f)
    print(text)


if __name__ == "__main__":
    main()
