"""Evaluate a fitted run from Python: against the model it started from, beside the post-hoc fixes; then use the
metric functions directly on your own embeddings.

    .venv/bin/python examples/evaluate.py runs/example-a0.5     # e.g. after examples/fit_and_measure.py
"""

import sys

import numpy as np

from cmalign.evaluation import EvalConfig, evaluate
from cmalign.evaluation.posthoc import fit_posthoc
from cmalign.metrics.clustering import joint_clustering
from cmalign.metrics.retrieval import retrieval_metrics

run = sys.argv[1] if len(sys.argv) > 1 else "runs/example-a0.5"
result = evaluate(EvalConfig(source=run, posthoc=("centring", "procrustes"), out="reports/example", overwrite=True),
                  log=print)
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
print(retrieval_metrics(images, texts, np.arange(100))["i2t_R@1"])
centring = fit_posthoc("centring", images, texts)
print(joint_clustering(centring.image(images), centring.text(texts), rng.integers(0, 4, 100), hdbscan=False))
