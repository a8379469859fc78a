"""Torch-free CLIP BPE tokenizer for the production runtime, id-for-id equal to open_clip's ``SimpleTokenizer``.

Why a reimplementation: ``open_clip.tokenizer`` imports torch at import time and returns torch tensors, and the
runtime must not import torch. The algorithm below (byte-to-unicode table, BPE merge loop, the pre-tokenising
regex, ftfy/html cleaning, truncation) follows open_clip 3.3.0's ``open_clip/tokenizer.py``, itself copied from
OpenAI CLIP (https://github.com/openai/CLIP) — MIT License, Copyright (c) 2021 OpenAI; open_clip is MIT licensed
too (Copyright (c) 2012-2021 Gabriel Ilharco et al.). Only the training-time reduction masks (random / simple /
shuffle / syntax token dropping) are left out: `save_tokenizer` refuses a tokenizer that uses one.

An exported tokenizer is a directory holding ``tokenizer.json`` and the gzip'ed BPE merges file it names.
"""

from __future__ import annotations

import gzip
import heapq
import html
import os
import string
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

from cmalign.artifacts.atomic import atomic_write, write_json
from cmalign.artifacts.checksums import sha256_file
from cmalign.errors import CmalignError, ConfigError
from cmalign.export.manifest import read_json_object

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_TYPE = "clip-bpe"
CLEAN_MODES = ("lower", "whitespace", "canonicalize")
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
# open_clip keeps the merges on lines 1 .. 49152-256-2 of the vocab file (line 0 is a version header).
_N_MERGE_LINES = 49152 - 256 - 2
# open_clip's cache is unbounded; ours stops growing here (a long-running server sees unbounded distinct words).
_BPE_CACHE_MAX = 1 << 18
# open_clip's BPE loop is quadratic in a word's length (a 16k-letter word took 5 s, a 100k-letter one minutes): words
# longer than this take the heap-ordered loop instead, O(n log n) and id-for-id the same (see ClipTokenizer._bpe_long).
_LONG_WORD = 64


class UnsupportedTokenizerError(CmalignError, ValueError):
    """An open_clip tokenizer this runtime cannot reproduce (so it is not exported)."""


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character (OpenAI CLIP's reversible byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word[:-1], word[1:], strict=True))


def _basic_clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def _whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def _canonicalize_text(text: str) -> str:
    # open_clip's canonicalize_text (from big_vision) without keep_punctuation_exact_string, which it never passes.
    text = text.replace("_", " ")
    text = text.translate(_PUNCTUATION_TABLE)
    text = text.lower()
    text = " ".join(text.split())
    return text.strip()


def _clean_lower(text: str) -> str:
    return _whitespace_clean(_basic_clean(text)).lower()


def _clean_whitespace(text: str) -> str:
    return _whitespace_clean(_basic_clean(text))


def _clean_canonicalize(text: str) -> str:
    return _canonicalize_text(_basic_clean(text))


_CLEAN_FNS = {"lower": _clean_lower, "whitespace": _clean_whitespace, "canonicalize": _clean_canonicalize}


def _read_merges(vocab_path: str | os.PathLike) -> list[tuple[str, ...]]:
    with gzip.open(vocab_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1:_N_MERGE_LINES + 1]]


def _merges_are_learned(merges: list[tuple[str, ...]], base: set[str]) -> bool:
    """Whether every merge joins two symbols that exist before it (base symbols or products of earlier merges) into
    a product no other merge makes: true of any merge list BPE training writes, CLIP's included. Then a merge only
    creates pairs of a later rank, which is what lets :meth:`ClipTokenizer._bpe_long` reproduce the reference loop."""
    made: set[str] = set()
    for merge in merges:
        if len(merge) != 2 or any(s not in base and s not in made for s in merge):
            return False
        product = merge[0] + merge[1]
        if product in made or product in base:
            return False
        made.add(product)
    return True


class ClipTokenizer:
    """OpenAI CLIP / open_clip byte-level BPE tokenizer returning numpy int64 ids."""

    def __init__(
        self,
        vocab_path: str | os.PathLike,
        context_length: int = 77,
        clean: str = "lower",
        additional_special_tokens: Sequence[str] | None = None,
    ):
        if clean not in _CLEAN_FNS:
            raise ConfigError(f"clean must be one of {CLEAN_MODES}, got {clean!r}")
        if isinstance(additional_special_tokens, str):
            raise TypeError("additional_special_tokens must be a list of strings, not a string")
        self.vocab_path = Path(vocab_path)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        merges = _read_merges(self.vocab_path)
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        self._learned_merges = _merges_are_learned(merges, set(vocab))
        vocab.extend("".join(merge) for merge in merges)
        special_tokens = [SOT_TOKEN, EOT_TOKEN]
        self.additional_special_tokens = list(additional_special_tokens or [])
        special_tokens += self.additional_special_tokens
        vocab.extend(special_tokens)
        self.encoder = dict(zip(vocab, range(len(vocab)), strict=True))
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.bpe_ranks = dict(zip(merges, range(len(merges)), strict=True))
        self._special_tokens = special_tokens
        self.cache: dict[str, str] = {t: t for t in special_tokens}
        # A word's ids, from the word as the pattern matched it: a caption's words are mostly ones seen before, and
        # this skips their byte encoding, the BPE cache and the vocabulary lookups (generated captions: 59 -> 31 us
        # each to tokenise).
        self._word_ids: dict[str, list[int]] = {}
        # Same pattern as open_clip, special tokens included unescaped (as there).
        special = "|".join(special_tokens)
        self.pat = regex.compile(
            special + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.vocab_size = len(self.encoder)
        self.all_special_ids = [self.encoder[t] for t in special_tokens]
        self.sot_token_id = self.all_special_ids[0]
        self.eot_token_id = self.all_special_ids[1]
        self.context_length = context_length
        self.clean = clean
        self.clean_fn = _CLEAN_FNS[clean]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_path={str(self.vocab_path)!r}, context_length={self.context_length}, "
                f"clean={self.clean!r}, additional_special_tokens={self.additional_special_tokens!r})")

    def bpe(self, token: str) -> str:
        cached = self.cache.get(token)
        if cached is not None:
            return cached
        if len(token) > _LONG_WORD and self._learned_merges:
            out = self._bpe_long(token)
            if len(self.cache) < _BPE_CACHE_MAX:
                self.cache[token] = out
            return out
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _get_pairs(word)
        if not pairs:
            return token + "</w>"
        ranks = self.bpe_ranks
        inf = float("inf")
        while True:
            bigram = min(pairs, key=lambda pair: ranks.get(pair, inf))
            if bigram not in ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _get_pairs(word)
        out = " ".join(word)
        if len(self.cache) < _BPE_CACHE_MAX:
            self.cache[token] = out
        return out

    def _bpe_long(self, token: str) -> str:
        """The reference loop's result in O(n log n): merge candidates in a heap ordered by (rank, position).

        The reference loop merges, rank by rank, every occurrence of the lowest-ranked pair left to right. With a
        learned merge list (:func:`_merges_are_learned`) a merge creates only pairs of later ranks, so popping pairs
        by rank, then by position (of the left symbol, which keeps its place in a linked list), and skipping pairs
        a merge has since broken, merges the same pairs in the same order.
        """
        symbols = list(token[:-1]) + [token[-1] + "</w>"]
        n = len(symbols)
        nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        nxt[-1] = -1
        ranks = self.bpe_ranks
        heap = [(r, i) for i in range(n - 1) if (r := ranks.get((symbols[i], symbols[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            r, i = heapq.heappop(heap)
            j = nxt[i]
            # a rank names one pair: the entry still holds if symbol i and its right neighbour still form it
            if not alive[i] or j < 0 or ranks.get((symbols[i], symbols[j])) != r:
                continue
            symbols[i] += symbols[j]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[i] >= 0:
                prv[nxt[i]] = i
            for left in (prv[i], i):  # the two pairs the merged symbol now takes part in
                if left >= 0 and nxt[left] >= 0:
                    rank = ranks.get((symbols[left], symbols[nxt[left]]))
                    if rank is not None:
                        heapq.heappush(heap, (rank, left))
        return " ".join(symbols[i] for i in range(n) if alive[i])

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without the start/end tokens."""
        return self._encode(text)

    def _encode(self, text: str, limit: int | None = None) -> list[int]:
        """``encode``, stopping once ``limit`` ids are there (a caller that truncates needs no more)."""
        bpe_tokens: list[int] = []
        word_ids = self._word_ids
        for word in self.pat.findall(self.clean_fn(text)):
            ids = word_ids.get(word)
            if ids is None:
                token = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                ids = [self.encoder[bpe_token] for bpe_token in self.bpe(token).split(" ")]
                if len(word_ids) < _BPE_CACHE_MAX:
                    word_ids[word] = ids
            bpe_tokens.extend(ids)
            if limit is not None and len(bpe_tokens) >= limit:
                break
        return bpe_tokens

    def decode(self, tokens) -> str:
        text = "".join(self.decoder[int(t)] for t in tokens)
        return bytearray([self.byte_decoder[c] for c in text]).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """Ids of shape (len(texts), context_length), int64: start token, ids, end token, zero padding.

        A text too long for the context is cut to ``context_length`` ids and its last id replaced by the end token.
        """
        if isinstance(texts, str):
            texts = [texts]
        context_length = context_length or self.context_length
        if not context_length or context_length < 1:
            raise ConfigError(f"context_length must be a positive integer, got {context_length!r}")
        # context_length - 1 ids decide the row: more are cut off (and the last of the kept replaced by the end token)
        all_tokens = [[self.sot_token_id] + self._encode(text, context_length - 1) + [self.eot_token_id]
                      for text in texts]
        result = np.zeros((len(all_tokens), context_length), dtype=np.int64)
        for i, tokens in enumerate(all_tokens):
            if len(tokens) > context_length:
                tokens = tokens[:context_length]
                tokens[-1] = self.eot_token_id
            result[i, :len(tokens)] = tokens
        return result

    def to_config(self) -> dict:
        return {
            "type": TOKENIZER_TYPE,
            "vocab_file": self.vocab_path.name,
            "vocab_sha256": sha256_file(self.vocab_path),
            "context_length": self.context_length,
            "clean": self.clean,
            "additional_special_tokens": list(self.additional_special_tokens),
            "sot_token_id": self.sot_token_id,
            "eot_token_id": self.eot_token_id,
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ClipTokenizer:
        """Load a tokenizer written by `save_tokenizer`; a ValueError names the file and field of any problem."""
        d = Path(path)
        cfg_path = d / TOKENIZER_JSON
        cfg = read_json_object(cfg_path, f"is {d} a tokenizer directory written by `save_tokenizer`?")

        def field(name: str, check, what: str):
            if name not in cfg:
                raise ConfigError(f"{cfg_path}: field '{name}' is missing")
            value = cfg[name]
            if not check(value):
                raise ConfigError(f"{cfg_path}, field '{name}': expected {what}, found {value!r}")
            return value

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        field("type", lambda v: v == TOKENIZER_TYPE, repr(TOKENIZER_TYPE))
        vocab_file = field("vocab_file", lambda v: isinstance(v, str) and v != "", "a file name")
        rel = Path(vocab_file)
        if rel.is_absolute() or ".." in rel.parts:
            raise ConfigError(f"{cfg_path}, field 'vocab_file': must name a file inside {d}, found {vocab_file!r}")
        context_length = field("context_length", lambda v: is_int(v) and v > 0, "a positive integer")
        clean = field("clean", lambda v: v in CLEAN_MODES, f"one of {CLEAN_MODES}")
        extra = field(
            "additional_special_tokens",
            lambda v: v is None or (isinstance(v, list) and all(isinstance(t, str) and t for t in v)),
            "null or a list of non-empty strings",
        )
        sot = field("sot_token_id", is_int, "an integer")
        eot = field("eot_token_id", is_int, "an integer")
        vocab_size = field("vocab_size", is_int, "an integer")
        vocab_path = d / rel
        if not vocab_path.is_file():
            raise ConfigError(f"{cfg_path}, field 'vocab_file': {vocab_path} does not exist")
        if "vocab_sha256" in cfg:  # optional: written by save_tokenizer, checked when present
            want = cfg["vocab_sha256"]
            got = sha256_file(vocab_path)
            if got != want:
                raise ConfigError(f"{cfg_path}, field 'vocab_sha256': {vocab_path} hashes to {got}, expected {want!r}")
        try:
            tok = cls(vocab_path, context_length=context_length, clean=clean, additional_special_tokens=extra)
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise ConfigError(f"{cfg_path}, field 'vocab_file': cannot read {vocab_path} ({e})") from e
        for name, want, got in (("sot_token_id", sot, tok.sot_token_id), ("eot_token_id", eot, tok.eot_token_id),
                                ("vocab_size", vocab_size, tok.vocab_size)):
            if want != got:
                raise ConfigError(f"{cfg_path}, field '{name}': recorded {want}, but {vocab_path.name} with the "
                                 f"recorded special tokens gives {got}")
        return tok


def token_lengths(tokens: np.ndarray) -> np.ndarray:
    """Each row's length up to its last non-zero id (0 for an all-padding row).

    Padding is id 0 at the end of a row; id 0 is also a real token ("!"), but every row ends with the EOT id, so the
    last non-zero column of a row is its EOT (or the context length, where open_clip truncates onto an EOT).
    """
    nonzero = tokens != 0
    return np.where(nonzero.any(axis=1), tokens.shape[1] - np.argmax(nonzero[:, ::-1], axis=1), 0)


def trim_padding(tokens: np.ndarray) -> np.ndarray:
    """``tokens`` without the padding columns after every row's last token (at least 2 columns)."""
    return tokens[:, :max(2, int(token_lengths(tokens).max(initial=0)))]


def save_tokenizer(open_clip_tokenizer, out_dir: str | os.PathLike) -> dict:
    """Write an open_clip ``SimpleTokenizer`` as ``out_dir/tokenizer.json`` plus its BPE vocab file.

    Refuses (`UnsupportedTokenizerError`) anything `ClipTokenizer` would not reproduce id for id: other tokenizer
    classes (HF, SigLIP), a SimpleTokenizer with a reduction mask (training-time token dropping), a clean function
    or a vocab other than open_clip's own. Export-time only: imports open_clip (and so torch) lazily.
    """
    from open_clip import tokenizer as oc_tok

    tok = open_clip_tokenizer
    cls_name = f"{type(tok).__module__}.{type(tok).__qualname__}"
    if type(tok) is not oc_tok.SimpleTokenizer:
        raise UnsupportedTokenizerError(
            f"cannot export tokenizer {cls_name}: only open_clip.tokenizer.SimpleTokenizer (the CLIP BPE tokenizer) "
            "has a torch-free runtime implementation"
        )
    if getattr(tok, "reduction_fn", None) is not None:
        raise UnsupportedTokenizerError(
            f"cannot export tokenizer {cls_name} with reduction_fn={tok.reduction_fn!r}: reduction-mask "
            "tokenization (random/simple/shuffle/syntax token dropping) is training-time only; build the "
            "tokenizer without reduction_mask for inference"
        )
    clean = None
    for mode, fn in (("lower", oc_tok._clean_lower), ("whitespace", oc_tok._clean_whitespace),
                     ("canonicalize", oc_tok._clean_canonicalize)):
        if tok.clean_fn is fn:
            clean = mode
    if clean is None:
        raise UnsupportedTokenizerError(
            f"cannot export tokenizer {cls_name}: clean_fn {tok.clean_fn!r} is none of open_clip's "
            f"_clean_lower/_clean_whitespace/_clean_canonicalize"
        )
    context_length = tok.context_length
    if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 1:
        raise UnsupportedTokenizerError(
            f"cannot export tokenizer {cls_name}: context_length is {context_length!r}, not a positive integer"
        )
    specials = [tok.decoder[i] for i in tok.all_special_ids]
    if specials[:2] != [SOT_TOKEN, EOT_TOKEN]:
        raise UnsupportedTokenizerError(f"cannot export tokenizer {cls_name}: unexpected special tokens {specials!r}")
    extra = specials[2:]

    # SimpleTokenizer does not record its bpe_path: check it is open_clip's default vocab by rebuilding from it.
    vocab_src = Path(oc_tok.default_bpe())
    ours = ClipTokenizer(vocab_src, context_length=context_length, clean=clean, additional_special_tokens=extra)
    if ours.encoder != tok.encoder or ours.bpe_ranks != tok.bpe_ranks:
        raise UnsupportedTokenizerError(
            f"cannot export tokenizer {cls_name}: its vocabulary differs from open_clip's default BPE vocab "
            f"({vocab_src.name}); a custom bpe_path is not recorded by SimpleTokenizer, so it cannot be exported"
        )

    out = Path(out_dir)
    data = vocab_src.read_bytes()
    with atomic_write(out / vocab_src.name, "wb") as f:
        f.write(data)
    cfg = ours.to_config()
    write_json(out / TOKENIZER_JSON, cfg)
    return cfg
