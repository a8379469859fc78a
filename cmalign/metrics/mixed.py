"""Mixed-modality retrieval: how a joint image+text index behaves — the number a joint index lives on.

For every text of a labelled pair set, searched in one index of all images and texts (itself left out):
- ``text_query_image_share@k``: the share of images among its top k (0 when the gap sends texts to texts);
- ``text_query_partner_rank``: the rank of its own image among everything else (1 = first);
- ``text_query_partner_hit@k``: how often that image is in the top k.
And the same from the image side (share of texts, rank of the best of its captions).

Ranks are exact (blocks of queries against all vectors, numpy); the top-k shares go through the index
when one is given (what a service sees), else exact search.
"""

from __future__ import annotations

import numpy as np

from cmalign.errors import ConfigError


def pair_set_positions(ids) -> np.ndarray:
    """Position in ``[images; texts]`` (as :func:`cmalign.corpus.store.load_embeddings` concatenates them, shard by
    shard) of every id of an index's id table; the index must hold one embeddings directory."""
    if (ids["part"] != 0).any():
        raise ConfigError("the index holds several embeddings directories (index-add); give it one")
    shard = ids["shard"].to_numpy()
    row = ids["row"].to_numpy(np.int64)
    is_image = (ids["modality"] == "image").to_numpy()
    n_shards = int(shard.max()) + 1 if len(shard) else 0
    img_count = np.bincount(shard[is_image], minlength=n_shards)
    txt_count = np.bincount(shard[~is_image], minlength=n_shards)
    img_start = np.concatenate([[0], np.cumsum(img_count)[:-1]]).astype(np.int64)
    txt_start = np.concatenate([[0], np.cumsum(txt_count)[:-1]]).astype(np.int64)
    return np.where(is_image, img_start[shard] + row, int(img_count.sum()) + txt_start[shard] + row)


def _ranks(queries: np.ndarray, self_ids: np.ndarray, corpus: np.ndarray, partner_mask_of, block: int = 512):
    """1-based rank of each query's best partner among all corpus items but itself (ties count against it)."""
    ranks = np.empty(len(queries), np.int64)
    for s in range(0, len(queries), block):
        scores = queries[s:s + block] @ corpus.T  # (b, n)
        rows = np.arange(len(scores))
        scores[rows, self_ids[s:s + block]] = -np.inf
        for j in range(len(scores)):
            partner = partner_mask_of(s + j)
            best = scores[j, partner].max()
            ranks[s + j] = int(np.sum(scores[j] > best)) + int(np.sum(scores[j][~partner] == best)) + 1
    return ranks


def mixed_modality_report(image_emb: np.ndarray, text_emb: np.ndarray, image_pair: np.ndarray,
                          text_pair: np.ndarray, k: int = 10, index=None, per_query: bool = False):
    """Figures of the joint set ``[images; texts]``; ``index`` (a :class:`cmalign.index.joint.JointIndex` built from the
    embeddings directory these arrays were loaded from) is used for the top-k shares when given.

    ``per_query=True`` returns ``(figures, per_query)``: per text and per image query, how many of its top k are of
    the other modality (``*_other``), how many are valid (``*_valid``) and its partner's rank (``*_rank``), which
    the bootstrap intervals resample.
    """
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    image_pair, text_pair = np.asarray(image_pair), np.asarray(text_pair)
    n_img = len(image_emb)
    corpus = np.concatenate([image_emb, text_emb])
    is_image = np.zeros(len(corpus), bool)
    is_image[:n_img] = True
    pair = np.concatenate([image_pair, text_pair])
    if index is not None:
        if len(index) != len(corpus):
            raise ConfigError(f"the index holds {len(index)} items, the pair set {len(corpus)}")
        position_of_id = pair_set_positions(index.ids)

    def top_k(query_ids):
        if index is not None:
            _, ids = index.search(corpus[query_ids], k + 1)
            ids = np.where(ids >= 0, position_of_id[np.maximum(ids, 0)], -1)
        else:
            scores = corpus[query_ids] @ corpus.T
            ids = np.argsort(-scores, axis=1, kind="stable")[:, :k + 1]
        out = np.empty((len(query_ids), k), np.int64)
        for i, q in enumerate(query_ids):
            row = ids[i][(ids[i] != q) & (ids[i] >= 0)]
            out[i] = np.pad(row[:k], (0, max(0, k - len(row[:k]))), constant_values=-1)
        return out

    text_ids = np.arange(n_img, len(corpus))
    image_ids = np.arange(n_img)
    t_top, i_top = top_k(text_ids), top_k(image_ids)
    t_rank = _ranks(text_emb, text_ids, corpus, lambda j: is_image & (pair == text_pair[j]))
    i_rank = _ranks(image_emb, image_ids, corpus, lambda j: ~is_image & (pair == image_pair[j]))

    def share(top, want_image):
        valid = top >= 0
        return float(np.sum(is_image[top[valid]] == want_image) / max(valid.sum(), 1))

    figures = {
        "k": k, "images": n_img, "texts": len(text_emb),
        f"text_query_image_share@{k}": share(t_top, True),
        f"text_query_partner_hit@{k}": float(np.mean(t_rank <= k)),
        "text_query_partner_rank_median": float(np.median(t_rank)),
        "text_query_partner_rank_mean": float(np.mean(t_rank)),
        f"image_query_text_share@{k}": share(i_top, False),
        f"image_query_partner_hit@{k}": float(np.mean(i_rank <= k)),
        "image_query_partner_rank_median": float(np.median(i_rank)),
        "image_query_partner_rank_mean": float(np.mean(i_rank)),
    }
    if not per_query:
        return figures

    def other(top, want_image):
        valid = top >= 0
        return np.sum(valid & (is_image[np.maximum(top, 0)] == want_image), axis=1), valid.sum(axis=1)

    t_other, t_valid = other(t_top, True)
    i_other, i_valid = other(i_top, False)
    return figures, {"text_other": t_other, "text_valid": t_valid, "text_rank": t_rank,
                     "image_other": i_other, "image_valid": i_valid, "image_rank": i_rank}
