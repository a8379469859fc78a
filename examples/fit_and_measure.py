"""Fine-tune the embedded default briefly from Python and compare the gap before and after.

    .venv/bin/python examples/fit_and_measure.py [--steps 200] [--alpha 0.5] [--out runs/example-a0.5]

The same as `cmalign fit --steps 200 --out runs/example-a0.5`, through the library (docs/fit.md).
"""

import argparse

from cmalign.train import fit, load_config

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
parser.add_argument("--alpha", type=float, default=0.5, help="alpha_target (default: 0.5)")
parser.add_argument("--out", default="runs/example-a0.5", help="run directory (default: runs/example-a0.5)")
args = parser.parse_args()

# Any key of RUN/config.toml can be overridden this way (docs/fit.md#configuration).
cfg = load_config(overrides={"alpha_target": args.alpha, "train.steps": args.steps, "train.out": args.out})
result = fit(cfg)
for key in ("raw", "centroid", "mmd2", "r1_t2i", "zeroshot_top1"):
    print(f"{key:>14}: {result.before[key]:.4f} -> {result.after[key]:.4f}")
print(f"model: local-dir:{result.model_dir}")
