"""The issue's quality bars for the current default recipe at α = 0.5, over seeds, against the α = 0 runs of the
committed paper table.

    .venv/bin/python benchmarks/default_recipe_bars.py [--seeds 0,1,2] [--runs /tmp/bars] [--fit-args "--lr 1e-4"]

For a change to the α = 0.5 recipe that leaves α = 0 training as it was (at α = 0 the alignment terms are not in
the graph, so `loss.*` settings change nothing): per seed, `cmalign fit --seed N` (the default recipe) and `cmalign
eval RUN --baseline none` on the tasks without the caption decoder, then the same paired checks as
`benchmarks/paper_table.py` against that table's α = 0 and base rows of the same seed. A run or an eval already in
RUNS is reused (resumable). Writes benchmarks/results/default_recipe_bars.json (``--results``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))
from paper_table import NOT_WORSE, by_name, fmt, paired, verdict  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CLI = str(Path(sys.executable).parent / "cmalign")
TASKS = "gap,retrieval,mixed,zeroshot,clustering"
KEYS = ["gap.raw", "retrieval.i2t_R@1", "retrieval.t2i_R@1", "zeroshot.top1", "clustering.kmeans_ari",
        "mixed.text_query_image_share@10", "mixed.image_query_text_share@10"]


def flat(metrics: dict) -> dict:
    return {f"{task}.{k}": v for task, figures in metrics.items() if isinstance(figures, dict)
            for k, v in figures.items() if isinstance(v, (int, float))}


def run_seed(seed: int, runs: Path, fit_args: list[str]) -> dict:
    run, ev = runs / f"s{seed}", runs / f"s{seed}-eval"
    if not (run / "model" / "open_clip_model.safetensors").is_file():
        subprocess.run([CLI, "fit", "--seed", str(seed), "--out", str(run), "--quiet", *fit_args], check=True)
    if not (ev / "metrics.json").is_file():
        subprocess.run([CLI, "eval", str(run), "--baseline", "none", "--tasks", TASKS, "--no-figures", "--out",
                        str(ev), "-q"], check=True)
    config = (run / "config.toml").read_text()
    return {"metrics": flat(json.loads((ev / "metrics.json").read_text())["systems"]["model"]), "config": config}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", default="/tmp/default-recipe-bars")
    ap.add_argument("--reference", default=str(RESULTS / "paper_table.json"))
    ap.add_argument("--fit-args", default="", help="options for every `cmalign fit` (a variant of the default)")
    ap.add_argument("--results", default=str(RESULTS / "default_recipe_bars.json"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    reference = json.loads(Path(args.reference).read_text())
    by_seed = {sweep["settings"]["seed"]: by_name(SimpleNamespace(summary=sweep))
               for sweep in reference["default_domain"]}
    seed_rows = []
    for seed in seeds:
        if seed not in by_seed:
            raise SystemExit(f"{args.reference} has no default-domain sweep of seed {seed}")
        new = run_seed(seed, Path(args.runs), shlex.split(args.fit_args))
        seed_rows.append({"a0": by_seed[seed]["a0"], "base": by_seed[seed]["base"],
                          "a0.5": {"metrics": new["metrics"]}})
    red = [1 - rows["a0.5"]["metrics"]["gap.raw"] / rows["base"]["metrics"]["gap.raw"] for rows in seed_rows]
    checks = [("α=0.5 closes ≥ 85 % of the raw gap against the original model", min(red) >= 0.85,
               f"{fmt([100 * v for v in red], '.1f')} % (min {100 * min(red):.1f} %)")]
    for key in [k for k in NOT_WORSE if k != "caption.cider_d"]:
        d = paired(seed_rows, "a0.5", "a0", key)
        checks.append((f"α=0.5 {key} no worse than α=0 beyond the interval", verdict(d),
                       f"difference {d[0]:+.4f} ± {d[1]:.4f} ({100 * d[2]:+.1f} %)"))
    rows = {name: {k: fmt([r[name]["metrics"][k] for r in seed_rows], ".4f") for k in KEYS}
            for name in ("a0", "a0.5")}
    for name, figures in rows.items():
        print(name, figures)
    for text, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {text}: {detail}")
    out = {"benchmark": "default_recipe_bars", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
           "command": "benchmarks/default_recipe_bars.py " + " ".join(sys.argv[1:]), "seeds": seeds,
           "reference": "α = 0 and base rows of " + Path(args.reference).name, "rows": rows,
           "per_seed": {str(s): {k: r["a0.5"]["metrics"][k] for k in KEYS}
                        for s, r in zip(seeds, seed_rows, strict=True)},
           "checks": [{"check": t, "pass": ok, "detail": d} for t, ok, d in checks],
           "not_measured": "CIDEr-D (the caption decoder), the ablations and the new domain: "
                           "benchmarks/paper_table.py re-measures them"}
    Path(args.results).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
