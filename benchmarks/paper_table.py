"""The paper's table in miniature, over several seeds: `cmalign sweep` on the embedded default, the ablations the
paper reports, and a short fine-tune on a domain the base has not seen.

    .venv/bin/python benchmarks/paper_table.py [--seeds 0,1,2] [--alphas 0,0.05,0.5] [--out sweeps/paper-table]

Per seed, one sweep (``OUT/seed-N``): a fit per alpha from the cached base (default recipe: 300 steps) plus
ablations at α = 0.5 — no curriculum (full α from step 0) with the gradient-aware scheduler and without it, and
the default curriculum without the scheduler — each evaluated with `cmalign eval` (bootstrap 95 % intervals), with
the base model and its post-hoc fixes. Then per seed a *new-domain* sweep (``OUT/new-domain-seed-N``): the
generated set as photographic negatives (every image's colours inverted, captions unchanged, so "red" now shows
cyan: what the base learned about colour is wrong there), 60 steps at α = 0 and α = 0.5 (and α = 0.5 with a
fixed-length warm-up, the curriculum before its settle gate), evaluated on the negative validation split.
Figures are means over seeds with a 95 % t-interval (n = 3: ± 4.30 · sd / √3).

Resumable (each part is a sweep). Writes benchmarks/results/paper_table.md and paper_table.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
from pathlib import Path

from cmalign.artifacts.atomic import write_json
from cmalign.sweep.run import SweepConfig, sweep

NO_CURRICULUM = {"curriculum.warmup_fraction": 0.0, "curriculum.intro_fraction": 0.0,
                 "curriculum.full_ramp_fraction": 0.0, "curriculum.settle_tolerance": 0.0}
ABLATIONS = {
    "a0.5-no-curriculum": {"alpha_target": 0.5, **NO_CURRICULUM},
    "a0.5-no-curriculum-no-scheduler": {"alpha_target": 0.5, **NO_CURRICULUM, "scheduler.mode": "off"},
    "a0.5-no-scheduler": {"alpha_target": 0.5, "scheduler.mode": "off"},
}
# on the new domain: the warm-up of a fixed length (the curriculum before the settle gate)
DOMAIN_ABLATIONS = {"a0.5-fixed-warmup": {"alpha_target": 0.5, "curriculum.settle_tolerance": 0.0}}
# 97.5 % quantile of Student's t with n − 1 degrees of freedom (scipy is not needed for three numbers)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
FIGURES = [  # (metric key, label, format)
    ("gap.raw", "raw gap G_R", ".4f"),
    ("gap.raw_mean_caption", "G_R vs caption mean", ".4f"),
    ("gap.centroid", "centroid gap", ".4f"),
    ("gap.mmd2", "MMD²", ".5f"),
    ("retrieval.i2t_R@1", "R@1 i→t", ".3f"),
    ("retrieval.t2i_R@1", "R@1 t→i", ".3f"),
    ("zeroshot.top1", "zero-shot top-1", ".3f"),
    ("clustering.kmeans_ari", "ARI (joint)", ".3f"),
    ("caption.cider_d", "CIDEr-D", ".3f"),
    ("mixed.text_query_image_share@10", "text query: images@10", ".3f"),
    ("mixed.image_query_text_share@10", "image query: texts@10", ".3f"),
]
NOT_WORSE = ["retrieval.i2t_R@1", "retrieval.t2i_R@1", "zeroshot.top1", "clustering.kmeans_ari", "caption.cider_d"]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (0 for one value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def fmt(values: list[float], spec: str) -> str:
    m, h = mean_ci(values)
    return f"{m:{spec}}" if h == 0 else f"{m:{spec}} ± {h:{spec}}"


def write_negative_domain(out: Path, seed: int, train_images: int = 3000, val_images: int = 1000) -> tuple[str, str]:
    """The generated set as photographic negatives (an image-side domain shift the base never saw)."""
    from PIL import Image, ImageOps

    from cmalign.artifacts.atomic import write_json
    from cmalign.data.synth import write_synth

    marker = out / "negative.json"
    if not marker.is_file():
        written = write_synth(out, seed=1000 + seed, sizes={"train": train_images, "val": val_images})
        for split in written:
            for png in sorted((out / "images" / split).glob("*.png")):
                with Image.open(png) as im:
                    neg = ImageOps.invert(im.convert("RGB"))
                neg.save(png)
        write_json(marker, {"kind": "cmalign-synth-negative", "synth_seed": 1000 + seed,
                            "splits": {"train": train_images, "val": val_images}})
    return str(out / "train.csv"), str(out / "val.csv")


UNCHANGED_KINDS = ("base", "posthoc")  # with α = 0: the rows a change to the alignment terms leaves alone


def unchanged_rows(summary: dict) -> list[dict]:
    """The rows of an earlier sweep that a change to the α > 0 recipe cannot move: α = 0 (the alignment terms are not
    in its graph) and the base model with its post-hoc fixes."""
    return [dict(r, reused_from=summary["created"]) for r in summary["rows"]
            if r.get("kind") in UNCHANGED_KINDS or (r.get("kind") == "alpha" and r.get("alpha_target") == 0)]


def merged(result, earlier: dict | None):
    """``result`` (a sweep of the changed runs only) with ``earlier``'s unchanged rows, its R² over them all."""
    if earlier is None:
        return result
    from types import SimpleNamespace

    from cmalign.sweep.report import write_sweep_report
    from cmalign.sweep.run import analyse

    kept = unchanged_rows(earlier)
    s = result.summary
    rows = [r for r in kept if r["kind"] == "alpha"] + s["rows"] + [r for r in kept if r["kind"] != "alpha"]
    summary = dict(s, rows=rows, **analyse(rows, s["settings"]["max_zeroshot_drop"], s["settings"]["select"]),
                   compute_seconds=s["compute_seconds"] + sum(r.get("seconds", 0.0) for r in kept))
    write_json(result.out / "sweep.json", summary)  # the sweep's own report, with the rows it was judged with
    write_sweep_report(result.out, summary)
    return SimpleNamespace(summary=summary, out=result.out)


def by_name(result) -> dict:
    return {r["name"]: r for r in result.summary["rows"] if "metrics" in r}


def table(seed_rows: list[dict], names: list[str], base_name: str | None) -> list[str]:
    lines = ["| run | " + " | ".join(label for _, label, _ in FIGURES) + " | raw gap vs base | raw gap vs α=0 | "
             "stability |", "|" + "---|" * (len(FIGURES) + 4)]
    for name in names:
        present = [rows[name] for rows in seed_rows if name in rows]
        if not present:
            continue
        cells = []
        for key, _, spec in FIGURES:
            vals = [r["metrics"][key] for r in present if key in r["metrics"]]
            cells.append(fmt(vals, spec) if vals else "—")
        vs_base = [1 - rows[name]["metrics"]["gap.raw"] / rows[base_name]["metrics"]["gap.raw"]
                   for rows in seed_rows if base_name and name in rows and base_name in rows]
        vs0 = [1 - rows[name]["metrics"]["gap.raw"] / rows["a0"]["metrics"]["gap.raw"]
               for rows in seed_rows if name in rows and "a0" in rows]
        st = [r.get("stability") or {} for r in present]
        stab = (f"{sum(s.get('spikes', 0) for s in st)} spikes, max loss "
                f"{max(s.get('max_loss', 0) for s in st):.2f}") if any(s.get("steps") for s in st) else ""
        cells += [fmt([100 * v for v in vs_base], ".1f") + " %" if vs_base else "—",
                  fmt([100 * v for v in vs0], ".1f") + " %" if vs0 else "—", stab]
        lines.append(f"| {name} ({len(present)} seeds) | " + " | ".join(cells) + " |")
    return lines


def paired(seed_rows: list[dict], name: str, ref: str, key: str) -> tuple[float, float, float] | None:
    """Mean of (name − ref) over seeds, its 95 % half-width, and the mean relative change."""
    pairs = [(rows[name]["metrics"][key], rows[ref]["metrics"][key]) for rows in seed_rows
             if name in rows and ref in rows and key in rows[name]["metrics"]]
    if not pairs:
        return None
    m, h = mean_ci([a - b for a, b in pairs])
    rels = [a / b - 1 for a, b in pairs if b]
    rel = statistics.fmean(rels) if rels else float("nan")  # a reference of 0 (α = 0's image share) has none
    return m, h, rel


def verdict(diff, tolerance_rel: float = 0.0) -> bool:
    """Not worse: the paired difference's interval reaches 0 or above (or, with a tolerance, the mean relative
    change is above −tolerance)."""
    m, h, rel = diff
    return (m + h >= 0) if tolerance_rel == 0 else rel >= -tolerance_rel


def quality_checks(seed_rows: list[dict]) -> list[tuple[str, bool, str]]:
    """The default recipe's bars: α = 0.5 closes ≥ 85 % of the original model's raw gap, and is no worse than α = 0
    on any NOT_WORSE figure beyond the paired interval (a figure the runs lack is left out)."""
    checks = []
    if all("a0.5" in rows and "base" in rows for rows in seed_rows):
        red = [1 - rows["a0.5"]["metrics"]["gap.raw"] / rows["base"]["metrics"]["gap.raw"] for rows in seed_rows]
        checks.append(("α=0.5 closes ≥ 85 % of the raw gap against the original model", min(red) >= 0.85,
                       f"{fmt([100 * v for v in red], '.1f')} % (min {100 * min(red):.1f} %)"))
    if all("a0.5" in rows and "a0" in rows for rows in seed_rows):
        for key in NOT_WORSE:
            d = paired(seed_rows, "a0.5", "a0", key)
            if d:
                checks.append((f"α=0.5 {key} no worse than α=0 beyond the interval", verdict(d),
                               f"difference {d[0]:+.4f} ± {d[1]:.4f} ({100 * d[2]:+.1f} %)"))
    return checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="sweeps/paper-table")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--alphas", default="0,0.05,0.5")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--ablation-seeds", default=None, help="seeds that run the ablations too (default: all)")
    ap.add_argument("--no-new-domain", action="store_true")
    ap.add_argument("--domain-steps", type=int, default=60)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--default-from", default=None, metavar="JSON",
                    help="take the default-domain sweeps from this earlier paper_table.json instead of running them "
                         "(for a change that leaves the default recipe's training unchanged; the table says so)")
    ap.add_argument("--unchanged-from", default=None, metavar="JSON",
                    help="take the rows a change to the α > 0 recipe leaves alone (α = 0, the base model and its "
                         "post-hoc fixes, on both domains) from this earlier paper_table.json, per seed, and run only "
                         "the rest (the table says so)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    alphas = tuple(float(a) for a in args.alphas.split(","))
    out = Path(args.out)
    ablation_seeds = seeds if args.ablation_seeds is None else [int(s) for s in args.ablation_seeds.split(",")]
    main_results, domain_results = [], []
    reused = json.loads(Path(args.default_from).read_text()) if args.default_from else None
    earlier = json.loads(Path(args.unchanged_from).read_text()) if args.unchanged_from else None
    if earlier and reused:
        ap.error("--default-from and --unchanged-from exclude each other")

    def earlier_sweep(part: str, seed: int) -> dict | None:
        if earlier is None:
            return None
        found = [s for s in earlier[part] if s["settings"]["seed"] == seed]
        if not found:
            ap.error(f"{args.unchanged_from} has no {part} sweep of seed {seed}")
        return found[0]

    changed_alphas = tuple(a for a in alphas if not (earlier and a == 0))
    if reused:
        from types import SimpleNamespace

        main_results = [SimpleNamespace(summary=s, out=None) for s in reused["default_domain"]]
        seeds, alphas = reused["seeds"], tuple(reused["alphas"])
    for seed in seeds:
        if not reused:
            print(f"== seed {seed}: sweep of the default recipe")
            variants = {} if args.no_ablations or seed not in ablation_seeds else ABLATIONS
            result = sweep(SweepConfig(alphas=changed_alphas, out=str(out / f"seed-{seed}"), jobs=args.jobs,
                                       seed=seed, variants=variants, baselines=earlier is None), log=print)
            main_results.append(merged(result, earlier_sweep("default_domain", seed)))
        if not args.no_new_domain:
            print(f"== seed {seed}: {args.domain_steps} steps on the negative domain")
            train, val = write_negative_domain(out / f"negative-data-{seed}", seed)
            result = sweep(SweepConfig(alphas=(0.5,) if earlier else (0.0, 0.5),
                                       out=str(out / f"new-domain-seed-{seed}"), data=train, val=val,
                                       steps=args.domain_steps, seed=seed, jobs=args.jobs, baselines=earlier is None,
                                       variants=DOMAIN_ABLATIONS), log=print)
            domain_results.append(merged(result, earlier_sweep("new_domain", seed)))
    seed_rows = [by_name(r) for r in main_results]
    names = [f"a{a:g}" for a in alphas] + ([] if args.no_ablations else list(ABLATIONS)) + \
        ["base", "base+centring", "base+liang", "base+procrustes"]
    names = [n for n in names if any(n in rows for rows in seed_rows)]
    lines = table(seed_rows, names, "base")

    checks = quality_checks(seed_rows)
    if all("a0.5" in rows and "a0" in rows for rows in seed_rows):
        d = paired(seed_rows, "a0.5", "a0", "mixed.text_query_image_share@10")
        blind = statistics.fmean(rows["a0.5"]["metrics"].get("mixed.text_query_image_share_blind", float("nan"))
                                 for rows in seed_rows)
        checks.append(("α=0.5 text queries find images in a joint index (share@10 > α=0's)", d[0] - d[1] > 0,
                       f"{d[0]:+.4f} ± {d[1]:.4f}; a modality-blind ranking: {blind:.3f}"))
    if not args.no_ablations and any("a0.5-no-curriculum" in rows and "a0.5-no-curriculum-no-scheduler" in rows
                                     for rows in seed_rows):
        for key in ("zeroshot.top1", "retrieval.i2t_R@1"):
            d = paired(seed_rows, "a0.5-no-curriculum", "a0.5-no-curriculum-no-scheduler", key)
            checks.append((f"without the curriculum, the scheduler keeps {key} (scheduler on − off)", d[0] - d[1] > 0,
                           f"{d[0]:+.4f} ± {d[1]:.4f}"))
    domain_lines = []
    if domain_results:
        d_rows = [by_name(r) for r in domain_results]
        names = [n for n in ("a0", "a0.5", *DOMAIN_ABLATIONS, "base") if any(n in r for r in d_rows)]
        domain_lines = table(d_rows, names, "base")
        d = paired(d_rows, "a0.5", "a0", "zeroshot.top1")
        checks.append(("new domain, 60 steps: α=0.5 loses ≤ 5 % zero-shot against α=0", verdict(d, 0.05),
                       f"{100 * d[2]:+.1f} % ({d[0]:+.4f} ± {d[1]:.4f})"))
        for key in ("clustering.kmeans_ari", "caption.cider_d"):
            d = paired(d_rows, "a0.5", "a0", key)
            checks.append((f"new domain, 60 steps: α=0.5 {key} no worse than α=0 beyond the interval", verdict(d),
                           f"{d[0]:+.4f} ± {d[1]:.4f} ({100 * d[2]:+.1f} %)"))

    s0 = main_results[0].summary
    r2_lines = []
    for pop in s0["r2_by_population"].values():
        tab = pop["table"]
        metrics = list(next(iter(tab.values())).keys()) if tab else []
        r2_lines += [f"{pop['label']} (n = {pop['rows']}, seed {seeds[0]}):", "",
                     "| gap measure | " + " | ".join(metrics) + " |", "|" + "---|" * (1 + len(metrics))]
        r2_lines += [f"| {g} | " + " | ".join(f"{c['r2']:.3f}" for c in cells.values()) + " |"
                     for g, cells in tab.items()]
        r2_lines.append("")

    from cmalign.evaluation.runner import versions as package_versions

    versions = ", ".join(f"{k} {v}" for k, v in package_versions().items() if k not in ("platform", "python"))
    compute = sum(r.summary["compute_seconds"] for r in main_results + domain_results) / 60
    text = "\n".join([
        "# The paper's table in miniature (`benchmarks/paper_table.py`)", "",
        f"cmalign-tiny from its cached base, generated data (64 colour-shape classes), default fit recipe, seeds "
        f"{', '.join(map(str, seeds))}; {s0['created']}; {os.cpu_count()} CPU cores, {platform.platform()}, Python "
        f"{platform.python_version()}; {versions}; compute {compute:.0f} min (fits + evals, from their records).",
        "", "Each cell: mean over seeds ± half-width of its 95 % t-interval (the run's seed count in its name). Made "
        f"by `.venv/bin/python benchmarks/paper_table.py --seeds {args.seeds} --alphas {args.alphas}"
        f"{' --ablation-seeds ' + args.ablation_seeds if args.ablation_seeds else ''}"
        f"{' --default-from ' + args.default_from if args.default_from else ''}"
        f"{' --unchanged-from ' + args.unchanged_from if args.unchanged_from else ''}`.", "",
        *([f"The α = 0 rows, the base model and its post-hoc fixes (both domains) are the earlier run's "
           f"({earlier['default_domain'][0]['created']}, `--unchanged-from`): at α = 0 the alignment terms are not in "
           "the graph, so the change since cannot move them; every other row is new.", ""] if earlier else []),
        "## Default domain (300 steps from the cached base)", "",
        *([f"These rows are taken from the run of {s0['created']} (`--default-from {args.default_from}`): the change "
           "since leaves the default recipe's training unchanged.", ""] if reused else []),
        *lines, "",
        *(["## New domain: photographic negatives, "
           f"{args.domain_steps} steps (evaluated on negative validation images)", "", *domain_lines, ""]
          if domain_lines else []),
        "## Quality bars", "", *[f"- {'PASS' if ok else 'FAIL'}: {name}: {val}" for name, ok, val in checks], "",
        "## R² of each gap measure against each task metric", "",
        "The paper: R²(distribution gap) = 0.986, R²(raw gap) = 0.691.", "", *r2_lines])
    results = Path(args.results)
    (results / "paper_table.md").write_text(text)
    (results / "paper_table.json").write_text(json.dumps(
        {"seeds": seeds, "alphas": alphas, "checks": checks,
         "default_domain": [r.summary for r in main_results], "new_domain": [r.summary for r in domain_results]},
        indent=2, default=str))
    dest = results / "paper_table"  # the first seed's sweep report, as `cmalign sweep` writes it
    dest.mkdir(exist_ok=True)
    for f in ("report.md", "sweep.json", "pareto.png", "tradeoffs.png", "gap_vs_task.png"):
        if main_results[0].out is not None and (main_results[0].out / f).exists():
            shutil.copy(main_results[0].out / f, dest / f)
    print(text)


if __name__ == "__main__":
    main()
