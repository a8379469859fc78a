"""Fine-tune the embedded default briefly from Python and compare the gap before and after.

    .venv/bin/python examples/fit_and_measure.py
"""

from cmalign.train.config import load_config
from cmalign.train.loop import fit

cfg = load_config(overrides={"alpha_target": 0.5, "train.steps": 200, "train.out": "runs/example-a0.5"})
result = fit(cfg)
for key in ("raw", "centroid", "mmd2", "r1_t2i", "zeroshot_top1"):
    print(f"{key:>14}: {result.before[key]:.4f} -> {result.after[key]:.4f}")
print(f"model: local-dir:{result.model_dir}")
