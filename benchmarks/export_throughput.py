"""Throughput of torch eager vs the ONNX export, step by step, and of `embed` vs a bare session.

    .venv/bin/python benchmarks/export_throughput.py [--models tiny,ViT-B-32] [--repeats 5]

For each model (tiny = the embedded base; ViT-B-32 with random weights) and tower, at batch 1 and
32, the same inputs go through, interleaved in each repeat (this machine is shared and noisy):
torch eager; the exported fp32 graph with onnxruntime's basic optimisations only; extended; with
ORT_ENABLE_ALL (what the runtime uses); after onnxruntime.transformers' fusions (model_type
"clip"); and the int8 export; for text, the fp32 (ORT_ENABLE_ALL) and int8 graphs again on the ids with the
padding after the longest caption's EOT cut off, as the runtime runs them (eager gets open_clip's full context
length). Reports the median items/s and the ratio to eager. Then `embed` over
PNG files on disk against the bare sessions on already-preprocessed arrays, same model, same
images. Results: benchmarks/results/export_throughput.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cmalign.corpus.embed import EmbedConfig, embed_dataset
from cmalign.data.synth import make_scene, synth_split
from cmalign.export import load_export
from cmalign.export.graphs import ImageEncoder, TextEncoder
from cmalign.export.manifest import graph_file
from cmalign.export.onnx_export import ExportConfig, export_model
from cmalign.export.runtime import make_session
from cmalign.export.tokenizer import trim_padding
from cmalign.model.base import ensure_base_model
from cmalign.model.loading import load_model

RESULTS = Path(__file__).parent / "results" / "export_throughput.json"
# onnxruntime's threads spin after each run by default; interleaved with torch that steals torch's cores
# (tiny eager at batch 1 measured 100 ms a call), so the comparison turns spinning off.
NO_SPIN = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


def fused(src: Path, dst: Path, heads: int, width: int) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(src), model_type="clip", num_heads=heads, hidden_size=width)
    model.save_model_to_file(str(dst))
    return dst


def time_it(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def bench_model(name: str, work: Path, repeats: int) -> dict:
    if name == "tiny":
        source, model_name = str(ensure_base_model()), None
    else:
        source, model_name = None, name
    out = work / name
    export_model(ExportConfig(source=source, model=model_name, out=str(out), int8=True, retrieval_images=0,
                              overwrite=True))
    rt = load_export(out)
    loaded = load_model(f"local-dir:{source}" if source else name)
    model = loaded.model.eval()
    cfg = loaded.model_cfg
    images, captions = [], []
    for r in synth_split("val", n_images=32, captions_per_image=1).records:
        images.append(r.image.load().convert("RGB"))
        captions.append(r.caption)
    inputs = {"image": rt.preprocess(images), "text": rt.tokenize(captions)}
    eager = {"image": ImageEncoder(model).eval(), "text": TextEncoder(model).eval()}
    vision_heads = cfg["vision_cfg"]["width"] // cfg["vision_cfg"].get("head_width", 64)
    shapes = {"image": (vision_heads, cfg["vision_cfg"]["width"]),
              "text": (cfg["text_cfg"].get("heads", 8), cfg["text_cfg"]["width"])}
    report = {}
    for tower in ("image", "text"):
        fp32 = out / graph_file(tower, "fp32")
        runners = {"torch_eager": None,
                   "ort_fp32_basic": make_session(fp32, optimization="basic", config=NO_SPIN),
                   "ort_fp32_extended": make_session(fp32, optimization="extended", config=NO_SPIN),
                   "ort_fp32_all": make_session(fp32, optimization="all", config=NO_SPIN),
                   "ort_fp32_fused": make_session(fused(fp32, work / f"{name}-{tower}.fused.onnx", *shapes[tower]),
                                                  config=NO_SPIN),
                   "ort_int8": make_session(out / graph_file(tower, "int8"), config=NO_SPIN)}
        if tower == "text" and rt.trims_padding:  # what the runtime runs: the padding after the last EOT cut off
            runners |= {"ort_fp32_all_cut": runners["ort_fp32_all"], "ort_int8_cut": runners["ort_int8"]}
        for bs in (1, 32):
            x = inputs[tower][:bs]
            times: dict[str, list[float]] = {k: [] for k in runners}
            for _ in range(repeats):
                for k, s in runners.items():
                    if s is None:
                        with torch.no_grad():
                            times[k].append(time_it(eager[tower], torch.from_numpy(x)))
                    else:
                        xin = trim_padding(x) if k.endswith("_cut") else x
                        times[k].append(time_it(lambda a, s=s: s.run(None, {s.get_inputs()[0].name: a}), xin))
            base = statistics.median(times["torch_eager"])
            report[f"{tower}_batch{bs}"] = {k: {"items_per_s": round(bs / statistics.median(v), 2),
                                                "vs_eager": round(base / statistics.median(v), 3)}
                                            for k, v in times.items()}
            print(name, tower, f"batch {bs}", {k: v["vs_eager"] for k, v in report[f"{tower}_batch{bs}"].items()},
                  flush=True)
    report["embed_vs_bare_session"] = bench_embed(out, work / f"{name}-data", 2048 if name == "tiny" else 64,
                                                  max(3, repeats // 2))
    print(name, "embed vs bare session", report["embed_vs_bare_session"], flush=True)
    return report


def bench_embed(export: Path, data: Path, n: int, repeats: int) -> dict:
    """`embed` from PNG files (decode, preprocess, tokenise, write) vs bare sessions on prepared arrays.

    `embed`'s one-off setup (checksums, session creation, reading the CSV) is reported apart: it does
    not grow with the corpus, and the question is what the data pipeline costs per item.
    """
    data.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        scene = make_scene(0, "test", i)
        scene.load().save(data / f"{i}.png")
        rows.append({"filepath": f"{i}.png", "title": f"a picture of a {scene.shape}"})
    with open(data / "corpus.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["filepath", "title"])
        w.writeheader()
        w.writerows(rows)
    rt = load_export(export)
    from PIL import Image

    pixels = rt.preprocess([Image.open(data / r["filepath"]) for r in rows])
    tokens = rt.tokenize([r["title"] for r in rows])
    bare, full, setup = [], [], []
    for k in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, n, 64):
            rt.encode_pixels(pixels[i:i + 64])
        for i in range(0, n, 256):
            rt.encode_tokens(tokens[i:i + 256])
        bare.append(time.perf_counter() - t0)
        out = data / f"emb{k}"
        result = embed_dataset(EmbedConfig(export=str(export), data=str(data / "corpus.csv"), out=str(out)))
        full.append(result.seconds - result.setup_seconds)  # steady state: decode, infer, write
        setup.append(result.setup_seconds)
        shutil.rmtree(out)
    b, f = statistics.median(bare), statistics.median(full)
    return {"pairs": n, "bare_s": round(b, 3), "embed_s": round(f, 3), "embed_vs_bare": round(b / f, 3),
            "embed_setup_s": round(statistics.median(setup), 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,ViT-B-32")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {"torch_threads": torch.get_num_threads(), "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            results[name] = bench_model(name, Path(tmp), args.repeats)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
