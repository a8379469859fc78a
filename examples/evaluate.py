"""Evaluate a fitted run from Python: against the model it started from, beside the post-hoc fixes; then use the
metric functions directly on your own embeddings.

    .venv/bin/python examples/evaluate.py [RUN] [--out reports/example]   # e.g. after examples/fit_and_measure.py

The same as `cmalign eval RUN --posthoc centring,procrustes`, through the library (docs/eval.md).
"""

import argparse

import numpy as np

from cmalign.evaluation import EvalConfig, evaluate
from cmalign.evaluation.posthoc import fit_posthoc
from cmalign.metrics.clustering import joint_clustering
from cmalign.metrics.retrieval import retrieval_metrics

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("run", nargs="?", default="runs/example-a0.5", help="a run, export or model directory")
parser.add_argument("--out", default="reports/example", help="report directory (default: reports/example)")
parser.add_argument("--max-images", type=int, help="evaluate at most this many images (default: all)")
parser.add_argument("--fit-images", type=int, default=1000, help="images the decoder and fixes are fitted on")
parser.add_argument("--decoder-epochs", type=int, default=6, help="caption decoder epochs (default: 6)")
args = parser.parse_args()

cfg = EvalConfig(source=args.run, posthoc=("centring", "procrustes"), out=args.out, overwrite=True,
                 max_images=args.max_images, fit_images=args.fit_images)
cfg.decoder.epochs = args.decoder_epochs
result = evaluate(cfg, log=print)
for name, system in result.metrics["systems"].items():
    print(f"{name:>22}: raw gap {system['gap']['raw']:.3f}  R@1 i→t {system['retrieval']['i2t_R@1']:.3f}  "
          f"ARI {system['clustering']['kmeans_ari']:.3f}  CIDEr-D {system['caption']['cider_d']:.3f}")
print(f"report: {result.out / 'report.md'}")

# The building blocks work on any arrays (L2-normalised rows; caption j belongs to image caption_image[j]).
rng = np.random.default_rng(0)
images = rng.normal(size=(100, 32))
images /= np.linalg.norm(images, axis=1, keepdims=True)
texts = images + 0.5  # a crude "gap": every text shifted the same way
texts /= np.linalg.norm(texts, axis=1, keepdims=True)
print("R@1 i→t of the shifted pairs:", retrieval_metrics(images, texts, np.arange(100))["i2t_R@1"])
centring = fit_posthoc("centring", images, texts)
print("joint clustering after centring:",
      joint_clustering(centring.image(images), centring.text(texts), rng.integers(0, 4, 100), hdbscan=False))
