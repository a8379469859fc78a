"""Fuzz drill: the torch-free runtime tokenizer (cmalign.export.tokenizer) on arbitrary text.

Properties: for any text (control characters, lone surrogates, emoji, combining marks, right-to-left, HTML entities,
mojibake, the special tokens as text, very long words and texts) the tokenizer returns int64 ids of the fixed context
length, in the vocabulary's range, with the start/end tokens where open_clip puts them, the same on every call; and
it is id-for-id open_clip's ``SimpleTokenizer``, as its module says (every clean mode, every context length). Never
a crash, never a hang: a word of 100k letters once took minutes (open_clip's BPE loop is quadratic).
"""

from __future__ import annotations

import random
import string
import time

import numpy as np
import pytest
from helpers.fuzz import examples, no_hang
from hypothesis import event, example, given
from hypothesis import strategies as st
from open_clip import tokenizer as oc_tok

import cmalign.export.tokenizer as tokenizer_module
from cmalign.export.tokenizer import CLEAN_MODES, ClipTokenizer


@pytest.fixture(scope="module")
def ours() -> dict[str, ClipTokenizer]:
    return {clean: ClipTokenizer(oc_tok.default_bpe(), clean=clean) for clean in CLEAN_MODES}


@pytest.fixture(scope="module")
def ref() -> dict:
    return {clean: oc_tok.SimpleTokenizer(clean=clean) for clean in CLEAN_MODES}


FRAGMENTS = [
    "a photo of a cat", " ", "\t", "\n", "\r\n", "\x00", "\x1b[31m", "\x7f", "\u200b", "\u200d", "\ufeff", "\u00ad",
    "e\u0301", "\u0301\u0301\u0301", "\u202eabc\u202c", "مرحبا", "שלום", "東京タワー", "한국어", "हिन्दी",
    "🐱", "👨‍👩‍👧‍👦", "👍🏿", "🇯🇵", "1️⃣", "&amp;", "&amp;amp;", "&lt;b&gt;", "&#39;", "&#x1F600;", "&#0;",
    "&#99999999;", "&nbsp;", "Ã©", "doesnÃ¢â‚¬â„¢t", "<start_of_text>", "<end_of_text>", "<END_OF_TEXT>", "'s", "'LL",
    "don't", "3.14", "½²٣", "snake_case", "!!!???", "\ud800", "\udcff", "\U0010ffff", "ǅ", "ﬁ", "Ⅻ",
]
fragments = st.sampled_from(FRAGMENTS) | st.text(max_size=8)
# Any code point, lone surrogates included (a JSON "\ud800" escape reaches the tokenizer as one).
any_text = st.text(st.characters(exclude_categories=()), max_size=60)
texts = st.one_of(
    any_text,
    st.lists(fragments, max_size=12).map("".join),
    st.tuples(fragments, st.integers(1, 300)).map(lambda t: t[0] * t[1]),  # long: repeated fragments
    st.text(st.sampled_from("abcdefghij"), min_size=65, max_size=1500),  # one long word (the heap-ordered BPE)
    st.text(st.sampled_from("éü東京🐱!?."), min_size=30, max_size=400),
)
context_lengths = st.sampled_from([77, 32, 5, 2, 1])
# 100k random letters, one word: minutes in open_clip's (and formerly this module's) quadratic BPE loop, past
# the hang guard; 0.2 s in the heap-ordered one.
LONG_WORD = "".join(random.Random(0).choices(string.ascii_lowercase, k=100_000))


@examples(1.0)
@given(text=texts, clean=st.sampled_from(CLEAN_MODES), context_length=context_lengths)
@example(text=LONG_WORD, clean="lower", context_length=77).via("a hang before the heap-ordered BPE")
def test_ids_are_well_formed(ours, text: str, clean: str, context_length: int) -> None:
    tok = ours[clean]
    with no_hang():
        ids = tok(text, context_length=context_length)
        again = tok([text, "a cat"], context_length=context_length)
    assert ids.dtype == np.int64 and ids.shape == (1, context_length)
    assert np.array_equal(again[:1], ids), "not deterministic (or a batch changed a row)"
    row = ids[0]
    assert ((row >= 0) & (row < tok.vocab_size)).all()
    content = tok.encode(text) if len(text) < 5000 else None
    if context_length == 1:
        assert row.tolist() == [tok.eot_token_id]
        return
    assert row[0] == tok.sot_token_id
    end = int(np.flatnonzero(row == tok.eot_token_id)[-1])
    assert (row[end + 1:] == 0).all() and (row[1:end] != 0).all() or 0 in (content or [])
    if content is not None:
        event("truncated" if len(content) + 2 > context_length else "fits")
        assert end == min(len(content) + 1, context_length - 1)
        assert row[1:end].tolist() == content[:end - 1]


@examples(1.0)
@given(text=texts, clean=st.sampled_from(CLEAN_MODES), context_length=st.sampled_from([77, 32, 3]))
@example(text="\ud800 a", clean="lower", context_length=77)
@example(text="ab" * 700, clean="canonicalize", context_length=32)
def test_ids_match_open_clip(ours, ref, text: str, clean: str, context_length: int) -> None:
    """The module's claim: id-for-id open_clip's SimpleTokenizer (encode, and the padded/truncated batch)."""
    with no_hang():
        want = ref[clean].encode(text)
        got = ours[clean].encode(text)
    assert got == want
    assert np.array_equal(ours[clean]([text], context_length=context_length),
                          ref[clean]([text], context_length=context_length).numpy())


@examples(0.5)
@given(word=st.text(st.characters(exclude_categories=("Z", "Cc", "Cs")), min_size=65, max_size=600)
       | st.text(st.sampled_from("aeiouxyzbcd"), min_size=65, max_size=2000))
def test_long_words_take_the_heap_bpe_with_the_same_result(ours, word: str) -> None:
    tok = ours["lower"]
    token = "".join(tok.byte_encoder[b] for b in word.encode("utf-8", "surrogatepass"))
    fast = tok._bpe_long(token)
    # the reference loop, as open_clip runs it (the threshold lifted for this call only)
    saved, tokenizer_module._LONG_WORD = tokenizer_module._LONG_WORD, 1 << 30
    try:
        tok.cache.pop(token, None)
        reference = tok.bpe(token)
    finally:
        tokenizer_module._LONG_WORD = saved
        tok.cache.pop(token, None)
    assert fast == reference


def test_huge_inputs_do_not_hang(ours) -> None:
    """A search query or a caption is user input: a 200k-letter word (minutes in the quadratic BPE loop) and 3 MB
    of distinct words (17 s when every word past the context was tokenised too) take well under a second each."""
    tok = ours["lower"]
    rnd = random.Random(1)
    word = "".join(rnd.choices(string.ascii_lowercase, k=200_000))
    words = " ".join("".join(rnd.choices(string.ascii_lowercase, k=rnd.randint(3, 12))) for _ in range(400_000))
    for text in (word, words):
        t0 = time.perf_counter()
        with no_hang(60):
            ids = tok(text)
        assert ids.shape == (1, 77) and ids[0, -1] == tok.eot_token_id
        assert time.perf_counter() - t0 < 8, f"{time.perf_counter() - t0:.1f} s for {len(text):,} characters"
