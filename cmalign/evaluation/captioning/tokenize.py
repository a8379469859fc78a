"""Caption tokenisation for scoring, in Python.

pycocoevalcap's PTBTokenizer runs Stanford CoreNLP in Java, which a CPU-only, offline install may not have. This
follows what it produces for captions: lower-case, contractions split PTB-style ("don't" → "do n't", "dog's" →
"dog 's"), punctuation split off and the PTB punctuation tokens dropped. On plain captions the two agree token for
token; they can differ on rare constructs (URLs, decimals), which moves CIDEr by far less than its run-to-run noise.
"""

from __future__ import annotations

import re

NAME = "cmalign PTB-style Python tokenizer (lower-case, PTB contractions, punctuation dropped)"

# PTB tokens pycocoevalcap's tokenizer removes after tokenising
PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
               ";"}
_TOKEN = re.compile(r"\w+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.]\w+)*|[^\w\s]+")


def tokenize(text: str) -> list[str]:
    tokens = _TOKEN.findall(text.lower())
    return [t for t in tokens if t not in PUNCTUATION and re.search(r"\w", t)]


def tokenize_caption(text: str) -> str:
    """The space-joined token string that pycocoevalcap's scorers expect."""
    return " ".join(tokenize(text))
