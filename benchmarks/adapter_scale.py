"""`cmalign adapt` at scale on 2 CPU cores: training throughput at d = 512, wall time and memory on 100k and 1M
stored pairs, and re-mapping stored vectors against re-encoding the images.

    .venv/bin/python benchmarks/adapter_scale.py [--work runs/bench-adapter-scale] [--sizes 100000,1000000]

The stores are written in `cmalign embed`'s layout (float16, shards of 100k pairs, one caption per image) as if
by a ViT-B-32 export with random weights: that export is real (its fingerprint, graphs and the derived export
are), the vectors are synthetic — 64 clusters on the unit sphere, captions near their image, the two modalities
shifted apart by a common offset (a modality gap) — since embedding 1M images here would take ~13 hours. Memory is
the adapt process's peak anonymous RSS (polled): the memory-mapped vectors are file pages the kernel can drop, the
anonymous part is what the process holds. Re-encoding is timed on generated images with the same export and
extrapolated; re-mapping is `cmalign adapt-apply` on the whole store. Results:
benchmarks/results/adapter_scale.json.
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

import numpy as np

CMALIGN = str(Path(sys.executable).parent / "cmalign")
SHARD = 100_000


def _export(work: Path) -> Path:
    out = work / "vit-b32-export"
    if not (out / "manifest.json").is_file():
        subprocess.run([CMALIGN, "export", "--model", "ViT-B-32", "--pretrained", "random", "--out", str(out),
                        "--retrieval-images", "0", "-q"], check=True)
    return out


def _template(work: Path, export: Path) -> Path:
    out = work / "template-emb"
    if not (out / "manifest.json").is_file():
        subprocess.run([CMALIGN, "embed", str(export), "--data", "generated:val:32", "--out", str(out), "-q"],
                       check=True)
    return out


def _reencode_rate(export: Path, n: int = 64) -> float:
    """Images per second through the export's image graph (decode + preprocess + encode), batch 32."""
    from cmalign.data.synth import synth_split
    from cmalign.export.runtime import load_export

    model = load_export(export)
    images = [r.image.load() for r in synth_split("test", n_images=n, captions_per_image=1).records]
    model.encode_images(images[:32])
    t0 = time.perf_counter()
    model.encode_images(images, batch_size=32)
    return n / (time.perf_counter() - t0)


def _store(work: Path, template: Path, n: int, d: int = 512) -> Path:
    """n synthetic pairs in the embeddings layout, bound to the template's export."""
    from cmalign.artifacts.atomic import write_json
    from cmalign.corpus.store import merge_shards, save_array, save_metadata, shard_paths

    out = work / f"store-{n}"
    if (out / "manifest.json").is_file():
        return out
    own = json.loads((template / "shards" / "shard_0000.json").read_text())
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, d)).astype(np.float32)
    u = rng.normal(size=d).astype(np.float32)
    offset = 15.0 * u / np.linalg.norm(u)  # vectors are ~30 long before normalising: a gap of ~0.5 after
    num = (n + SHARD - 1) // SHARD
    for s in range(num):
        m = min(SHARD, n - s * SHARD)
        c = rng.integers(0, 64, m)
        img = centres[c] + 0.9 * rng.normal(size=(m, d)).astype(np.float32)
        txt = img + 0.8 * rng.normal(size=(m, d)).astype(np.float32) + offset
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        p = shard_paths(out, s)
        for sub in ("img_emb", "text_emb", "metadata", "shards", "bad_samples"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        save_array(p["image"], img.astype(np.float16))
        save_array(p["text"], txt.astype(np.float16))
        ids = np.arange(s * SHARD, s * SHARD + m)
        save_metadata(p["metadata"], {
            "modality": ["image"] * m + ["text"] * m, "row": list(range(m)) * 2, "pair_id": list(ids) * 2,
            "image_path": [f"img/{i}.jpg" for i in ids] * 2, "caption": [f"caption {i}" for i in ids] * 2,
            "label": [f"c{k}" for k in c] * 2, "key": [str(i) for i in ids] * 2, "source": [str(i) for i in ids] * 2})
        p["bad"].write_text("")
        write_json(p["manifest"], {**own, "shard": s, "num_shards": num, "dtype": "float16",
                                   "rows": {"images": m, "texts": m}, "skipped": 0,
                                   "data": {"path": "synthetic", "format": "synthetic", "images": n, "texts": n}})
    merge_shards(out)
    return out


def _peak_anon(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak anonymous RSS in MiB) of a command, polling /proc every 0.1 s."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode})")
    return time.time() - t0, peak / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench-adapter-scale")
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--result", default=str(Path(__file__).parent / "results" / "adapter_scale.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    export = _export(work)
    template = _template(work, export)
    rate = _reencode_rate(export)
    print(f"re-encoding (ViT-B-32 image graph, decode + preprocess + encode): {rate:.1f} images/s", flush=True)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        t0 = time.time()
        store = _store(work, template, n)
        write_s = time.time() - t0
        adapter = work / f"adapter-{n}"
        if adapter.exists():
            subprocess.run(["rm", "-rf", str(adapter)], check=True)
        wall, peak = _peak_anon([CMALIGN, "adapt", str(store), "--out", str(adapter), "--export", str(export),
                                 "--steps", str(args.steps), "-q"])
        m = json.loads((adapter / "manifest.json").read_text())
        summary = json.loads((adapter / "summary.json").read_text())
        mapped = work / f"mapped-{n}"
        subprocess.run(["rm", "-rf", str(mapped)], check=True)
        t0 = time.time()
        subprocess.run([CMALIGN, "adapt-apply", str(store), "--adapter", str(adapter), "--out", str(mapped)],
                       check=True, stdout=subprocess.DEVNULL)
        remap = time.time() - t0
        row = {"pairs": n, "dim": 512, "store_write_seconds": round(write_s, 1), "adapt_wall_seconds": round(wall, 1),
               "train_seconds": m["train_seconds"], "pairs_per_second": m["pairs_per_second"], "steps": m["steps"],
               "peak_anon_rss_mib": round(peak, 1), "remap_seconds": round(remap, 1),
               "reencode_seconds_extrapolated": round(n / rate, 1), "reencode_over_remap": round(n / rate / remap, 1),
               "held_out": summary}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "held_out"}), flush=True)
        subprocess.run(["rm", "-rf", str(mapped)], check=True)
    result = {"benchmark": "adapter_scale", "command": " ".join(sys.argv), "reencode_images_per_second": rate,
              "machine": f"{os.cpu_count()} CPU cores, {platform.platform()}", "date": time.strftime("%Y-%m-%d"),
              "rows": rows}
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
