"""The mixed-modality corpus task (after MixBench): flat for an aligned space, a U for a gapped one."""

from __future__ import annotations

import numpy as np
import pytest

from cmalign.errors import ConfigError
from cmalign.metrics.mixcorpus import mixed_corpus_ndcg, query_and_document_captions


def _space(n=300, d=32, gap=0.0, seed=0):
    """n images with two captions each; captions = image + small noise, both modalities shifted apart by ``gap``."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, d))
    shift = np.zeros(d)
    shift[0] = gap
    txt = np.repeat(img, 2, axis=0) + 0.6 * rng.normal(size=(2 * n, d))
    img, txt = img - shift / 2, txt + shift / 2
    norm = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return norm(img), norm(txt), np.repeat(np.arange(n), 2)


def test_an_aligned_space_is_flat_and_a_gapped_one_sags():
    flat = mixed_corpus_ndcg(*_space(gap=0.0))
    sag = mixed_corpus_ndcg(*_space(gap=12.0))
    assert flat["ndcg_range"] < 0.08 and abs(flat["ndcg_sag"]) < 0.08
    # gapped: at p = 0.5 wrong caption documents outrank the right image documents; the ends stay high
    assert sag["ndcg_sag"] > 0.3 and sag["ndcg@10_p=0.5"] < sag["ndcg@10_p=0"] - 0.3
    assert sag["image_documents_p=0"] == 0 and sag["image_documents_p=1"] == 1
    assert 0.4 < sag["image_documents_p=0.5"] < 0.6


def test_queries_never_meet_their_own_string():
    captions = ["a", "a", "b", "c", "d", "d"]
    q, doc = query_and_document_captions(np.array([0, 0, 0, 1, 2, 2]), captions, 3)
    assert list(q) == [0, 3, 4] and list(doc) == [2, -1, -1]  # image 1: one caption; image 2: a duplicate only
    with pytest.raises(ConfigError, match="no caption"):
        query_and_document_captions(np.array([0, 0]), None, 2)
