"""α_target = 0 vs α_target = 0.5 (or any list) from the same base, equal steps: what alignment buys.

Runs `cmalign.train.loop.fit` once per α with the default config (embedded base model and data), then
prints and writes the validation figures side by side, with the raw-gap reduction of each run
against the α = 0 run (the acceptance bar: ≥ 50 %; the paper reports 82.3 % for α = 0.5).

    .venv/bin/python benchmarks/alpha_gap.py [--alphas 0,0.5] [--steps 400] [--out-root runs/bench]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch

from cmalign.metrics import gap
from cmalign.train.config import load_config
from cmalign.train.loop import fit

KEYS = ("raw", "centroid", "paired_residual", "mmd2", "bures", "coral", "rmg", "r1_i2t", "r1_t2i", "zeroshot_top1")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--alphas", default="0,0.5")
    ap.add_argument("--steps", type=int, default=None, help="default: the fit default")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides key=value")
    ap.add_argument("--out-root", default="runs/bench-alpha")
    ap.add_argument("--result", default=str(Path(__file__).parent / "results" / "alpha_gap.json"))
    args = ap.parse_args()

    alphas = [float(a) for a in args.alphas.split(",")]
    overrides = dict(kv.split("=", 1) for kv in args.set)
    runs = {}
    for a in alphas:
        out = Path(args.out_root) / f"a{a:g}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = load_config(None, {**overrides, "alpha_target": a, "train.steps": args.steps, "train.out": str(out)})
        res = fit(cfg)
        runs[a] = {"before": res.before, "after": res.after, "seconds": res.seconds, "steps": res.steps}
    ref = runs[alphas[0]]["after"]
    table = []
    for a in alphas:
        row = {"alpha_target": a, **{k: runs[a]["after"][k] for k in KEYS}}
        if a != alphas[0]:
            for k in ("raw", "centroid", "mmd2"):
                row[f"{k}_reduction_vs_alpha{alphas[0]:g}"] = gap.gap_reduction(ref[k], row[k]) if ref[k] > 0 else None
        table.append(row)
    result = {
        "benchmark": "alpha_gap",
        "base": runs[alphas[0]]["before"],
        "runs": table,
        "seconds": {str(a): runs[a]["seconds"] for a in alphas},
        "steps": runs[alphas[0]]["steps"],
        "overrides": overrides,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(result, indent=2))
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
