"""A mixed-modality corpus, after GR-CLIP's MixBench: does a text query find its document whatever form it takes?

Each image of the evaluation set is one *document*, stored as the image itself with probability p or as one of its
captions otherwise; the query is another caption of the same image (a different string, so a duplicate cannot score
1.0 against it). Text queries are ranked against all documents, and NDCG@k scores the rank of their own document
(one relevant item: 1 / log2(rank + 1) within the top k, else 0). At p = 0 the task is text→text retrieval, at
p = 1 text→image; in between, an unaligned space prefers whichever documents share the query's modality, so the
curve sags (a U), and an aligned one stays flat.

The same uniform draw decides every document at every p (document i is an image when u_i < p), so the corpora are
nested and the curve is not jagged by resampling. numpy only; O(n²) per p.
"""

from __future__ import annotations

import numpy as np

from cmalign.errors import ConfigError

DEFAULT_PS = (0.0, 0.25, 0.5, 0.75, 1.0)


def query_and_document_captions(caption_image: np.ndarray, captions, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(query caption, document caption) per image: the first caption, and the first later one whose string
    differs (-1 when an image has no second distinct caption: its document is always the image)."""
    caption_image = np.asarray(caption_image, np.int64)
    query = np.full(n_images, -1, np.int64)
    doc = np.full(n_images, -1, np.int64)
    for j, i in enumerate(caption_image):
        if query[i] < 0:
            query[i] = j
        elif doc[i] < 0 and (captions is None or captions[j] != captions[query[i]]):
            doc[i] = j
    if (query < 0).any():
        raise ConfigError(f"{int((query < 0).sum())} evaluation image(s) have no caption to query with")
    return query, doc


def mixed_corpus_ndcg(image, text, caption_image, captions=None, ps=DEFAULT_PS, k: int = 10, seed: int = 0,
                      per_query: bool = False):
    """{"ndcg@k_p=P": mean NDCG@k of text queries at each p, "ndcg_range": max − min over p,
    "ndcg_sag": mean of the two ends − the lowest inner point (> 0: a U)}; ``per_query`` also returns the
    per-query NDCG arrays by p (for bootstrap intervals)."""
    image = np.asarray(image, np.float32)
    text = np.asarray(text, np.float32)
    n = len(image)
    if n < 2:
        raise ConfigError("the mixed corpus needs at least two images")
    q_idx, d_idx = query_and_document_captions(caption_image, captions, n)
    queries = text[q_idx]
    u = np.random.default_rng([seed, 11]).random(n)
    out, each = {}, {}
    for p in ps:
        is_image = (u < p) | (d_idx < 0)
        docs = np.where(is_image[:, None], image, text[np.maximum(d_idx, 0)])
        scores = queries @ docs.T
        own = np.diagonal(scores)
        rank = 1 + (scores > own[:, None]).sum(axis=1)
        gain = np.where(rank <= k, 1.0 / np.log2(rank + 1), 0.0)
        key = f"ndcg@{k}_p={p:g}"
        out[key], each[key] = float(gain.mean()), gain
        out[f"image_documents_p={p:g}"] = float(is_image.mean())
    vals = [out[f"ndcg@{k}_p={p:g}"] for p in ps]
    out["ndcg_range"] = float(max(vals) - min(vals))
    out["ndcg_sag"] = float((vals[0] + vals[-1]) / 2 - min(vals[1:-1])) if len(vals) > 2 else 0.0
    return (out, each) if per_query else out
