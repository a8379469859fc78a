"""Retrieval, joint clustering and zero-shot metrics on small cases whose answer is known by hand."""

import numpy as np
import pytest
from helpers.unit_vectors import random_unit, unit

from cmalign.metrics.clustering import joint_clustering
from cmalign.metrics.retrieval import retrieval_metrics
from cmalign.metrics.zeroshot import class_weights, zero_shot_accuracy


def test_perfect_retrieval_scores_one():
    x = random_unit(40, 16)
    caption_image = np.repeat(np.arange(40), 3)
    m = retrieval_metrics(x, x[caption_image], caption_image)
    assert m["i2t_R@1"] == 1.0 and m["t2i_R@1"] == 1.0
    assert m["i2t_median_rank"] == 1.0 and m["t2i_mean_rank"] == 1.0
    assert m["images"] == 40 and m["captions"] == 120


def test_retrieval_counts_any_caption_and_known_ranks():
    img = np.eye(3, dtype=np.float32)
    # image 0's captions: one orthogonal, one exact -> hit at 1; image 1's only caption leans to image 2
    txt = unit([[0, 0, 1.0], [1, 0, 0], [0, 0.1, 1], [0, 0, 1]])
    caption_image = np.array([0, 0, 1, 2])
    m = retrieval_metrics(img, txt, caption_image, ks=(1, 2))
    # t2i: caption 2 ranks image 1 second (image 2 first); the others rank their image first... except caption 0
    # (image 2 first, then images 0 and 1 tie at 0: expected rank 2.5)
    assert m["t2i_R@1"] == pytest.approx(2 / 4)
    assert m["t2i_mean_rank"] == pytest.approx((2.5 + 1 + 2 + 1) / 4)
    # i2t: image 1's caption is still its best (0.0995 vs 0); image 2's caption ties with caption 0 -> 1/2
    assert m["i2t_R@1"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_exact_ties_score_their_expectation_not_index_order():
    x = unit([[1.0, 0], [0, 1.0]])
    # two images share one caption text: both captions tie for image 0
    txt = np.stack([x[0], x[0]])
    m = retrieval_metrics(x, txt, np.array([0, 1]))
    assert m["i2t_R@1"] == pytest.approx(0.5)  # image 0: 1/2 (tie of 2), image 1: both captions tie at 0 -> 1/2
    assert m["i2t_mean_rank"] == pytest.approx(1.5)
    # swapping the rows does not change anything (index-order tie-breaking would)
    m2 = retrieval_metrics(x[::-1], txt, np.array([1, 0]))
    assert m2 == m


def test_retrieval_rejects_an_image_without_captions():
    with pytest.raises(ValueError, match="every image needs at least one caption"):
        retrieval_metrics(random_unit(3, 4), random_unit(2, 4), np.array([0, 0]))
    with pytest.raises(ValueError, match="index the 3 images"):
        retrieval_metrics(random_unit(3, 4), random_unit(2, 4), np.array([0, 5]))


def _class_clouds(n_per=30, classes=4, d=16, offset=None, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(d)[:classes] * 3
    labels = np.repeat([f"c{i}" for i in range(classes)], n_per)
    img = centres[np.repeat(np.arange(classes), n_per)] + 0.05 * rng.normal(size=(classes * n_per, d))
    txt = img + 0.05 * rng.normal(size=img.shape)
    if offset is not None:
        txt = txt + offset
    return unit(img), unit(txt), labels


def test_identical_class_clusters_give_ari_one():
    img, txt, labels = _class_clouds()
    m = joint_clustering(img, txt, labels)
    assert m["kmeans_ari"] == pytest.approx(1.0)
    assert m["kmeans_nmi"] == pytest.approx(1.0)
    assert m["kmeans_modality_nmi"] < 0.01
    assert m["hdbscan_ari"] == pytest.approx(1.0) and m["hdbscan_noise_share"] == 0.0


def test_a_modality_gap_splits_the_clusters_by_modality():
    offset = np.zeros(16)
    offset[10] = 12.0  # the texts sit far along one direction
    img, txt, labels = _class_clouds(offset=offset)
    m = joint_clustering(img, txt, labels)
    assert m["kmeans_ari"] < 0.7
    assert m["kmeans_modality_nmi"] > 0.3


def test_zero_shot_perfect_and_chance():
    img, txt, labels = _class_clouds(n_per=10)
    prompts = np.stack([txt[labels == c][:3] for c in sorted(set(labels))])  # (classes, templates, d)
    w = class_weights(prompts)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-5)
    m = zero_shot_accuracy(img, labels, sorted(set(labels)), w)
    assert m["top1"] == 1.0 and m["mean_per_class"] == 1.0
    wrong = zero_shot_accuracy(img, labels, sorted(set(labels)), np.roll(w, 1, axis=0))
    assert wrong["top1"] == 0.0
    with pytest.raises(ValueError, match="labels without a class weight"):
        zero_shot_accuracy(img, ["zz"] * len(img), sorted(set(labels)), w)


def test_clustering_works_with_fewer_points_than_dimensions():
    img, txt, labels = _class_clouds(n_per=5, classes=3, d=64)  # 30 points in 64-d: PCA is capped
    m = joint_clustering(img, txt, labels)
    assert m["points"] == 30 and m["kmeans_ari"] == pytest.approx(1.0)
