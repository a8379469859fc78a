"""The six tasks on one system's embeddings; each returns a flat dict of figures (see DEFINITIONS)."""

from __future__ import annotations

import time

import numpy as np

from cmalign.evaluation.captioning.decoder import train_decoder
from cmalign.evaluation.captioning.scores import caption_scores
from cmalign.evaluation.datasets import EvalData
from cmalign.evaluation.system_embeddings import Embedded
from cmalign.metrics import gap, retrieval
from cmalign.metrics.clustering import DEFINITIONS as CLUSTER_DEFINITIONS
from cmalign.metrics.clustering import class_weights, joint_clustering, zero_shot_accuracy
from cmalign.metrics.mixed import mixed_modality_report


def gap_task(e: Embedded, data: EvalData, cfg) -> dict:
    return gap.gap_report(e.image, e.first_captions(data), seed=cfg.seed).to_dict()


def retrieval_task(e: Embedded, data: EvalData, cfg) -> dict:
    return retrieval.retrieval_metrics(e.image, e.text, data.eval.caption_image)


def mixed_task(e: Embedded, data: EvalData, cfg) -> dict:
    # Exact search: on an evaluation set the index library's auto choice is Flat (exact) anyway, and the task
    # measures the embedding space, not an approximate index's recall (that is benchmarks/index_benchmark.py).
    out = mixed_modality_report(e.image, e.text, np.arange(len(e.image)), data.eval.caption_image, k=cfg.k)
    out["search"] = "exact (inner product over all images and captions)"
    return out


def clustering_task(e: Embedded, data: EvalData, cfg) -> dict:
    labels = np.asarray(data.eval.labels)
    n_templates = e.prompts.shape[1]
    cls = np.searchsorted(np.asarray(e.classes), labels)
    texts = e.prompts[cls, np.arange(len(labels)) % n_templates]  # templates taken in turn
    return joint_clustering(e.image, texts, labels, seed=cfg.seed)


def zeroshot_task(e: Embedded, data: EvalData, cfg) -> dict:
    return zero_shot_accuracy(e.image, data.eval.labels, e.classes, class_weights(e.prompts))


def caption_task(e: Embedded, data: EvalData, cfg, progress=None) -> dict:
    t0 = time.perf_counter()
    decoder = train_decoder(e.fit_text, data.fit.captions, cfg.decoder, progress=progress)
    train_seconds = time.perf_counter() - t0
    keys = [str(i) for i in range(len(e.image))]
    refs: dict[str, list[str]] = {k: [] for k in keys}
    for caption, owner in zip(data.eval.captions, data.eval.caption_image, strict=True):
        refs[keys[owner]].append(caption)
    from_image = decoder.generate(e.image)
    from_text = decoder.generate(e.first_captions(data))
    img = caption_scores(dict(zip(keys, from_image, strict=True)), refs)
    txt = caption_scores(dict(zip(keys, from_text, strict=True)), refs)
    return {
        "cider_d": img["cider_d"], "bleu4": img["bleu4"],
        "text_ceiling_cider_d": txt["cider_d"], "text_ceiling_bleu4": txt["bleu4"],
        "images": img["images"], "train_captions": len(data.fit.captions), "vocabulary": decoder.vocabulary_size,
        "final_train_loss": decoder.history[-1], "train_seconds": round(train_seconds, 1),
        "cider_seconds": round(img["cider_seconds"] + txt["cider_seconds"], 3),
        "examples": [{"references": refs[k][:3], "from_image": from_image[i], "from_text": from_text[i]}
                     for i, k in enumerate(keys[:5])],
    }


TASK_FUNCTIONS = {"gap": gap_task, "retrieval": retrieval_task, "mixed": mixed_task, "clustering": clustering_task,
                  "zeroshot": zeroshot_task, "caption": caption_task}
NEEDS_LABELS = ("clustering", "zeroshot")

DEFINITIONS = {
    "gap.raw": "raw gap G_R = sqrt(mean_i ||x_i − y_i||²) over (image, first caption) pairs",
    "gap.centroid": "centroid gap G_C = ||μ_x − μ_y||",
    "gap.paired_residual": "paired residual G_P (G_R² = G_C² + G_P²)",
    "gap.mmd2": "headline distribution gap: unbiased multi-bandwidth RBF MMD² of the centred clouds",
    "gap.bures": "Bures distance of the two covariances",
    "gap.coral": "CORAL ||Σ_x − Σ_y||²_F / 4d²",
    "gap.w2": "2-Wasserstein distance of Gaussian fits, sqrt(G_C² + Bures²)",
    "gap.rmg": "relative modality gap (Schrodi et al. 2025), in [0, 1]",
    "gap_reduction.<measure>": "1 − measure(system) / measure(baseline), on the same evaluation pairs",
    **{f"retrieval.{k}": v for k, v in retrieval.DEFINITIONS.items()},
    "mixed.text_query_image_share@k": "text queries in one index of all images and captions: share of images in "
                                      "the top k (0 when the gap sends texts to texts)",
    "mixed.text_query_partner_hit@k": "share of text queries whose own image is in that top k",
    "mixed.text_query_partner_rank_median": "median rank of a text query's own image among all items",
    "mixed.image_query_text_share@k": "image queries: share of captions in the top k",
    "mixed.image_query_partner_hit@k": "share of image queries with one of their captions in the top k",
    "mixed.image_query_partner_rank_median": "median rank of an image query's best caption among all items",
    **{f"clustering.{k}": v for k, v in CLUSTER_DEFINITIONS.items() if not k.startswith("top")
       and k != "mean_per_class"},
    **{f"zeroshot.{k}": v for k, v in CLUSTER_DEFINITIONS.items() if k.startswith("top") or k == "mean_per_class"},
    "caption.cider_d": "CIDEr-D (pycocoevalcap's Cider value; papers print it ×100, 1.13 → 113) of "
                       "captions decoded from image embeddings by a prefix decoder trained on text embeddings only",
    "caption.bleu4": "BLEU-4 (pycocoevalcap) of the same captions",
    "caption.text_ceiling_cider_d": "CIDEr-D of the same decoder fed each image's first caption's text embedding "
                                    "(its own input caption is among the references: an upper bound)",
}
