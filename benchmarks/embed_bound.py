"""`cmalign embed` against the bound its own stages allow on this machine's cores.

    .venv/bin/python benchmarks/embed_bound.py [--work runs/bench-embed-bound] [--repeats 3] [--models tiny,ViT-B-32]
        [--tiny-images 1024,8192]

For each model (the embedded tiny base; ViT-B-32 with random weights) and each image format (the generated PNGs at
64 px; the same scenes as 512 px JPEGs, photo-sized), N images with 5 captions each are written as files and a CSV.

* **Stage costs**: each stage alone, on one thread, over every item, in CPU seconds per image (its 5 captions
  included): decode (open + load), preprocess (resize, crop, normalise), tokenise, image inference and text
  inference (onnxruntime with 1 intra-op thread, the export's batch sizes), write (the shard's arrays and
  parquet).
* **Bound**: with every stage able to overlap the others, the pipeline is CPU-bound and its best rate on C cores is
  C / (sum of the stage costs) images/s; the slowest stage alone bounds it only if it cannot be split.
* **Achieved**: `embed_dataset` with its defaults on the same files (decode threads + onnxruntime's threads), its
  images/s over the embedding phase and its CPU utilisation (process CPU time / (wall × C)): what is left is idle
  time in the pipeline, not work. Twice, interleaved: with onnxruntime's threads not spinning between runs (the
  default since this benchmark) and spinning (onnxruntime's own default).
* **Phases**: where the achieved run's time went: the image phase (decode threads beside inference) and the text
  phase (one tokenising thread beside inference) run one after the other, each with its wall and CPU seconds, then
  the write. CPU above the stages' sum is what running them together costs; wall × C above CPU is idle cores.
  The tiny model runs at two corpus sizes: at 1024 images a run lasts about a second and the fixed costs (first
  runs of each batch shape, thread start-up, the write) weigh; 8192 is closer to its steady state.

Medians over the repeats. Results: benchmarks/results/embed_bound.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import cmalign.corpus.embed as embed_module
from cmalign.corpus.embed import EmbedConfig, embed_dataset
from cmalign.corpus.store import save_array, save_metadata
from cmalign.data.synth import make_scene
from cmalign.export.runtime import NO_SPINNING, ExportedModel

CAPTIONS = 5
VENV_BIN = Path(sys.executable).parent


def _export(work: Path, name: str) -> Path:
    out = work / f"{name}-export"
    if not (out / "manifest.json").is_file():
        model, pretrained = ("cmalign-tiny", "cmalign-base") if name == "tiny" else (name, "random")
        subprocess.run([str(VENV_BIN / "cmalign"), "export", "--model", model, "--pretrained", pretrained, "--out",
                        str(out), "--retrieval-images", "0", "-q"], check=True)
    return out


def _data(work: Path, fmt: str, n: int) -> tuple[Path, list[str], list[str]]:
    """N scenes as files (png: as generated; jpeg: upscaled to 512 px) and a CSV of their 5 captions each."""
    root = work / f"data-{fmt}-{n}"
    files, captions = [], []
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        scene = make_scene(0, "val", i)
        path = root / f"{i:05d}.{'png' if fmt == 'png' else 'jpg'}"
        if not path.is_file():
            img = scene.load()
            if fmt == "jpeg":
                img.resize((512, 512), Image.BICUBIC).save(path, quality=90)
            else:
                img.save(path)
        caps = [f"{scene.colour} {scene.shape} {i} view {j}" for j in range(CAPTIONS)]
        files.append(str(path))
        captions.extend(caps)
        rows.extend((path.name, c, scene.shape) for c in caps)
    with open(root / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title", "label"])
        w.writerows(rows)
    return root / "data.csv", files, captions


def _cpu(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def stage_costs(export: Path, files: list[str], captions: list[str], batch: int) -> dict:
    """CPU seconds per image of each stage alone, one thread."""
    model = ExportedModel(export, threads=1)
    pre = model.preprocessor
    n = len(files)
    # A batch at a time, as embed does (and 8192 decoded 512-px images held at once would be 6 GB: page faults
    # counted as decoding): decode (open + load), then the preprocessor's batch (resize, crop, RGB; one normalise).
    pixels: list = []
    costs = {"decode": 0.0, "preprocess": 0.0}
    for i in range(0, n, batch):
        t = time.process_time()
        decoded = [Image.open(f).copy() for f in files[i:i + batch]]
        t2 = time.process_time()
        pixels.append(pre.batch(decoded))
        costs["decode"] += t2 - t
        costs["preprocess"] += time.process_time() - t2
    tokens: list = []
    step = batch * 4
    costs["tokenise"] = _cpu(lambda: tokens.extend(model.tokenize(captions[i:i + step])
                                                   for i in range(0, len(captions), step)))
    arr = np.concatenate(pixels)
    img_emb, txt_emb = [], []
    model.encode_pixels(arr[:batch])  # first-run allocations are not a per-item cost
    costs["image inference"] = _cpu(lambda: img_emb.extend(model.encode_pixels(arr[i:i + batch])
                                                            for i in range(0, n, batch)))
    costs["text inference"] = _cpu(lambda: txt_emb.extend(model.encode_tokens(t) for t in tokens))
    meta = {"modality": ["text"] * len(captions), "row": list(range(len(captions))), "pair_id": [0] * len(captions),
            "image_path": ["x"] * len(captions), "caption": captions, "label": [""] * len(captions),
            "key": [""] * len(captions), "source": [""] * len(captions)}
    with tempfile.TemporaryDirectory() as tmp:
        costs["write"] = _cpu(lambda: (save_array(Path(tmp) / "i.npy", np.concatenate(img_emb)),
                                       save_array(Path(tmp) / "t.npy", np.concatenate(txt_emb)),
                                       save_metadata(Path(tmp) / "m.parquet", meta)))
    return {k: v / n for k, v in costs.items()}


PHASES = {"_embed_images": "images", "_embed_texts": "texts", "write_shard": "write"}


def _timed_phases(times: dict) -> dict:
    """Wrap embed's phase functions so that each call records (wall, process CPU) seconds into ``times``."""
    originals = {name: getattr(embed_module, name) for name in PHASES}

    def wrap(name, fn):
        def timed(*args, **kwargs):
            t, c = time.perf_counter(), time.process_time()
            result = fn(*args, **kwargs)
            times[PHASES[name]] = (time.perf_counter() - t, time.process_time() - c)
            return result
        return timed

    for name, fn in originals.items():
        setattr(embed_module, name, wrap(name, fn))
    return originals


def achieved(export: Path, data: Path, out: Path, batch: int, spinning: bool) -> dict:
    embed_module.SESSION_CONFIG = {} if spinning else NO_SPINNING
    times: dict = {}
    originals = _timed_phases(times)
    try:
        t_cpu, t_wall = os.times(), time.perf_counter()
        r = embed_dataset(EmbedConfig(export=str(export), data=str(data), out=str(out), batch_size=batch,
                                      overwrite=True))
        cpu = sum(os.times()[:2]) - sum(t_cpu[:2])
        wall = time.perf_counter() - t_wall
    finally:
        for name, fn in originals.items():
            setattr(embed_module, name, fn)
    phase = r.seconds - r.setup_seconds
    per_image = {f"{k}_{what}_ms_per_image": v[i] / r.images * 1e3
                 for k, v in times.items() for i, what in enumerate(("wall", "cpu"))}
    return {"images_per_s": r.images / phase, "cpu_utilisation": cpu / (wall * (os.cpu_count() or 1)),
            "phase_s": phase, **per_image}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="runs/bench-embed-bound")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="tiny,ViT-B-32")
    ap.add_argument("--tiny-images", default="1024,8192", help="corpus sizes for the tiny model (ViT-B-32: 96)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    report = {"machine": {"cpus": cores, "platform": platform.platform()}, "repeats": args.repeats,
              "date": time.strftime("%Y-%m-%d"), "setups": {}}
    for name in args.models.split(","):
        export = _export(work, name)
        sizes, batch = ([int(x) for x in args.tiny_images.split(",")], 64) if name == "tiny" else ([96], 32)
        for n, fmt in ((n, fmt) for n in sizes for fmt in ("png", "jpeg")):
            data, files, captions = _data(work, fmt, n)
            costs, runs = [], {"no spinning (default)": [], "spinning (onnxruntime's default)": []}
            for _ in range(args.repeats):  # interleaved: the stage profile and the pipeline see the same noise
                costs.append(stage_costs(export, files, captions, batch))
                for variant, got in runs.items():
                    got.append(achieved(export, data, work / "out" / f"{name}-{fmt}", batch,
                                        spinning=variant.startswith("spinning")))
            cost = {k: statistics.median(c[k] for c in costs) for k in costs[0]}
            bound = cores / sum(cost.values())
            setup = {"images": n, "captions_per_image": CAPTIONS, "stage_cpu_ms_per_image":
                     {k: round(v * 1e3, 3) for k, v in cost.items()}, "bound_images_per_s": round(bound, 1)}
            print(f"{name:9s} {fmt:4s} {n:5d} images, stages (CPU ms/image): " +
                  ", ".join(f"{k} {v:.2f}" for k, v in setup["stage_cpu_ms_per_image"].items()) +
                  f"; bound {bound:.0f} images/s on {cores} cores", flush=True)
            for variant, rs in runs.items():
                got = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                setup[variant] = {"achieved_images_per_s": round(got["images_per_s"], 1),
                                  "share_of_bound": round(got["images_per_s"] / bound, 3),
                                  "cpu_utilisation": round(got["cpu_utilisation"], 3),
                                  "phases": {k: round(v, 4) for k, v in got.items() if k.endswith("per_image")}}
                phases = ", ".join(f"{p} {got[p + '_wall_ms_per_image']:.2f} wall / {got[p + '_cpu_ms_per_image']:.2f}"
                                   f" CPU" for p in PHASES.values())
                print(f"    {variant:34s} achieved {got['images_per_s']:.0f} images/s "
                      f"({got['images_per_s'] / bound:.2f} of the bound), CPU {got['cpu_utilisation']:.0%} busy; "
                      f"ms/image: {phases}", flush=True)
            report["setups"][f"{name} {fmt}" + (f" {n}" if name == "tiny" else "")] = setup
    out = Path(__file__).parent / "results" / "embed_bound.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
