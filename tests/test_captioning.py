"""The caption-prefix protocol's parts: tokenisation, CIDEr-D/BLEU-4 scoring, the prefix decoder and ClipCap."""

import pytest
from helpers.tiny_lm import tiny_local_gpt2
from helpers.unit_vectors import random_unit

from cmalign.evaluation.captioning.decoder import DecoderConfig, train_decoder
from cmalign.evaluation.captioning.scores import caption_scores
from cmalign.evaluation.captioning.tokenize import tokenize, tokenize_caption


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
    emb = random_unit(4, 16)
    cfg = DecoderConfig(width=64, layers=1, heads=2, epochs=150, batch_size=4, lr=3e-3, dropout=0.0)
    dec = train_decoder(emb, captions, cfg)
    assert dec.history[-1] < dec.history[0]
    assert dec.generate(emb) == captions
    beam = train_decoder(emb, captions, DecoderConfig(**{**cfg.to_dict(), "beam": 3}))
    assert beam.generate(emb) == captions
    again = train_decoder(emb, captions, cfg)  # same seed, same decoder
    assert again.history == dec.history


def test_clipcap_with_a_local_language_model(tmp_path):
    captions = ["a red circle", "two blue squares", "one green star on white", "a yellow ring"]
    lm = tiny_local_gpt2(tmp_path / "gpt2", captions)
    emb = random_unit(4, 16)
    cfg = DecoderConfig(language_model=str(lm), language_model_lr=3e-3, lr=3e-3, epochs=120, batch_size=4,
                        dropout=0.0, prefix_length=2)
    dec = train_decoder(emb, captions, cfg)
    assert dec.history[-1] < 0.1 * dec.history[0]
    assert dec.generate(emb) == captions
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        train_decoder(emb, captions, DecoderConfig(language_model=str(tmp_path / "gpt2-missing")))
