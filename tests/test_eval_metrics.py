"""Each eval metric on a small case whose answer is known by hand."""

import numpy as np
import pytest
from helpers.tiny_lm import tiny_local_gpt2

from cmalign.evaluation.captioning.decoder import DecoderConfig, train_decoder
from cmalign.evaluation.captioning.scores import caption_scores
from cmalign.evaluation.captioning.tokenize import tokenize, tokenize_caption
from cmalign.evaluation.posthoc import fit_posthoc, parse_posthoc
from cmalign.metrics import gap
from cmalign.metrics.clustering import class_weights, joint_clustering, zero_shot_accuracy
from cmalign.metrics.retrieval import retrieval_metrics


def _unit(a):
    a = np.asarray(a, np.float64)
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _rng_unit(n, d, seed=0):
    return _unit(np.random.default_rng(seed).normal(size=(n, d)))


# -- retrieval ------------------------------------------------------------------------------------


def test_perfect_retrieval_scores_one():
    x = _rng_unit(40, 16)
    caption_image = np.repeat(np.arange(40), 3)
    m = retrieval_metrics(x, x[caption_image], caption_image)
    assert m["i2t_R@1"] == 1.0 and m["t2i_R@1"] == 1.0
    assert m["i2t_median_rank"] == 1.0 and m["t2i_mean_rank"] == 1.0
    assert m["images"] == 40 and m["captions"] == 120


def test_retrieval_counts_any_caption_and_known_ranks():
    img = np.eye(3, dtype=np.float32)
    # image 0's captions: one orthogonal, one exact -> hit at 1; image 1's only caption leans to image 2
    txt = _unit([[0, 0, 1.0], [1, 0, 0], [0, 0.1, 1], [0, 0, 1]])
    caption_image = np.array([0, 0, 1, 2])
    m = retrieval_metrics(img, txt, caption_image, ks=(1, 2))
    # t2i: caption 2 ranks image 1 second (image 2 first); the others rank their image first... except caption 0
    # (image 2 first, then images 0 and 1 tie at 0: expected rank 2.5)
    assert m["t2i_R@1"] == pytest.approx(2 / 4)
    assert m["t2i_mean_rank"] == pytest.approx((2.5 + 1 + 2 + 1) / 4)
    # i2t: image 1's caption is still its best (0.0995 vs 0); image 2's caption ties with caption 0 -> 1/2
    assert m["i2t_R@1"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_exact_ties_score_their_expectation_not_index_order():
    x = _unit([[1.0, 0], [0, 1.0]])
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
        retrieval_metrics(_rng_unit(3, 4), _rng_unit(2, 4), np.array([0, 0]))
    with pytest.raises(ValueError, match="index the 3 images"):
        retrieval_metrics(_rng_unit(3, 4), _rng_unit(2, 4), np.array([0, 5]))


# -- clustering and zero-shot -------------------------------------------------------------------------


def _class_clouds(n_per=30, classes=4, d=16, offset=None, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(d)[:classes] * 3
    labels = np.repeat([f"c{i}" for i in range(classes)], n_per)
    img = centres[np.repeat(np.arange(classes), n_per)] + 0.05 * rng.normal(size=(classes * n_per, d))
    txt = img + 0.05 * rng.normal(size=img.shape)
    if offset is not None:
        txt = txt + offset
    return _unit(img), _unit(txt), labels


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


# -- captions -------------------------------------------------------------------------------------------


def test_tokenizer_follows_ptb_on_captions():
    assert tokenize("A dog's toy, isn't it?") == ["a", "dog", "'s", "toy", "is", "n't", "it"]
    assert tokenize_caption("Top-left: ONE small red circle.") == "top-left one small red circle"
    assert tokenize_caption(tokenize_caption("don't stop")) == "do n't stop"  # idempotent


def test_cider_of_a_caption_equal_to_its_references():
    refs = {"a": ["a red circle on black"] * 3, "b": ["two blue squares in the picture"] * 3}
    s = caption_scores({"a": "A red circle on black.", "b": "two blue squares in the picture"}, refs)
    assert s["cider_d"] == pytest.approx(10.0)  # every n-gram vector identical: 10 × mean of cosines 1
    assert s["bleu4"] == pytest.approx(1.0, abs=1e-6)
    # a one-image corpus: every n-gram has document frequency 1 = corpus size, IDF 0
    assert caption_scores({"a": "a red circle on black"}, {"a": refs["a"]})["cider_d"] == 0.0
    wrong = caption_scores({"a": "two blue squares", "b": "a red circle"}, refs)
    assert wrong["cider_d"] < 1.0


def test_caption_scores_check_their_inputs():
    with pytest.raises(ValueError, match="same ids"):
        caption_scores({"a": "x"}, {"b": ["x"]})
    with pytest.raises(ValueError, match="no reference"):
        caption_scores({"a": "x"}, {"a": []})


def test_prefix_decoder_learns_to_reconstruct_captions():
    captions = ["a red circle", "two blue squares", "one green star on white", "a yellow ring"]
    emb = _rng_unit(4, 16)
    cfg = DecoderConfig(width=64, layers=1, heads=2, epochs=150, batch_size=4, lr=3e-3, dropout=0.0)
    dec = train_decoder(emb, captions, cfg)
    assert dec.history[-1] < dec.history[0]
    assert dec.generate(emb) == captions
    beam = train_decoder(emb, captions, DecoderConfig(**{**cfg.to_dict(), "beam": 3}))
    assert beam.generate(emb) == captions
    again = train_decoder(emb, captions, cfg)  # same seed, same decoder
    assert again.history == dec.history


# -- post-hoc fixes ---------------------------------------------------------------------------------------


def test_mean_centring_closes_the_centroid_gap_but_not_the_distribution_gap():
    rng = np.random.default_rng(1)
    x = _rng_unit(300, 8, seed=2)
    y = _unit(x * np.array([1, 1, 1, 1, 0.3, 0.3, 0.3, 0.3]) + 0.2 * rng.normal(size=x.shape) + 1.5)
    fix = fit_posthoc("centring", x, y, renormalise=False)
    xc, yc = fix.image(x), fix.text(y)
    assert gap.centroid_gap(x, y) > 0.5
    assert gap.centroid_gap(xc, yc, normalize=False) < 1e-9
    before = gap.mmd2(x, y)
    after = gap.mmd2(xc, yc, normalize=False)
    assert after == pytest.approx(before, rel=1e-6)  # MMD² of the centred clouds is untouched
    assert gap.coral(xc, yc, normalize=False) == pytest.approx(gap.coral(x, y), rel=1e-6)


def test_liang_shift_meets_in_the_middle_and_procrustes_finds_a_rotation():
    x = _rng_unit(200, 6, seed=3)
    y = _unit(x + np.array([0.8, 0, 0, 0, 0, 0]))
    liang = fit_posthoc("liang", x, y, renormalise=False)
    np.testing.assert_allclose(liang.image(x).mean(0), liang.text(y).mean(0), atol=1e-12)
    rotation, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(6, 6)))
    proc = fit_posthoc("procrustes", x, (x @ rotation.T).astype(np.float32))
    np.testing.assert_allclose(proc.text(x @ rotation.T), x, atol=1e-5)  # text rotated back onto images
    np.testing.assert_allclose(proc.image(x), x, atol=1e-6)


def test_parse_posthoc():
    assert parse_posthoc("all") == ("centring", "liang", "procrustes")
    assert parse_posthoc("none") == () and parse_posthoc(None) == ()
    assert parse_posthoc("liang, centring") == ("liang", "centring")
    with pytest.raises(ValueError, match="unknown fix"):
        parse_posthoc("whitening")


def test_clipcap_with_a_local_language_model(tmp_path):
    captions = ["a red circle", "two blue squares", "one green star on white", "a yellow ring"]
    lm = tiny_local_gpt2(tmp_path / "gpt2", captions)
    emb = _rng_unit(4, 16)
    cfg = DecoderConfig(language_model=str(lm), language_model_lr=3e-3, lr=3e-3, epochs=120, batch_size=4,
                        dropout=0.0, prefix_length=2)
    dec = train_decoder(emb, captions, cfg)
    assert dec.history[-1] < 0.1 * dec.history[0]
    assert dec.generate(emb) == captions
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        train_decoder(emb, captions, DecoderConfig(language_model=str(tmp_path / "gpt2-missing")))


def test_clustering_works_with_fewer_points_than_dimensions():
    img, txt, labels = _class_clouds(n_per=5, classes=3, d=64)  # 30 points in 64-d: PCA is capped
    m = joint_clustering(img, txt, labels)
    assert m["points"] == 30 and m["kmeans_ari"] == pytest.approx(1.0)
