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
from paper_table import by_name, fmt, quality_checks  # noqa: E402

from cmalign.sweep.analysis import flatten  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CLI = str(Path(sys.executable).parent / "cmalign")
TASKS = "gap,retrieval,mixed,zeroshot,clustering"
KEYS = ["gap.raw", "retrieval.i2t_R@1", "retrieval.t2i_R@1", "zeroshot.top1", "clustering.kmeans_ari",
        "mixed.text_query_image_share@10", "mixed.image_query_text_share@10"]


def run_seed(seed: int, runs: Path, fit_args: list[str]) -> dict:
    """The figures of seed's α = 0.5 run, flattened as the sweep flattens the reference rows."""
    run, ev = runs / f"s{seed}", runs / f"s{seed}-eval"
    if not (run / "model" / "open_clip_model.safetensors").is_file():
        subprocess.run([CLI, "fit", "--seed", str(seed), "--out", str(run), "--quiet", *fit_args], check=True)
    if not (ev / "metrics.json").is_file():
        subprocess.run([CLI, "eval", str(run), "--baseline", "none", "--tasks", TASKS, "--no-figures", "--out",
                        str(ev), "-q"], check=True)
    return flatten(json.loads((ev / "metrics.json").read_text())["systems"]["model"])


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
        metrics = run_seed(seed, Path(args.runs), shlex.split(args.fit_args))
        seed_rows.append({"a0": by_seed[seed]["a0"], "base": by_seed[seed]["base"], "a0.5": {"metrics": metrics}})
    checks = quality_checks(seed_rows)  # CIDEr-D is left out: these evals have no caption decoder
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
