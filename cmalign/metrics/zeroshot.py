"""Zero-shot classification: the discriminative power that alignment may cost (DESIGN.md §3).

Class weights are CLIP's recipe: the mean of each class's normalised prompt embeddings (one per template),
renormalised; an image is assigned the class with the most similar weight.
"""

from __future__ import annotations

import numpy as np

from cmalign.errors import ConfigError
from cmalign.metrics.vectors import l2_normalize


def zero_shot_accuracy(image_emb: np.ndarray, labels, class_names, class_weights: np.ndarray,
                       per_image: bool = False):
    """Top-1 (and top-5 where there are more than 5 classes) with one weight row per class name.

    ``per_image=True`` returns ``(figures, per_image)``: each image's class index and whether its top-1 (top-5)
    was right, for the bootstrap intervals.
    """
    labels = list(labels)
    index = {c: i for i, c in enumerate(class_names)}
    missing = sorted({lbl for lbl in labels if lbl not in index})
    if missing:
        raise ConfigError(f"labels without a class weight: {missing[:5]}")
    truth = np.asarray([index[lbl] for lbl in labels])
    scores = np.asarray(image_emb, np.float32) @ np.asarray(class_weights, np.float32).T
    top1 = scores.argmax(1) == truth
    per_class = [top1[truth == c].mean() for c in range(len(class_names)) if np.any(truth == c)]
    out = {"top1": float(top1.mean()), "mean_per_class": float(np.mean(per_class)),
           "classes": int(len(class_names)), "images": int(len(labels))}
    each = {"truth": truth, "top1": top1.astype(np.float64)}
    if len(class_names) > 5:
        top5 = np.argsort(-scores, axis=1)[:, :5]
        each["top5"] = (top5 == truth[:, None]).any(1).astype(np.float64)
        out["top5"] = float(np.mean(each["top5"]))
    return (out, each) if per_image else out


def class_weights(prompt_emb: np.ndarray) -> np.ndarray:
    """(classes, templates, d) normalised prompt embeddings → renormalised per-class means (CLIP's recipe)."""
    return l2_normalize(np.asarray(prompt_emb, np.float64).mean(axis=1))


DEFINITIONS = {
    "top1": "zero-shot top-1: image classified by the most similar template-averaged class embedding",
    "mean_per_class": "zero-shot top-1 averaged per class (balanced accuracy)",
    "top5": "zero-shot top-5",
}
