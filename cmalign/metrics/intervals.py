"""Bootstrap intervals of each evaluation task's figures, resampling *images* (an image carries its captions).

Each function takes the per-item quantities its task already computed and returns
:class:`cmalign.metrics.bootstrap.Bootstrap` results (or None when there is nothing to resample). What is held
fixed is part of the definition: the joint index of the mixed task, the cluster assignments, the decoder and the
CIDEr-D IDF — so each interval covers the sampling of evaluation items only.
"""

from __future__ import annotations

import numpy as np

from cmalign.metrics.bootstrap import (
    DEFAULT_REPS,
    LEVEL,
    Bootstrap,
    bootstrap,
    contingency_ari,
    contingency_nmi,
    counts,
    group_totals,
    weighted_median,
)


def merge(*results: Bootstrap | None) -> tuple[dict, dict]:
    """({figure: [low, high] | None}, {figure: replicates}) over several results."""
    ci, reps = {}, {}
    for r in results:
        if r is not None:
            ci.update(r.intervals())
            reps.update(r.replicates())
    return ci, reps


def retrieval_intervals(per_query: dict, caption_image, reps: int = DEFAULT_REPS, seed: int = 0,
                        level: float = LEVEL) -> Bootstrap | None:
    """i→t figures over resampled images; t→i figures over the captions of the resampled images."""
    owner = np.asarray(caption_image, np.int64)
    ks = sorted(int(k.split("@")[1]) for k in per_query if k.startswith("i2t_hit@"))
    i2t = np.stack([per_query[f"i2t_hit@{k}"] for k in ks] + [per_query["i2t_rank"]], axis=1)
    i2t_rank = np.asarray(per_query["i2t_rank"], np.float64)
    t2i_rank = np.asarray(per_query["t2i_rank"], np.float64)
    n = len(i2t)
    t2i_sums = group_totals(np.stack([per_query[f"t2i_hit@{k}"] for k in ks] + [t2i_rank], axis=1), owner, n)
    per_image = np.bincount(owner, minlength=n).astype(np.float64)
    names = ([f"i2t_R@{k}" for k in ks] + ["i2t_mean_rank", "i2t_median_rank"]
             + [f"t2i_R@{k}" for k in ks] + ["t2i_mean_rank", "t2i_median_rank"])

    def stat(idx):
        w = counts(idx, n)
        a = w @ i2t / n
        t = (w @ t2i_sums) / (w @ per_image)[:, None]
        return np.concatenate([a[:, :-1].T, a[:, -1:].T, np.median(i2t_rank[idx], axis=1)[None],
                               t[:, :-1].T, t[:, -1:].T, weighted_median(t2i_rank, w[:, owner])[None]])

    return bootstrap(n, stat, names, reps, seed, level, width=len(owner))


def mixed_intervals(per_query: dict, caption_image, k: int, reps: int = DEFAULT_REPS, seed: int = 0,
                    level: float = LEVEL) -> Bootstrap | None:
    """Mixed-modality figures over resampled image queries and the caption queries of those images; the joint
    index they search is held fixed. ``caption_image``: each text query's image (``per_query["text_image"]``
    after deduplication, where a merged caption goes with the first image it describes)."""
    owner = np.asarray(caption_image, np.int64)
    n = len(per_query["image_rank"])
    t_rank = np.asarray(per_query["text_rank"], np.float64)
    i_rank = np.asarray(per_query["image_rank"], np.float64)
    t_blind = per_query.get("text_blind", np.zeros_like(t_rank))
    i_blind = per_query.get("image_blind", np.zeros_like(i_rank))
    t_sums = group_totals(np.stack([per_query["text_other"], per_query["text_valid"], t_rank <= k, t_rank,
                                    np.ones_like(t_rank), t_blind], axis=1), owner, n)
    i_items = np.stack([per_query["image_other"], per_query["image_valid"], i_rank <= k, i_rank, i_blind], axis=1)
    names = (f"text_query_image_share@{k}", f"text_query_partner_hit@{k}", "text_query_partner_rank_median",
             "text_query_partner_rank_mean", f"image_query_text_share@{k}", f"image_query_partner_hit@{k}",
             "image_query_partner_rank_median", "image_query_partner_rank_mean", "text_query_image_share_blind",
             "image_query_text_share_blind")

    def stat(idx):
        w = counts(idx, n)
        t = w @ t_sums
        i = w @ i_items
        return np.stack([t[:, 0] / np.maximum(t[:, 1], 1), t[:, 2] / t[:, 4], weighted_median(t_rank, w[:, owner]),
                         t[:, 3] / t[:, 4], i[:, 0] / np.maximum(i[:, 1], 1), i[:, 2] / n,
                         np.median(i_rank[idx], axis=1), i[:, 3] / n, t[:, 5] / t[:, 4], i[:, 4] / n])

    return bootstrap(n, stat, names, reps, seed, level, width=len(owner))


def _two_point_table(rows: tuple[np.ndarray, np.ndarray], cols: tuple[np.ndarray, np.ndarray]):
    """(n, R·K) counts per image: its image point in cell (rows[0][i], cols[0][i]), its text point in
    (rows[1][i], cols[1][i]); a resample's contingency table is the weighted sum of these rows."""
    n = len(rows[0])
    _, inv = np.unique(np.concatenate(cols), return_inverse=True)
    k = int(inv.max()) + 1
    r = int(max(rows[0].max(), rows[1].max())) + 1
    table = np.zeros((n, r * k))
    for row, col in zip(rows, (inv[:n], inv[n:]), strict=True):
        np.add.at(table, (np.arange(n), row * k + col), 1.0)
    return table, r, k


def clustering_intervals(assignments: dict, reps: int = DEFAULT_REPS, seed: int = 0,
                         level: float = LEVEL) -> Bootstrap | None:
    """ARI/NMI recomputed on resampled images (each with its text point), the cluster assignments held fixed:
    the interval covers the sampling of evaluation items, not the randomness of the clustering."""
    truth = np.asarray(assignments["truth"], np.int64)
    n = len(truth)
    parts, names = [], []  # (kind, table, rows, cols)
    km = np.asarray(assignments["kmeans"])
    parts.append(("class", *_two_point_table((truth, truth), (km[:n], km[n:]))))
    parts.append(("modality", *_two_point_table((np.zeros(n, np.int64), np.ones(n, np.int64)), (km[:n], km[n:]))))
    names += ["kmeans_ari", "kmeans_nmi", "kmeans_modality_nmi"]
    noise = None
    if "hdbscan" in assignments:
        hd = np.asarray(assignments["hdbscan"])
        parts.append(("class", *_two_point_table((truth, truth), (hd[:n], hd[n:]))))
        noise = ((hd[:n] < 0).astype(np.float64) + (hd[n:] < 0)) / 2
        names += ["hdbscan_ari", "hdbscan_nmi", "hdbscan_noise_share"]

    def stat(idx):
        w = counts(idx, n)
        out = []
        for kind, table, r, k in parts:
            c = (w @ table).reshape(len(w), r, k)
            if kind == "class":  # ARI over pairs of distinct points: the squared draw counts take the copies out
                out += [contingency_ari(c, ((w * w) @ table).reshape(len(w), r, k)), contingency_nmi(c)]
            else:
                out.append(contingency_nmi(c))
        if noise is not None:
            out.append(w @ noise / n)
        return np.stack(out)

    return bootstrap(n, stat, names, reps, seed, level)


def zeroshot_intervals(per_image: dict, reps: int = DEFAULT_REPS, seed: int = 0,
                       level: float = LEVEL) -> Bootstrap | None:
    """Top-1 (top-5) and balanced accuracy over resampled images."""
    truth = np.asarray(per_image["truth"], np.int64)
    n = len(truth)
    top1 = np.asarray(per_image["top1"], np.float64)
    onehot = np.zeros((n, int(truth.max()) + 1))
    onehot[np.arange(n), truth] = 1.0
    correct_by_class = onehot * top1[:, None]
    names = ["top1", "mean_per_class"] + (["top5"] if "top5" in per_image else [])

    def stat(idx):
        w = counts(idx, n)
        seen, right = w @ onehot, w @ correct_by_class
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.nanmean(np.where(seen > 0, right / np.where(seen > 0, seen, 1), np.nan), axis=1)
        out = [w @ top1 / n, per_class]
        if "top5" in per_image:
            out.append(w @ np.asarray(per_image["top5"], np.float64) / n)
        return np.stack(out)

    return bootstrap(n, stat, names, reps, seed, level)


def caption_intervals(per_image: dict[str, dict], reps: int = DEFAULT_REPS, seed: int = 0,
                      level: float = LEVEL) -> Bootstrap | None:
    """Caption scores over resampled images, per ``prefix`` ("" for decoding from images, "text_ceiling_"…): CIDEr-D
    and ROUGE-L as means of the per-image scores (CIDEr-D's IDF held at the full corpus), BLEU-4 rebuilt from the
    resampled images' summed n-gram counts."""
    from cmalign.evaluation.captioning.scores import corpus_bleu

    prefixes = list(per_image)
    n = len(per_image[prefixes[0]]["cider_d"])
    names = [f"{p}{m}" for p in prefixes for m in ("cider_d", "bleu4", "rouge_l")]

    def stat(idx):
        w = counts(idx, n)
        out = []
        for p in prefixes:
            s = per_image[p]
            out += [w @ s["cider_d"] / n, corpus_bleu(w @ s["bleu_counts"]), w @ s["rouge_l"] / n]
        return np.stack(out)

    return bootstrap(n, stat, names, reps, seed, level)
