"""The torch-free runtime tokenizer (cmalign.export.tokenizer) against open_clip's SimpleTokenizer: same ids,
same truncation, a save_tokenizer -> from_dir round trip, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from open_clip import tokenizer as oc_tok

from cmalign.export.tokenizer import (
    CLEAN_MODES,
    TOKENIZER_JSON,
    ClipTokenizer,
    UnsupportedTokenizerError,
    save_tokenizer,
)

TEXTS = [
    # ascii captions
    "a photo of a cat",
    "A Red Square on a WHITE background, number 42.",
    "two dogs playing in the snow near a lake",
    # unicode: accents, CJK, Cyrillic, Arabic, Greek, Hindi, Korean
    "Café crème brûlée à la française, naïve coöperation",
    "東京タワーの夜景 北京烤鸭",
    "Привет, как дела? Съешь же ещё этих мягких французских булок",
    "مرحبا بالعالم، صورة قطة",
    "Ελληνικά γράμματα και हिन्दी पाठ और 한국어 문장",
    # emoji, ZWJ sequences, skin tones, flags, keycaps
    "I love pizza 🍕🍕 and cats 🐱",
    "family 👨‍👩‍👧‍👦 coder 👩🏽‍💻 thumbs 👍🏿👍🏻 flag 🇯🇵 keycap 1️⃣",
    # HTML entities (single and double escaped)
    "Tom &amp; Jerry &lt;b&gt;bold&lt;/b&gt; &amp;amp; &quot;quoted&quot; &#39;x&#39;",
    # mojibake that ftfy repairs
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "sÃ©ance at the cafÃ©",
    # empty, whitespace-only, tabs and newlines
    "",
    "   ",
    "\t\n  \r\n",
    "line one\nline two\ttabbed   spaced\r\nend",
    # punctuation runs, digits, contractions
    "wow!!! ... ??? --- ((nested)) [brackets] {braces} @#$%^&*",
    "3.14159 and 2,718 and 1e-10 and 007 and ½ ² ٣",
    "it's don't they're we've I'm you'll he'd IT'S DON'T",
    "snake_case_name and kebab-case-name and CamelCaseName",
    # the special tokens as literal text, any case
    "<start_of_text>",
    "<end_of_text>",
    "before <start_of_text> middle <end_of_text> after <END_OF_TEXT>",
    # long: more tokens than either context length
    "a very long caption " * 40,
    " ".join(f"word{i}" for i in range(60)),
]


@pytest.fixture(scope="module")
def ref_tokenizers() -> dict:
    return {clean: oc_tok.SimpleTokenizer(clean=clean) for clean in CLEAN_MODES}


@pytest.fixture(scope="module")
def our_tokenizers() -> dict:
    return {clean: ClipTokenizer(oc_tok.default_bpe(), clean=clean) for clean in CLEAN_MODES}


def test_texts_exercise_the_cleaning() -> None:
    # guard against a test list that stopped testing anything: ftfy and html.unescape do change these
    assert oc_tok._clean_lower("The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.") == "the mona lisa doesn't have eyebrows."
    assert oc_tok._clean_lower("Tom &amp;amp; Jerry") == "tom & jerry"
    assert len(oc_tok.SimpleTokenizer().encode("a very long caption " * 40)) > 77


@pytest.mark.parametrize("clean", CLEAN_MODES)
def test_encode_matches_open_clip(clean, ref_tokenizers, our_tokenizers) -> None:
    ref, ours = ref_tokenizers[clean], our_tokenizers[clean]
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), text


@pytest.mark.parametrize("context_length", [77, 32])
@pytest.mark.parametrize("clean", CLEAN_MODES)
def test_batch_ids_match_open_clip(clean, context_length, ref_tokenizers, our_tokenizers) -> None:
    ref, ours = ref_tokenizers[clean], our_tokenizers[clean]
    want = ref(TEXTS, context_length=context_length).numpy()
    got = ours(TEXTS, context_length=context_length)
    assert got.dtype == np.int64 and got.shape == (len(TEXTS), context_length)
    assert np.array_equal(got, want)
    # a second pass (BPE cache warm) gives the same ids
    assert np.array_equal(ours(TEXTS, context_length=context_length), want)


def test_constructor_context_length_and_single_string(ref_tokenizers) -> None:
    ref = oc_tok.SimpleTokenizer(context_length=32)
    ours = ClipTokenizer(oc_tok.default_bpe(), context_length=32)
    assert ours.context_length == 32 and ours.clean == "lower"
    for text in ("a photo of a cat", "a very long caption " * 40):
        got = ours(text)
        assert got.shape == (1, 32)
        assert np.array_equal(got, ref(text).numpy())
    assert ours([]).shape == (0, 32)


def test_truncation_and_padding(our_tokenizers) -> None:
    ours = our_tokenizers["lower"]
    ids = ours(["a very long caption " * 40, "a cat", ""], context_length=32)
    long, short, empty = ids
    assert long[0] == ours.sot_token_id and long[-1] == ours.eot_token_id and (long != 0).all()
    assert list(long[1:-1]) == ours.encode("a very long caption " * 40)[:30]
    n = len(ours.encode("a cat"))
    assert list(short[:n + 2]) == [ours.sot_token_id, *ours.encode("a cat"), ours.eot_token_id]
    assert (short[n + 2:] == 0).all()
    assert list(empty[:2]) == [ours.sot_token_id, ours.eot_token_id] and (empty[2:] == 0).all()


def test_special_ids_and_vocab_size(ref_tokenizers, our_tokenizers) -> None:
    ref, ours = ref_tokenizers["lower"], our_tokenizers["lower"]
    assert (ours.sot_token_id, ours.eot_token_id, ours.vocab_size) == (ref.sot_token_id, ref.eot_token_id,
                                                                       ref.vocab_size) == (49406, 49407, 49408)
    assert ours.decode(ours.encode("a photo of a cat")).strip() == "a photo of a cat"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="clean"):
        ClipTokenizer(oc_tok.default_bpe(), clean="upper")


def test_additional_special_tokens_match_open_clip(tmp_path: Path) -> None:
    ref = oc_tok.SimpleTokenizer(additional_special_tokens=["<mask>", "<sep>"], context_length=32, clean="whitespace")
    cfg = save_tokenizer(ref, tmp_path)
    assert cfg["additional_special_tokens"] == ["<mask>", "<sep>"] and cfg["vocab_size"] == 49410
    ours = ClipTokenizer.from_dir(tmp_path)
    texts = ["a <mask> on the <sep> Table", "<MASK> upper", "no specials here"] + TEXTS
    assert np.array_equal(ours(texts), ref(texts).numpy())


def test_round_trip_through_save_and_from_dir(tmp_path: Path) -> None:
    ref = oc_tok.SimpleTokenizer(context_length=32, clean="canonicalize")
    cfg = save_tokenizer(ref, tmp_path / "tok")
    on_disk = json.loads((tmp_path / "tok" / TOKENIZER_JSON).read_text())
    assert on_disk == cfg
    assert cfg["type"] == "clip-bpe" and cfg["clean"] == "canonicalize" and cfg["context_length"] == 32
    assert (cfg["sot_token_id"], cfg["eot_token_id"], cfg["vocab_size"]) == (49406, 49407, 49408)
    vocab = tmp_path / "tok" / cfg["vocab_file"]
    assert vocab.read_bytes() == Path(oc_tok.default_bpe()).read_bytes()
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted([TOKENIZER_JSON, cfg["vocab_file"]])

    ours = ClipTokenizer.from_dir(tmp_path / "tok")
    assert (ours.context_length, ours.clean) == (32, "canonicalize")
    assert np.array_equal(ours(TEXTS), ref(TEXTS).numpy())


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(oc_tok.SimpleTokenizer(), d)
    return d


def _edited_copy(saved_dir: Path, tmp_path: Path, edit) -> Path:
    cfg = json.loads((saved_dir / TOKENIZER_JSON).read_text())
    edit(cfg)
    (tmp_path / TOKENIZER_JSON).write_text(json.dumps(cfg))
    vocab = "bpe_simple_vocab_16e6.txt.gz"
    (tmp_path / vocab).write_bytes((saved_dir / vocab).read_bytes())
    return tmp_path


@pytest.mark.parametrize("field", ["type", "vocab_file", "context_length", "clean", "additional_special_tokens",
                                   "sot_token_id", "eot_token_id", "vocab_size"])
def test_from_dir_names_a_missing_field(saved_dir: Path, tmp_path: Path, field: str) -> None:
    d = _edited_copy(saved_dir, tmp_path, lambda cfg: cfg.pop(field))
    with pytest.raises(ValueError, match=rf"tokenizer\.json.*'{field}'.*missing"):
        ClipTokenizer.from_dir(d)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("eot_token_id", 49406, "recorded 49406"),
    ("sot_token_id", 1, "recorded 1"),
    ("vocab_size", 49409, "recorded 49409"),
    ("type", "hf", "expected 'clip-bpe'"),
    ("clean", "upper", "expected one of"),
    ("context_length", 0, "positive integer"),
    ("vocab_file", "../elsewhere.txt.gz", "inside"),
    ("vocab_sha256", "0" * 64, "hashes to"),
])
def test_from_dir_names_an_inconsistent_field(saved_dir: Path, tmp_path: Path, field, value, message) -> None:
    d = _edited_copy(saved_dir, tmp_path, lambda cfg: cfg.__setitem__(field, value))
    with pytest.raises(ValueError, match=rf"tokenizer\.json, field '{field}'") as e:
        ClipTokenizer.from_dir(d)
    assert message in str(e.value)


def test_from_dir_missing_files(saved_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer.json: missing"):
        ClipTokenizer.from_dir(tmp_path)
    (tmp_path / TOKENIZER_JSON).write_text((saved_dir / TOKENIZER_JSON).read_text())
    with pytest.raises(ValueError, match="field 'vocab_file'.*does not exist"):
        ClipTokenizer.from_dir(tmp_path)


def test_save_refuses_a_reduction_mask(tmp_path: Path) -> None:
    tok = oc_tok.SimpleTokenizer(reduction_mask="simple")
    with pytest.raises(UnsupportedTokenizerError, match="SimpleTokenizer.*reduction.*training-time only"):
        save_tokenizer(tok, tmp_path)
    assert not any(tmp_path.iterdir())


class _NotATokenizer:
    context_length = 77

    def __call__(self, texts):
        return texts


def test_save_refuses_other_tokenizer_classes(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedTokenizerError, match="_NotATokenizer.*only open_clip.tokenizer.SimpleTokenizer"):
        save_tokenizer(_NotATokenizer(), tmp_path)
    assert issubclass(UnsupportedTokenizerError, ValueError)
    assert not any(tmp_path.iterdir())


def test_save_refuses_an_unknown_clean_fn(tmp_path: Path) -> None:
    tok = oc_tok.SimpleTokenizer()
    tok.clean_fn = str.upper
    with pytest.raises(UnsupportedTokenizerError, match="clean_fn"):
        save_tokenizer(tok, tmp_path)


def test_words_seen_before_tokenise_as_open_clip_in_any_case(tmp_path: Path) -> None:
    # ClipTokenizer caches each word's ids: a word met again (in another case, or beside other words) must give
    # what open_clip gives, and a text tokenised twice the same ids.
    ref = oc_tok.SimpleTokenizer(context_length=32, clean="whitespace")
    save_tokenizer(ref, tmp_path)
    ours = ClipTokenizer.from_dir(tmp_path)
    texts = ["Cat cat CAT cAt", "cat, Cat's CATS!", "a cat", "Cat"] * 2
    first = ours(texts)
    assert np.array_equal(first, ref(texts).numpy()) and np.array_equal(ours(texts), first)
