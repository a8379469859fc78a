"""Export a fitted run, embed the generated validation set with the torch-free runtime, and query it.

    .venv/bin/cmalign fit                                   # once: writes runs/cmalign-tiny-a0.5
    .venv/bin/python examples/export_and_embed.py [RUN]

The same as `cmalign export RUN --int8` followed by `cmalign embed EXPORT`, through the library.
"""

import sys
from pathlib import Path

import numpy as np

from cmalign.corpus.embed import EmbedConfig, embed_dataset
from cmalign.corpus.store import load_embeddings
from cmalign.export import ExportConfig, export_model, load_export

run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cmalign-tiny-a0.5")
if not (run / "model").is_dir():
    sys.exit(f"{run} is not a fit run directory; run `cmalign fit` first (or pass RUN)")

export = export_model(ExportConfig(source=str(run), out=f"exports/{run.name}", int8=True, overwrite=True))
for variant, towers in export.manifest["graphs"].items():
    print(variant, {t: round(g["parity"]["min_cosine"], 6) for t, g in towers.items()},
          "R@1", export.manifest["retrieval"].get(variant))

result = embed_dataset(EmbedConfig(export=str(export.out), data="generated:val", out=f"emb/{run.name}",
                                   overwrite=True))
emb = load_embeddings(result.out)
print(f"{len(emb.image)} image and {len(emb.text)} text embeddings in {result.out}")

model = load_export(export.out)  # no torch from here on in a production process
query = model.encode_texts(["three small red circles"])[0]
for i in np.argsort(-(emb.image @ query))[:5]:
    row = emb.image_metadata.iloc[i]
    print(f"{float(emb.image[i] @ query):.3f}  {row['label']:8s}  {row['caption']}")
