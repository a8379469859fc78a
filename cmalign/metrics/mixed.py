"""Mixed-modality retrieval: how a joint image+text index behaves — the number a joint index lives on.

For every text of a labelled pair set, searched in one index of all images and texts (itself left out):
- ``text_query_image_share@k``: the share of images among its top k (0 when the gap sends texts to texts);
- ``text_query_partner_rank``: the rank of its own image among everything else (1 = first);
- ``text_query_partner_hit@k``: how often that image is in the top k.
And the same from the image side (share of texts, rank of the best of its captions).

Beside each share, the share a *modality-blind* ranking would give (``*_share_blind``): the proportion of the
other modality among the query's relevant items (a text's relevant items are its images and the other captions of
those images; an image's are its captions and the other images those captions describe). A closed gap moves the
measured share toward it; 0 is two indexes side by side.

Generated (and real) caption sets repeat strings: 32 % of the default set's 5000 captions duplicate another, and
a duplicate scores 1.0 against its twin, so it would decide a text query's top k. Given the caption strings, the
text side is deduplicated: each distinct string is one text, whose partners are all the images it describes.

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


def dedupe_texts(captions, caption_image) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rows of the first occurrence of each distinct caption string, and for each the images it describes."""
    first: dict[str, int] = {}
    partners: list[list[int]] = []
    keep = []
    for row, (text, image) in enumerate(zip(captions, np.asarray(caption_image).tolist(), strict=True)):
        slot = first.get(text)
        if slot is None:
            first[text] = len(keep)
            keep.append(row)
            partners.append([image])
        elif image not in partners[slot]:
            partners[slot].append(image)
    return np.asarray(keep, np.int64), [np.asarray(p, np.int64) for p in partners]


def _relevance(text_partners: list[np.ndarray], n_img: int):
    """Sparse (texts × images) relevance: text t describes image i."""
    from scipy import sparse

    rows = np.repeat(np.arange(len(text_partners)), [len(p) for p in text_partners])
    cols = np.concatenate(text_partners) if text_partners else np.zeros(0, np.int64)
    return sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(text_partners), n_img))


def _blind_shares(rel) -> tuple[np.ndarray, np.ndarray]:
    """Per text query its images' share of its relevant items; per image query its captions' share of its."""
    n_partner_images = np.diff(rel.indptr)
    sibling_texts = np.asarray(((rel @ rel.T) > 0).sum(axis=1)).ravel() - 1
    n_captions = np.diff(rel.tocsc().indptr)
    co_images = np.asarray(((rel.T @ rel) > 0).sum(axis=1)).ravel() - (n_captions > 0)
    text_blind = n_partner_images / np.maximum(n_partner_images + sibling_texts, 1)
    image_blind = n_captions / np.maximum(n_captions + co_images, 1)
    return text_blind, image_blind


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
                          text_pair: np.ndarray, k: int = 10, index=None, per_query: bool = False,
                          captions=None):
    """Figures of the joint set ``[images; texts]``; ``index`` (a :class:`cmalign.index.joint.JointIndex` built from the
    embeddings directory these arrays were loaded from) is used for the top-k shares when given.

    ``captions`` (the text strings, one per row of ``text_emb``): deduplicate the text side first (exact search
    only; an index holds the duplicates). ``text_pair`` gives each text's image as a value of ``image_pair``.

    ``per_query=True`` returns ``(figures, per_query)``: per text and per image query, how many of its top k are of
    the other modality (``*_other``), how many are valid (``*_valid``) and its partner's rank (``*_rank``), which
    the bootstrap intervals resample.
    """
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    image_pair, text_pair = np.asarray(image_pair), np.asarray(text_pair)
    n_img = len(image_emb)
    image_row = {v: i for i, v in enumerate(image_pair.tolist())}
    if len(image_row) != n_img:
        raise ConfigError("image pair ids must be distinct, one per image")
    try:
        text_image = np.asarray([image_row[v] for v in text_pair.tolist()], np.int64)
    except KeyError as e:
        raise ConfigError(f"a text's pair id {e.args[0]!r} names no image of the set") from None
    n_texts_given = len(text_emb)
    if captions is not None:
        if index is not None:
            raise ConfigError("deduplicating captions needs exact search; the index holds every duplicate")
        if len(captions) != len(text_emb):
            raise ConfigError(f"{len(captions)} caption strings for {len(text_emb)} text embeddings")
        keep, text_partners = dedupe_texts(captions, text_image)
        text_emb, text_image = text_emb[keep], text_image[keep]
    else:
        text_partners = [np.asarray([i]) for i in text_image.tolist()]
    rel = _relevance(text_partners, n_img)
    relc = rel.tocsc()
    text_blind, image_blind = _blind_shares(rel)
    corpus = np.concatenate([image_emb, text_emb])
    is_image = np.zeros(len(corpus), bool)
    is_image[:n_img] = True
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
    def partners_of_text(j):
        mask = np.zeros(len(corpus), bool)
        mask[rel.indices[rel.indptr[j]:rel.indptr[j + 1]]] = True
        return mask

    def partners_of_image(i):
        mask = np.zeros(len(corpus), bool)
        mask[n_img + relc.indices[relc.indptr[i]:relc.indptr[i + 1]]] = True
        return mask

    t_rank = _ranks(text_emb, text_ids, corpus, partners_of_text)
    i_rank = _ranks(image_emb, image_ids, corpus, partners_of_image)

    def share(top, want_image):
        valid = top >= 0
        return float(np.sum(is_image[top[valid]] == want_image) / max(valid.sum(), 1))

    figures = {
        "k": k, "images": n_img, "texts": len(text_emb), "duplicate_texts_merged": n_texts_given - len(text_emb),
        f"text_query_image_share@{k}": share(t_top, True),
        "text_query_image_share_blind": float(np.mean(text_blind)) if len(text_blind) else 0.0,
        f"text_query_partner_hit@{k}": float(np.mean(t_rank <= k)),
        "text_query_partner_rank_median": float(np.median(t_rank)),
        "text_query_partner_rank_mean": float(np.mean(t_rank)),
        f"image_query_text_share@{k}": share(i_top, False),
        "image_query_text_share_blind": float(np.mean(image_blind)) if len(image_blind) else 0.0,
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
    return figures, {"text_other": t_other, "text_valid": t_valid, "text_rank": t_rank, "text_image": text_image,
                     "text_blind": text_blind, "image_other": i_other, "image_valid": i_valid, "image_rank": i_rank,
                     "image_blind": image_blind}
