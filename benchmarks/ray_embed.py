"""`cmalign embed --engine ray` against `--engine local` on the same data, side by side on this machine.

    .venv/bin/python benchmarks/ray_embed.py [--work runs/bench-ray] [--repeats 3] [--tiny-images 8000]
                                             [--vit-images 192]

Two exports: the embedded tiny model (decoding and Python dominate) and ViT-B-32 with random weights (inference
dominates, as with any real backbone). Each repeat runs, interleaved so that the machine's noise hits all alike,
each engine in a fresh process: local (`embed_dataset`, decoding threads + one onnxruntime session on every core),
ray with a new local instance per command (`--address local`: what one command on a bare machine costs), and ray
joining an instance started once with `ray start --head` (`--address auto`: what a cluster user pays). Throughput
is embeddings (images + captions) per second, end to end (the whole call) and while running (ray: from the first
actor's first batch to the last batch's end, as the actors stamp them; local: the embedding phase, its session
loaded during setup). Start-up is the time before that (ray: connecting, the per-node checks, Ray Data starting
and each actor loading its session). Medians over the repeats; ratios are ray over local. Results:
benchmarks/results/ray_embed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
RUN = """
import json, sys, time
from cmalign.corpus.embed import EmbedConfig, embed_dataset
from cmalign.cluster.connect import RayOptions
t = time.time()
cfg = EmbedConfig(**json.loads(sys.argv[1]))
cfg.cluster = RayOptions(**cfg.cluster)
r = embed_dataset(cfg)
print(json.dumps({"wall": time.time() - t, "seconds": r.seconds, "setup": r.setup_seconds,
                  "embeddings": r.images + r.texts, "encoding": r.encoding}))
"""


def _export(work: Path, name: str, model: str, pretrained: str) -> Path:
    out = work / name
    if not (out / "manifest.json").is_file():
        subprocess.run([str(VENV_BIN / "cmalign"), "export", "--model", model, "--pretrained", pretrained, "--out",
                        str(out), "--retrieval-images", "0", "-q"], check=True)
    return out


def _once(export: Path, data: str, out: Path, engine: str, address: str | None, batch: int) -> dict:
    cfg = {"export": str(export), "data": data, "out": str(out), "batch_size": batch, "engine": engine,
           "overwrite": True, "cluster": {"address": address, "actors": 2}, "shards": 1 if engine == "ray" else None}
    r = subprocess.run([sys.executable, "-c", RUN, json.dumps(cfg)], capture_output=True, text=True,
                       env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    if r.returncode:
        raise SystemExit(f"{engine} run failed:\n{r.stderr[-3000:]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    # end to end: the whole call, start-up included; running: while the encoders run (ray: from the first actor's
    # first batch to the last one's end; local: the embedding phase, its session loaded during setup)
    d["rate"] = d["embeddings"] / d["seconds"]
    first, last = d["encoding"] or (d["setup"], d["seconds"])
    d["running_rate"] = d["embeddings"] / max(last - first, 1e-9)
    d["startup_s"] = first
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="runs/bench-ray")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny-images", type=int, default=8000)
    ap.add_argument("--vit-images", type=int, default=192)
    ap.add_argument("--tiny-batch", type=int, default=64)
    ap.add_argument("--only", choices=("cmalign-tiny", "ViT-B-32"), help="run one of the two setups")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    setups = {"cmalign-tiny": (_export(work, "tiny-export", "cmalign-tiny", "cmalign-base"),
                               f"generated:val:{args.tiny_images}", args.tiny_batch),
              "ViT-B-32": (_export(work, "vit-b32-export", "ViT-B-32", "random"),
                           f"generated:val:{args.vit_images}", 32)}
    if args.only:
        setups = {args.only: setups[args.only]}
    engines = {"local": ("local", None), "ray (new instance)": ("ray", "local"),
               "ray (running cluster)": ("ray", "auto")}
    subprocess.run([str(VENV_BIN / "ray"), "stop", "--force"], capture_output=True)
    t = time.time()
    subprocess.run([str(VENV_BIN / "ray"), "start", "--head", "--num-cpus", str(os.cpu_count()),
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True)
    ray_start = time.time() - t
    runs: dict[str, dict[str, list[dict]]] = {s: {e: [] for e in engines} for s in setups}
    try:
        for rep in range(args.repeats):
            for setup, (export, data, batch) in setups.items():
                for engine, (name, address) in engines.items():
                    d = _once(export, data, work / "out" / setup / name, name, address, batch)
                    runs[setup][engine].append(d)
                    print(f"[{rep + 1}/{args.repeats}] {setup:12s} {engine:22s} {d['rate']:6.0f} embeddings/s end to "
                          f"end, {d['running_rate']:6.0f} running; start-up {d['startup_s']:.1f} s of "
                          f"{d['seconds']:.1f} s", flush=True)
    finally:
        subprocess.run([str(VENV_BIN / "ray"), "stop", "--force"], capture_output=True)
    summary = {}
    for setup, by_engine in runs.items():
        med = {e: {k: statistics.median(r[k] for r in rs)
                   for k in ("rate", "running_rate", "setup", "startup_s", "wall")}
               for e, rs in by_engine.items()}
        for e in engines:
            if e != "local":
                med[e]["rate_vs_local"] = med[e]["rate"] / med["local"]["rate"]
                med[e]["running_vs_local"] = med[e]["running_rate"] / med["local"]["running_rate"]
                med[e]["extra_startup_s"] = med[e]["startup_s"] - med["local"]["startup_s"]
        summary[setup] = med
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "repeats": args.repeats,
              "actors": 2, "ray_start_head_s": round(ray_start, 2), "data": {s: v[1] for s, v in setups.items()},
              "median": summary, "runs": runs}
    out = Path(__file__).parent / "results" / "ray_embed.json"
    out.write_text(json.dumps(result, indent=1))
    for setup, med in summary.items():
        for e, m in med.items():
            extra = (f"  ×{m['rate_vs_local']:.2f} of local end to end, ×{m['running_vs_local']:.2f} running, "
                     f"+{m['extra_startup_s']:.1f} s start-up" if "rate_vs_local" in m else "")
            print(f"{setup:12s} {e:22s} {m['rate']:6.0f} / {m['running_rate']:6.0f} embeddings/s end to end / "
                  f"running (median){extra}")
    print(f"`ray start --head`: {ray_start:.1f} s; results: {out}")


if __name__ == "__main__":
    main()
