"""`cmalign adapt` on the default benchmark: the adapter kinds against the post-hoc fixes, all from the stored
embeddings of the unaligned base export, on the same data with the same tasks.

    .venv/bin/python benchmarks/adapter_quality.py [--work runs/bench-adapter] [--steps 600]
                                                   [--kinds both,query,both-mlp]

Steps: export the cached base model; embed the generated train split with it (10,000 images, 50,000 captions: the
stored corpus); `adapt` each kind on those vectors (`both-mlp`: kind both with a residual MLP, `--hidden 256`);
`cmalign eval` each derived export against the base export with the post-hoc fixes (mean-centring, Liang,
Procrustes, GR-CLIP's centring) fitted on the base's vectors (for `both` and `query`). Writes
benchmarks/results/adapter_quality.json (summary rows of every system; each adapter against each fix, model − fix
with its paired interval; timings) and prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CMALIGN = str(Path(sys.executable).parent / "cmalign")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench-adapter")
    ap.add_argument("--steps", type=int, default=None, help="adapter steps (default: adapt's)")
    ap.add_argument("--kinds", default="both,query,both-mlp")
    ap.add_argument("--extra", default="", help="more `cmalign adapt` options, e.g. '--lambda-paired 0'")
    ap.add_argument("--result", default=str(Path(__file__).parent / "results" / "adapter_quality.json"))
    args = ap.parse_args()
    from cmalign.evaluation import EvalConfig, evaluate
    from cmalign.evaluation.posthoc import NAMES
    from cmalign.evaluation.report import AGAINST_FIXES, summary_rows
    from cmalign.model.base import ensure_base_model

    work = Path(args.work)
    base, emb = work / "base-export", work / "emb"
    timings = {}
    if not (base / "manifest.json").is_file():
        subprocess.run([CMALIGN, "export", str(ensure_base_model()), "--out", str(base), "--retrieval-images", "0",
                        "-q"], check=True)
    if not (emb / "manifest.json").is_file():
        t0 = time.time()
        subprocess.run([CMALIGN, "embed", str(base), "--data", "generated:train", "--out", str(emb), "-q"],
                       check=True)
        timings["embed_train_split"] = time.time() - t0
    out = {"what": __doc__.splitlines()[0], "command": " ".join(sys.argv), "systems": {}, "timings_seconds": timings,
           "machine": f"{os.cpu_count()} CPU cores, {platform.platform()}", "date": time.strftime("%Y-%m-%d")}
    for kind in args.kinds.split(","):
        adapter = work / f"adapter-{kind}"
        if not (adapter / "manifest.json").is_file():
            t0 = time.time()
            cmd = [CMALIGN, "adapt", str(emb), "--out", str(adapter), "--kind", kind.split("-")[0], "-q",
                   *(["--hidden", "256"] if kind.endswith("-mlp") else []), *args.extra.split()]
            if args.steps:
                cmd += ["--steps", str(args.steps)]
            subprocess.run(cmd, check=True)
            timings[f"adapt_{kind}"] = time.time() - t0
        t0 = time.time()
        result = evaluate(EvalConfig(source=str(adapter), baseline=str(base),
                                     posthoc=NAMES if kind in ("both", "query") else (),
                                     out=str(work / f"report-{kind}"), overwrite=True), log=print)
        timings[f"eval_{kind}"] = time.time() - t0
        m = result.metrics
        out["systems"][kind] = {label: dict(zip(m["systems"], cells, strict=True))
                                for label, cells in summary_rows(m)}
        out["systems"][kind]["adapter_summary"] = json.loads((adapter / "summary.json").read_text())
        if m["comparison"].get("model_against_fixes"):
            out.setdefault("against_fixes", {})[kind] = m["comparison"]["model_against_fixes"]
    Path(args.result).write_text(json.dumps(out, indent=2) + "\n")
    for kind, rows in out["systems"].items():
        print(f"== adapter {kind}")
        for label, cells in rows.items():
            if label != "adapter_summary":
                print(f"{label:28s} " + "  ".join(f"{k}={v}" for k, v in cells.items()))
    for kind, fixes in out.get("against_fixes", {}).items():
        print(f"== adapter {kind} − each fix (paired 95 % interval)")
        for fix, c in fixes.items():
            print(f"{fix:22s} " + "  ".join(
                f"{key.split('.', 1)[1]}={c['delta'][key]:+.4f} [{c['ci'][f'delta.{key}'][0]:+.4f}, "
                f"{c['ci'][f'delta.{key}'][1]:+.4f}]" for key, _ in AGAINST_FIXES
                if key in c["delta"] and f"delta.{key}" in c.get("ci", {})))


if __name__ == "__main__":
    main()
