"""Mixed-modality search in one joint index: an α = 0 run against an α = 0.5 run, from the same base.

For each α: `cmalign fit` (the default recipe, or reuse an existing run), `cmalign export` (fp32), `cmalign embed`
of the generated validation split (1000 images, 5000 captions), `cmalign index` (auto), then
:func:`cmalign.metrics.mixed.mixed_modality_report` through that index: for text queries, the share of images in the
top 10 and the rank of the paired image; for image queries, the share of texts and the rank of the best caption.

    .venv/bin/python benchmarks/mixed_modality.py [--alphas 0,0.5] [--runs runs/bench-alpha] [--reuse]

With --reuse, existing run directories (e.g. from benchmarks/alpha_gap.py) are exported instead of refitted.
Results: benchmarks/results/mixed_modality.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

from cmalign.corpus.embed import EmbedConfig, embed_dataset
from cmalign.corpus.store import load_embeddings
from cmalign.export.onnx_export import ExportConfig, export_model
from cmalign.index import IndexConfig, JointIndex, build_index
from cmalign.metrics.mixed import mixed_modality_report
from cmalign.train.config import load_config
from cmalign.train.loop import fit


def run_alpha(alpha: float, runs: Path, work: Path, steps: int | None, reuse: bool) -> dict:
    run = runs / f"a{alpha:g}"
    if not (reuse and (run / "model" / "open_clip_config.json").is_file()):
        shutil.rmtree(run, ignore_errors=True)
        fit(load_config(None, {"alpha_target": alpha, "train.steps": steps, "train.out": str(run)}))
    export, emb, idx = work / f"export-a{alpha:g}", work / f"emb-a{alpha:g}", work / f"idx-a{alpha:g}"
    for d in (export, emb, idx):
        shutil.rmtree(d, ignore_errors=True)
    export_model(ExportConfig(source=str(run), out=str(export), retrieval_images=0))
    embed_dataset(EmbedConfig(export=str(export), data="generated:val", out=str(emb)))
    built = build_index(IndexConfig(embeddings=str(emb), out=str(idx)))
    e = load_embeddings(emb)
    # the index holds, per shard, images then texts; with one shard that is exactly [images; texts]
    report = mixed_modality_report(e.image, e.text, e.image_metadata["pair_id"].to_numpy(),
                                   e.text_metadata["pair_id"].to_numpy(), k=10, index=JointIndex(idx))
    summary = json.loads((run / "summary.json").read_text())
    return {"alpha_target": alpha, "run": str(run), "index_factory": built.manifest["factory"],
            "raw_gap": summary["after"]["raw"], "centroid_gap": summary["after"]["centroid"], **report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alphas", default="0,0.5")
    ap.add_argument("--runs", default="runs/bench-alpha", help="where the fit runs are (or go)")
    ap.add_argument("--work", default="runs/bench-mixed", help="exports, embeddings and indexes")
    ap.add_argument("--steps", type=int, default=None, help="fit steps (default: the fit default)")
    ap.add_argument("--reuse", action="store_true", help="export existing runs instead of refitting")
    ap.add_argument("--result", default=str(Path(__file__).parent / "results" / "mixed_modality.json"))
    args = ap.parse_args()
    t0 = time.time()
    rows = [run_alpha(float(a), Path(args.runs), Path(args.work), args.steps, args.reuse)
            for a in args.alphas.split(",")]
    result = {"benchmark": "mixed_modality", "data": "generated:val (1000 images, 5000 captions)", "rows": rows,
              "seconds": round(time.time() - t0, 1), "machine": platform.platform(),
              "date": time.strftime("%Y-%m-%d")}
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'α':>5s} {'raw gap':>8s} {'img share@10 (text q)':>22s} {'pair img in top10':>18s} "
          f"{'median rank':>12s} {'txt share@10 (img q)':>21s} {'caption in top10':>17s}")
    for r in rows:
        print(f"{r['alpha_target']:5g} {r['raw_gap']:8.3f} {r['text_query_image_share@10']:22.3f} "
              f"{r['text_query_partner_hit@10']:18.3f} {r['text_query_partner_rank_median']:12.0f} "
              f"{r['image_query_text_share@10']:21.3f} {r['image_query_partner_hit@10']:17.3f}")


if __name__ == "__main__":
    main()
