"""Cross-modal retrieval figures with several captions per image (clip_benchmark conventions).

Image→text: an image hits at k if *any* of its captions is in its top k; text→image: a caption hits if its own
image is. Cosine similarity on L2-normalised embeddings.

Exact ties are scored as their expectation over a random order of the tied items, not by index order. Generated
and real caption sets hold duplicate captions (1622 of 5000 on the default validation split), whose embeddings
tie exactly; index-order tie-breaking made R@1 depend on row order and on the last bits of the arithmetic.
Written by hand because clip_benchmark's `recall_at_k` breaks ties by `topk` order and is not a dependency here.
"""

from __future__ import annotations

import numpy as np

from cmalign.errors import ConfigError

KS = (1, 5, 10)
TIE_TOLERANCE = 1e-6  # scores this close to the best positive count as tied with it


def _expected_hits(greater: np.ndarray, equal: np.ndarray, positives: np.ndarray, k: int) -> np.ndarray:
    """P(rank ≤ k) when ``greater`` negatives score above the best positive, and ``equal`` negatives tie with
    the ``positives`` positives that share the best score, the tied group in random order.

    The best positive's place in the tied group is M = min position of p positives among e + p items:
    P(M > m) = C(e, m) / C(e + p, m) = prod_{i<m} (e − i) / (e + p − i).
    """
    m = k - greater  # places left for the tied group
    out = np.zeros(len(m))
    inside = m > 0
    e, p, m_in = equal[inside], positives[inside], m[inside]
    miss = np.ones(len(m_in))
    for i in range(int(m_in.max()) if len(m_in) else 0):
        active = i < m_in
        left = np.maximum(e[active] - i, 0)  # once the tied negatives run out, the miss chance is 0
        miss[active] *= left / np.maximum(left + p[active], 1)
    out[inside] = 1.0 - miss
    return out


def _rank_stats(scores: np.ndarray, positive: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query row: negatives strictly above the best positive, negatives tied with it, positives tied with it."""
    best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)
    above = scores > best + tol
    tied = np.abs(scores - best) <= tol
    greater = np.sum(above & ~positive, axis=1)
    equal = np.sum(tied & ~positive, axis=1)
    pos_tied = np.maximum(np.sum(tied & positive, axis=1), 1)
    return greater, equal, pos_tied


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, caption_image: np.ndarray,
                      ks=KS, block: int = 1024, tol: float = TIE_TOLERANCE, per_query: bool = False):
    """R@k both ways and the mean/median rank of the first hit; ``caption_image[j]`` is the image of caption j.

    ``per_query=True`` returns ``(figures, per_query)`` with each query's expected hit at k and rank
    (``"i2t_hit@k"``, ``"i2t_rank"`` per image; ``"t2i_hit@k"``, ``"t2i_rank"`` per caption), which the
    bootstrap intervals resample.
    """
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    caption_image = np.asarray(caption_image, np.int64)
    n_img, n_txt = len(image_emb), len(text_emb)
    if len(caption_image) != n_txt:
        raise ConfigError(f"caption_image has {len(caption_image)} entries for {n_txt} captions")
    if n_img == 0 or n_txt == 0:
        raise ConfigError("retrieval needs at least one image and one caption")
    if caption_image.min() < 0 or caption_image.max() >= n_img:
        raise ConfigError(f"caption_image must index the {n_img} images")
    if np.bincount(caption_image, minlength=n_img).min() == 0:
        raise ConfigError("every image needs at least one caption")

    out: dict[str, float] = {}
    queries_out: dict[str, np.ndarray] = {}
    for direction, queries, corpus in (("i2t", image_emb, text_emb), ("t2i", text_emb, image_emb)):
        hits = {k: [] for k in ks}
        ranks = []
        for s in range(0, len(queries), block):
            scores = queries[s:s + block] @ corpus.T
            rows = np.arange(s, min(s + block, len(queries)))
            if direction == "i2t":
                positive = caption_image[None, :] == rows[:, None]
            else:
                positive = np.zeros(scores.shape, bool)
                positive[np.arange(len(rows)), caption_image[rows]] = True
            greater, equal, pos_tied = _rank_stats(scores, positive, tol)
            for k in ks:
                hits[k].append(_expected_hits(greater, equal, pos_tied, k))
            # expected 1-based rank of the first positive: greater + E[M], E[M] = (e + p + 1) / (p + 1)
            ranks.append(greater + (equal + pos_tied + 1) / (pos_tied + 1))
        for k in ks:
            h = np.concatenate(hits[k])
            out[f"{direction}_R@{k}"] = float(h.mean())
            queries_out[f"{direction}_hit@{k}"] = h
        r = np.concatenate(ranks)
        out[f"{direction}_mean_rank"] = float(r.mean())
        out[f"{direction}_median_rank"] = float(np.median(r))
        queries_out[f"{direction}_rank"] = r
    out["images"], out["captions"] = n_img, n_txt
    return (out, queries_out) if per_query else out


DEFINITIONS = {
    "i2t_R@k": "image→text recall@k: share of images with any of their captions among the k most similar "
               "captions (ties scored as their expectation over a random order)",
    "t2i_R@k": "text→image recall@k: share of captions whose own image is among the k most similar images",
    "i2t_mean_rank": "mean 1-based rank of an image's best-ranked caption (1 = first)",
    "i2t_median_rank": "median of the same",
    "t2i_mean_rank": "mean 1-based rank of a caption's image",
    "t2i_median_rank": "median of the same",
}
