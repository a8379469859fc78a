"""Export a fitted run, embed the generated validation set with the torch-free runtime, and query it.

    .venv/bin/cmalign fit                                   # once: writes runs/cmalign-tiny-a0.5
    .venv/bin/python examples/export_and_embed.py [RUN] [--export DIR] [--emb DIR]

The same as `cmalign export RUN --int8` followed by `cmalign embed EXPORT`, through the library
(docs/export.md, docs/embed.md).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from cmalign.corpus import EmbedConfig, embed_dataset, load_embeddings
from cmalign.export import ExportConfig, export_model, load_export

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("run", nargs="?", default="runs/cmalign-tiny-a0.5", help="a `cmalign fit` run directory")
parser.add_argument("--export", help="export directory to write (default: exports/<run name>)")
parser.add_argument("--emb", help="embeddings directory to write (default: emb/<run name>)")
parser.add_argument("--data", default="generated:val", help="data set to embed (default: generated:val)")
parser.add_argument("--retrieval-images", type=int, default=1000,
                    help="images of export's R@1 check per variant; 0 skips it (default: 1000)")
args = parser.parse_args()

run = Path(args.run)
if not (run / "model").is_dir():
    sys.exit(f"{run} is not a fit run directory; run `cmalign fit` first (or pass RUN)")

export = export_model(ExportConfig(source=str(run), out=args.export or f"exports/{run.name}", int8=True,
                                   retrieval_images=args.retrieval_images, overwrite=True))
for variant, towers in export.manifest["graphs"].items():
    print(variant, {t: round(g["parity"]["min_cosine"], 6) for t, g in towers.items()},
          "R@1", export.manifest["retrieval"].get(variant))

result = embed_dataset(EmbedConfig(export=str(export.out), data=args.data, out=args.emb or f"emb/{run.name}",
                                   overwrite=True))
emb = load_embeddings(result.out)
print(f"{len(emb.image)} image and {len(emb.text)} text embeddings in {result.out}")

model = load_export(export.out)  # no torch from here on in a production process
query = model.encode_texts(["three small red circles"])[0]
for i in np.argsort(-(emb.image @ query))[:5]:
    row = emb.image_metadata.iloc[i]
    print(f"{float(emb.image[i] @ query):.3f}  {row['label']:8s}  {row['caption']}")
