"""`cmalign eval` of an α = 0.5 run against its α = 0 baseline (same base, same steps), with the post-hoc fixes
applied to the α = 0 run: the issue's quality bar on the default data, and what each fix does on every task.

    .venv/bin/python benchmarks/eval_alpha.py [--runs runs/bench-alpha] [--reuse] [--steps N]

With --reuse, existing runs (from benchmarks/alpha_gap.py) are evaluated instead of refitted. Writes
benchmarks/results/eval_alpha.json (the summary and timings) and eval_alpha/ (the full report directory).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

from cmalign.evaluation import EvalConfig, evaluate
from cmalign.evaluation.posthoc import NAMES
from cmalign.evaluation.report import summary_rows
from cmalign.train.config import load_config
from cmalign.train.loop import fit


def ensure_run(run: Path, alpha: float, steps: int | None, reuse: bool) -> Path:
    if not (reuse and (run / "model" / "open_clip_config.json").is_file()):
        shutil.rmtree(run, ignore_errors=True)
        fit(load_config(None, {"alpha_target": alpha, "train.steps": steps, "train.out": str(run)}))
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/bench-alpha")
    ap.add_argument("--steps", type=int, default=None, help="fit steps (default: the fit default, 300)")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--report", default="reports/bench-eval-alpha")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    runs = Path(args.runs)
    plain = ensure_run(runs / "a0", 0.0, args.steps, args.reuse)
    aligned = ensure_run(runs / "a0.5", 0.5, args.steps, args.reuse)
    result = evaluate(EvalConfig(source=str(aligned), baseline=str(plain), posthoc=NAMES,
                                 out=args.report, overwrite=True), log=print)
    m = result.metrics
    summary = {label: dict(zip(m["systems"], cells, strict=True)) for label, cells in summary_rows(m)}
    out = {"what": "cmalign eval of runs/a0.5 against runs/a0 (default recipe), post-hoc fixes on a0",
           "summary": summary, "comparison": m["comparison"], "timings_seconds": m["timings_seconds"],
           "seconds": m["seconds"], "data": {k: m["data"][k] for k in ("eval", "fit", "images", "captions")},
           "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
           "versions": m["versions"], "created": m["created"]}
    results = Path(args.results)
    (results / "eval_alpha.json").write_text(json.dumps(out, indent=2) + "\n")
    shutil.copytree(result.out, results / "eval_alpha", dirs_exist_ok=True)  # report.md, metrics.json, figures
    for label, cells in summary.items():
        print(f"{label:28s} " + "  ".join(f"{k}={v}" for k, v in cells.items()))


if __name__ == "__main__":
    main()
