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
from cmalign.metrics import clustering, gap, gap_intervals, intervals, mixcorpus, retrieval, zeroshot
from cmalign.metrics.bootstrap import bootstrap, counts


class Evaluator:
    """``bootstrap`` > 0 (the runner sets it from EvalConfig) adds, beside the figures, ``"ci"`` ({figure:
    [low, high]}, 95 % bootstrap intervals over resampled images) and ``"_replicates"`` ({figure: array}, for
    paired intervals of differences); the runner moves both out of the task's figures. ``no_ci`` says why a
    returned number has no interval."""

    name: str
    needs_labels: bool = False
    primary_metric: str
    higher_is_better: bool = True
    definitions: dict[str, str] = {}
    no_ci: dict[str, str] = {}
    bootstrap: int = 0  # resamples of the cheap figures; 0: no intervals
    bootstrap_slow: int = 200  # resamples of the O(n²) and covariance figures (capped at ``bootstrap``)
    bootstrap_seed: int = 0

    def __call__(self, e: SystemEmbeddings, data: EvalData, progress=None) -> dict:
        raise NotImplementedError

    def _with_intervals(self, out: dict, compute) -> dict:
        """``compute()`` → Bootstrap results; attaches their intervals and replicates when asked for."""
        if self.bootstrap > 0:
            t0 = time.perf_counter()
            out["ci"], out["_replicates"] = intervals.merge(*compute())
            out["_bootstrap_seconds"] = time.perf_counter() - t0
        return out


SIZE = "a size or setting of the evaluation, not an estimate"


@dataclass
class GapEvaluator(Evaluator):
    seed: int = 0
    name = "gap"
    primary_metric = "raw"
    higher_is_better = False
    definitions = {
        "raw": "raw gap G_R = sqrt(mean_i ||x_i − y_i||²) over (image, first caption) pairs: the paper's \"raw gap\" "
               "as DESIGN.md reconstructs it (an RMS distance; l2i_first is its mean-distance counterpart)",
        "centroid": "centroid gap (L2M) G_C = ||μ_x − μ_y|| (Liang et al. 2022; \"L2M\" in Schrodi et al. 2025)",
        "paired_residual": "paired residual G_P (G_R² = G_C² + G_P²)",
        "mmd2": "headline distribution gap: unbiased multi-bandwidth RBF MMD² of the centred clouds",
        "bures": "Bures distance of the two covariances",
        "coral": "CORAL ||Σ_x − Σ_y||²_F / 4d²",
        "w2": "2-Wasserstein distance of Gaussian fits, sqrt(G_C² + Bures²)",
        "rmg": "relative modality gap (Schrodi et al. 2025), in [0, 1]",
        "l2i_first": "L2I (Schrodi et al. 2025) = mean_i ||x_i − y_i||, image against its first caption "
                     "(≤ raw by Jensen)",
        "l2i_mean_caption": "L2I against the image's mean caption: the mean of its L2-normalised caption embeddings, "
                            "re-normalised to unit length (the spread of the phrasings no longer sets a floor)",
        "raw_mean_caption": "raw gap (RMS) against the same re-normalised mean caption",
    }
    no_ci = {"n": SIZE, "d": SIZE}

    def __call__(self, e, data, progress=None) -> dict:
        x, y = e.image, e.first_captions(data)
        report = gap.gap_report(x, y, seed=self.seed).to_dict()
        sizes = {k: report.pop(k) for k in ("n", "d")}
        out = {**report, **gap.caption_gap_measures(e.image, e.text, data.eval.caption_image), **sizes}

        def compute():
            fast, slow = gap_intervals.gap_bootstrap(x, y, reps=self.bootstrap, seed=self.bootstrap_seed,
                                           slow_reps=min(self.bootstrap_slow, self.bootstrap))
            basic = {m: out[m] for m in gap_intervals.BASIC_INTERVAL}
            if fast is not None:  # the true gaps are ≥ 0 (an unbiased MMD² estimate need not be)
                fast = _renamed(fast, {"l2i": "l2i_first"}).basic(basic, floor=0.0)
            if slow is not None:
                slow = slow.basic(basic, floor=0.0)
            mean = gap.mean_caption_embeddings(e.text, data.eval.caption_image, len(x))
            d = gap.paired_distances(x, mean)
            n = len(d)

            def stat(idx):
                w = counts(idx, n)
                return np.stack([w @ d / n, np.sqrt(w @ d**2 / n)])

            return fast, slow, bootstrap(n, stat, ("l2i_mean_caption", "raw_mean_caption"), self.bootstrap,
                                         self.bootstrap_seed)

        return self._with_intervals(out, compute)


@dataclass
class RetrievalEvaluator(Evaluator):
    name = "retrieval"
    primary_metric = "t2i_R@1"
    definitions = retrieval.DEFINITIONS
    no_ci = {"images": SIZE, "captions": SIZE}

    def __call__(self, e, data, progress=None) -> dict:
        out, per_query = retrieval.retrieval_metrics(e.image, e.text, data.eval.caption_image, per_query=True)
        return self._with_intervals(out, lambda: [intervals.retrieval_intervals(
            per_query, data.eval.caption_image, self.bootstrap, self.bootstrap_seed)])


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
        "text_query_image_share_blind": "what text_query_image_share would be under a modality-blind ranking: the "
                                        "share of images among a text's relevant items (its images and their other "
                                        "captions)",
        "image_query_text_share_blind": "the same for image queries: the share of captions among an image's "
                                        "relevant items (its captions and the other images they describe)",
        "duplicate_texts_merged": "captions whose string repeats another's, counted once (their partners merged): "
                                  "a duplicate scores 1.0 against its twin and would decide a text query's top k",
    }

    no_ci = {"k": SIZE, "images": SIZE, "texts": SIZE, "duplicate_texts_merged": SIZE}

    def __post_init__(self):
        self.primary_metric = f"text_query_image_share@{self.k}"

    def __call__(self, e, data, progress=None) -> dict:
        from cmalign.metrics.mixed import mixed_modality_report

        # Exact search: on an evaluation set the index library's auto choice is Flat (exact) anyway, and the task
        # measures the embedding space, not an approximate index's recall (that is benchmarks/index_benchmark.py).
        out, per_query = mixed_modality_report(e.image, e.text, np.arange(len(e.image)), data.eval.caption_image,
                                               k=self.k, per_query=True, captions=data.eval.captions)
        out["search"] = "exact (inner product over all images and distinct captions)"
        return self._with_intervals(out, lambda: [intervals.mixed_intervals(
            per_query, per_query["text_image"], self.k, self.bootstrap, self.bootstrap_seed)])


@dataclass
class MixedCorpusEvaluator(Evaluator):
    k: int = 10
    name = "mixcorpus"
    primary_metric = "ndcg_range"
    higher_is_better = False
    definitions = {
        "ndcg@k_p=P": "text queries against a corpus whose documents are each its image (probability P) or a "
                      "caption (otherwise), after GR-CLIP's MixBench: NDCG@k of the query's own document (the "
                      "query is another caption of the same image)",
        "image_documents_p=P": "share of documents stored as images at P (the same draw at every P: nested corpora)",
        "ndcg_range": "max − min of NDCG@k over P: 0 is a flat curve (the space does not care which modality a "
                      "document is in)",
        "ndcg_sag": "mean of the two ends − the lowest inner point: > 0 is the U an unaligned space draws",
    }
    no_ci = {f"image_documents_p={p:g}": SIZE for p in mixcorpus.DEFAULT_PS}

    def __call__(self, e, data, progress=None) -> dict:
        out, each = mixcorpus.mixed_corpus_ndcg(e.image, e.text, data.eval.caption_image, data.eval.captions, k=self.k,
                                      seed=self.bootstrap_seed, per_query=True)
        names = list(each)
        values = np.stack([each[m] for m in names])
        n = values.shape[1]

        def compute():
            def stat(idx):
                means = counts(idx, n) @ values.T / n  # (batch, len(names))
                return np.concatenate([means.T, [means.max(1) - means.min(1)],
                                       [(means[:, 0] + means[:, -1]) / 2 - means[:, 1:-1].min(1)]])

            return [bootstrap(n, stat, names + ["ndcg_range", "ndcg_sag"], self.bootstrap, self.bootstrap_seed)]

        return self._with_intervals(out, compute)


@dataclass
class ClusteringEvaluator(Evaluator):
    seed: int = 0
    name = "clustering"
    needs_labels = True
    primary_metric = "kmeans_ari"
    definitions = clustering.DEFINITIONS
    no_ci = {"classes": SIZE, "points": SIZE, "hdbscan_min_cluster_size": SIZE,
             "hdbscan_clusters": "a property of the one clustering, which the intervals hold fixed"}

    def __call__(self, e, data, progress=None) -> dict:
        labels = np.asarray(data.eval.labels)
        n_templates = e.prompts.shape[1]
        cls = np.searchsorted(np.asarray(e.classes), labels)
        texts = e.prompts[cls, np.arange(len(labels)) % n_templates]  # templates taken in turn
        out, assignments = clustering.joint_clustering(e.image, texts, labels, seed=self.seed,
                                                       return_assignments=True)
        return self._with_intervals(out, lambda: [intervals.clustering_intervals(
            assignments, self.bootstrap, self.bootstrap_seed)])


@dataclass
class ZeroShotEvaluator(Evaluator):
    name = "zeroshot"
    needs_labels = True
    primary_metric = "top1"
    definitions = zeroshot.DEFINITIONS
    no_ci = {"classes": SIZE, "images": SIZE}

    def __call__(self, e, data, progress=None) -> dict:
        out, per_image = zeroshot.zero_shot_accuracy(e.image, data.eval.labels, e.classes,
                                                     zeroshot.class_weights(e.prompts), per_image=True)
        return self._with_intervals(out, lambda: [intervals.zeroshot_intervals(
            per_image, self.bootstrap, self.bootstrap_seed)])


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
        "rouge_l": "ROUGE-L (pycocoevalcap's Rouge: LCS F-measure, β = 1.2, best reference) of the same captions, "
                   "mean over images",
        "text_ceiling_cider_d": "CIDEr-D of the same decoder fed each image's first caption's text embedding "
                                "(its own input caption is among the references: an upper bound)",
        "text_ceiling_bleu4": "BLEU-4 of the same text-fed captions",
        "text_ceiling_rouge_l": "ROUGE-L of the same text-fed captions",
    }
    no_ci = {"images": SIZE, "train_captions": SIZE, "vocabulary": SIZE,
             "final_train_loss": "a property of the decoder's training, not of the evaluation images",
             "train_seconds": "a timing", "cider_seconds": "a timing"}

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
        img, img_each = caption_scores(dict(zip(keys, from_image, strict=True)), refs, per_image=True)
        txt, txt_each = caption_scores(dict(zip(keys, from_text, strict=True)), refs, per_image=True)
        out = {
            "cider_d": img["cider_d"], "bleu4": img["bleu4"], "rouge_l": img["rouge_l"],
            "text_ceiling_cider_d": txt["cider_d"], "text_ceiling_bleu4": txt["bleu4"],
            "text_ceiling_rouge_l": txt["rouge_l"],
            "images": img["images"], "train_captions": len(data.fit.captions), "vocabulary": decoder.vocabulary_size,
            "final_train_loss": decoder.history[-1], "train_seconds": round(train_seconds, 1),
            "cider_seconds": round(img["cider_seconds"] + txt["cider_seconds"], 3),
            "examples": [{"references": refs[k][:3], "from_image": from_image[i], "from_text": from_text[i]}
                         for i, k in enumerate(keys[:5])],
        }
        # the decoder and CIDEr-D's IDF stay fixed: the interval covers the sampling of evaluation images only
        return self._with_intervals(out, lambda: [intervals.caption_intervals(
            {"": img_each, "text_ceiling_": txt_each}, self.bootstrap, self.bootstrap_seed)])


EVALUATORS = {c.name: c for c in (GapEvaluator, RetrievalEvaluator, MixedModalityEvaluator, MixedCorpusEvaluator,
                                  ClusteringEvaluator, ZeroShotEvaluator, CaptionEvaluator)}


def evaluators_for(cfg) -> list[Evaluator]:
    """The evaluators of ``cfg.tasks`` (an EvalConfig), in that order, with the config's settings."""
    settings = {"gap": {"seed": cfg.seed}, "clustering": {"seed": cfg.seed}, "mixed": {"k": cfg.k},
                "mixcorpus": {"k": cfg.k}, "caption": {"decoder": cfg.decoder}}
    out = [EVALUATORS[t](**settings.get(t, {})) for t in cfg.tasks]
    for ev in out:
        ev.bootstrap = getattr(cfg, "bootstrap", 0)
        ev.bootstrap_slow = getattr(cfg, "bootstrap_slow", Evaluator.bootstrap_slow)
        ev.bootstrap_seed = cfg.seed
    return out


def without_ci() -> dict[str, str]:
    """Why a returned number has no interval, keyed ``task.figure``."""
    out = {f"{name}.{k}": v for name, cls in EVALUATORS.items() for k, v in cls.no_ci.items()}
    out["mixed.search"] = out["caption.examples"] = "not a number"
    return out


def definitions() -> dict[str, str]:
    """Every figure's definition, keyed ``task.figure`` as in metrics.json."""
    out = {f"{name}.{k}": v for name, cls in EVALUATORS.items() for k, v in cls.definitions.items()}
    out["gap_reduction.<measure>"] = "1 − measure(system) / measure(baseline), on the same evaluation pairs"
    out["ci.<system>.<task>.<figure>"] = (
        "95 % bootstrap interval [low, high] over the evaluation images (scipy.stats.bootstrap; an image carries "
        "its captions), fixed seed: percentile, except the basic interval for the gap figures of estimated means "
        "and covariances; see \"bootstrap\" for the repetitions, those figures and what is held fixed")
    out["comparison.ci.<gap_reduction|delta>.<figure>"] = (
        "paired interval of a change against the reference: the same image resamples for both systems, "
        "replicate by replicate")
    out["comparison.model_against_fixes.<fix>"] = (
        "the model's changes against one post-hoc fix (delta = model − fix), with paired intervals as above; "
        "present when post-hoc fixes were evaluated beside a model")
    return out


def _renamed(b, names: dict):
    from dataclasses import replace

    return replace(b, names=tuple(names.get(n, n) for n in b.names))
