"""One evaluator object per task of DESIGN.md §3, in the shape of sentence-transformers' evaluators.

An evaluator knows its name, whether it needs class labels, its primary metric and which way is better, and the
definition of every figure it returns; called on one system's embeddings it returns a flat dict of figures. The
runner only loops over them, so a new task is one class here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from cmalign.evaluation.captioning.config import DecoderConfig
from cmalign.evaluation.datasets import EvalData
from cmalign.evaluation.system_embeddings import SystemEmbeddings
from cmalign.metrics import clustering, gap, retrieval, zeroshot


class Evaluator:
    name: str
    needs_labels: bool = False
    primary_metric: str
    higher_is_better: bool = True
    definitions: dict[str, str] = {}

    def __call__(self, e: SystemEmbeddings, data: EvalData, progress=None) -> dict:
        raise NotImplementedError


@dataclass
class GapEvaluator(Evaluator):
    seed: int = 0
    name = "gap"
    primary_metric = "raw"
    higher_is_better = False
    definitions = {
        "raw": "raw gap G_R = sqrt(mean_i ||x_i − y_i||²) over (image, first caption) pairs",
        "centroid": "centroid gap G_C = ||μ_x − μ_y||",
        "paired_residual": "paired residual G_P (G_R² = G_C² + G_P²)",
        "mmd2": "headline distribution gap: unbiased multi-bandwidth RBF MMD² of the centred clouds",
        "bures": "Bures distance of the two covariances",
        "coral": "CORAL ||Σ_x − Σ_y||²_F / 4d²",
        "w2": "2-Wasserstein distance of Gaussian fits, sqrt(G_C² + Bures²)",
        "rmg": "relative modality gap (Schrodi et al. 2025), in [0, 1]",
    }

    def __call__(self, e, data, progress=None) -> dict:
        return gap.gap_report(e.image, e.first_captions(data), seed=self.seed).to_dict()


@dataclass
class RetrievalEvaluator(Evaluator):
    name = "retrieval"
    primary_metric = "t2i_R@1"
    definitions = retrieval.DEFINITIONS

    def __call__(self, e, data, progress=None) -> dict:
        return retrieval.retrieval_metrics(e.image, e.text, data.eval.caption_image)


@dataclass
class MixedModalityEvaluator(Evaluator):
    k: int = 10
    name = "mixed"
    primary_metric = "text_query_image_share@10"
    definitions = {
        "text_query_image_share@k": "text queries in one index of all images and captions: share of images in "
                                    "the top k (0 when the gap sends texts to texts)",
        "text_query_partner_hit@k": "share of text queries whose own image is in that top k",
        "text_query_partner_rank_median": "median rank of a text query's own image among all items",
        "image_query_text_share@k": "image queries: share of captions in the top k",
        "image_query_partner_hit@k": "share of image queries with one of their captions in the top k",
        "image_query_partner_rank_median": "median rank of an image query's best caption among all items",
    }

    def __post_init__(self):
        self.primary_metric = f"text_query_image_share@{self.k}"

    def __call__(self, e, data, progress=None) -> dict:
        from cmalign.metrics.mixed import mixed_modality_report

        # Exact search: on an evaluation set the index library's auto choice is Flat (exact) anyway, and the task
        # measures the embedding space, not an approximate index's recall (that is benchmarks/index_benchmark.py).
        out = mixed_modality_report(e.image, e.text, np.arange(len(e.image)), data.eval.caption_image, k=self.k)
        out["search"] = "exact (inner product over all images and captions)"
        return out


@dataclass
class ClusteringEvaluator(Evaluator):
    seed: int = 0
    name = "clustering"
    needs_labels = True
    primary_metric = "kmeans_ari"
    definitions = clustering.DEFINITIONS

    def __call__(self, e, data, progress=None) -> dict:
        labels = np.asarray(data.eval.labels)
        n_templates = e.prompts.shape[1]
        cls = np.searchsorted(np.asarray(e.classes), labels)
        texts = e.prompts[cls, np.arange(len(labels)) % n_templates]  # templates taken in turn
        return clustering.joint_clustering(e.image, texts, labels, seed=self.seed)


@dataclass
class ZeroShotEvaluator(Evaluator):
    name = "zeroshot"
    needs_labels = True
    primary_metric = "top1"
    definitions = zeroshot.DEFINITIONS

    def __call__(self, e, data, progress=None) -> dict:
        return zeroshot.zero_shot_accuracy(e.image, data.eval.labels, e.classes, zeroshot.class_weights(e.prompts))


@dataclass
class CaptionEvaluator(Evaluator):
    """The caption-prefix protocol: a decoder trained on text embeddings only, decoding from image embeddings."""

    decoder: DecoderConfig | None = None
    name = "caption"
    primary_metric = "cider_d"
    definitions = {
        "cider_d": "CIDEr-D (pycocoevalcap's Cider value; papers print it ×100, 1.13 → 113) of "
                   "captions decoded from image embeddings by a prefix decoder trained on text embeddings only",
        "bleu4": "BLEU-4 (pycocoevalcap) of the same captions",
        "text_ceiling_cider_d": "CIDEr-D of the same decoder fed each image's first caption's text embedding "
                                "(its own input caption is among the references: an upper bound)",
    }

    def __call__(self, e, data, progress=None) -> dict:
        from cmalign.evaluation.captioning.decoder import train_decoder  # torch: only when this task runs
        from cmalign.evaluation.captioning.scores import caption_scores

        t0 = time.perf_counter()
        decoder = train_decoder(e.fit_text, data.fit.captions, self.decoder or DecoderConfig(), progress=progress)
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


EVALUATORS = {c.name: c for c in (GapEvaluator, RetrievalEvaluator, MixedModalityEvaluator, ClusteringEvaluator,
                                  ZeroShotEvaluator, CaptionEvaluator)}


def evaluators_for(cfg) -> list[Evaluator]:
    """The evaluators of ``cfg.tasks`` (an EvalConfig), in that order, with the config's settings."""
    settings = {"gap": {"seed": cfg.seed}, "clustering": {"seed": cfg.seed}, "mixed": {"k": cfg.k},
                "caption": {"decoder": cfg.decoder}}
    return [EVALUATORS[t](**settings.get(t, {})) for t in cfg.tasks]


def definitions() -> dict[str, str]:
    """Every figure's definition, keyed ``task.figure`` as in metrics.json."""
    out = {f"{name}.{k}": v for name, cls in EVALUATORS.items() for k, v in cls.definitions.items()}
    out["gap_reduction.<measure>"] = "1 − measure(system) / measure(baseline), on the same evaluation pairs"
    return out
