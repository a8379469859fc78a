"""CIDEr-D, BLEU-4 and ROUGE-L through pycocoevalcap's own scorers (pure Python; only its tokenizer needs Java).

pycocoevalcap's `Cider` is CIDEr-D as COCO reports it: n = 1..4, Gaussian length penalty σ = 6, clipped counts,
×10, with IDF taken from the references of the evaluated corpus — so a one-image corpus scores 0. `Rouge` is
ROUGE-L (LCS F-measure, β = 1.2, best reference per image), averaged over images.
"""

from __future__ import annotations

import time

import numpy as np

from cmalign.errors import ConfigError
from cmalign.evaluation.captioning.tokenize import tokenize_caption

BLEU_N = 4
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's BleuScorer guards


def caption_scores(hypotheses: dict, references: dict, per_image: bool = False):
    """``hypotheses[id]`` is one caption, ``references[id]`` a list; raw text, tokenised here.

    ``per_image=True`` returns ``(scores, per_image)``: in ``hypotheses``' key order, each image's CIDEr-D (IDF of
    the whole corpus) and ROUGE-L, and its BLEU counts (``bleu_counts``: test length, closest reference length,
    n-gram guesses and clipped matches for n = 1..4), from which :func:`corpus_bleu` rebuilds the corpus BLEU-4.
    """
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(hypotheses) != set(references):
        raise ConfigError("hypotheses and references must have the same ids")
    if not hypotheses:
        raise ConfigError("no captions to score")
    for key, refs in references.items():
        if not refs:
            raise ConfigError(f"image {key!r} has no reference caption")
    res = {k: [tokenize_caption(h)] for k, h in hypotheses.items()}
    gts = {k: [tokenize_caption(r) for r in references[k]] for k in res}
    t0 = time.perf_counter()
    cider, cider_each = Cider().compute_score(gts, res)
    cider_seconds = time.perf_counter() - t0
    # pycocoevalcap's Bleu(4).compute_score is this loop plus a print; the scorer itself keeps the per-image counts
    bleu_scorer = BleuScorer(n=BLEU_N)
    for k in res:
        bleu_scorer += (res[k][0], gts[k])
    bleu, _ = bleu_scorer.compute_score(option="closest", verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    scores = {"cider_d": float(cider), "bleu4": float(bleu[BLEU_N - 1]), "rouge_l": float(rouge),
              "images": len(res), "cider_seconds": round(cider_seconds, 3)}
    if not per_image:
        return scores
    counts = np.array([[c["testlen"], _closest(c["reflen"], c["testlen"]), *c["guess"], *c["correct"]]
                       for c in bleu_scorer.ctest], np.float64)
    return scores, {"cider_d": np.asarray(cider_each, np.float64), "rouge_l": np.asarray(rouge_each, np.float64),
                    "bleu_counts": counts}


def _closest(reflens, testlen) -> float:
    """The reference length closest to the hypothesis' (ties to the shorter), as BleuScorer's "closest" picks it."""
    return float(min((abs(r - testlen), r) for r in reflens)[1])


def corpus_bleu(totals: np.ndarray, n: int = BLEU_N) -> np.ndarray:
    """Corpus BLEU-n from summed per-image counts (..., 2 + 2·BLEU_N), exactly as pycocoevalcap's BleuScorer."""
    t = np.asarray(totals, np.float64)
    testlen, reflen = t[..., 0], t[..., 1]
    guess, correct = t[..., 2:2 + BLEU_N], t[..., 2 + BLEU_N:2 + 2 * BLEU_N]
    log_p = np.sum(np.log((correct[..., :n] + _TINY) / (guess[..., :n] + _SMALL)), axis=-1)
    bleu = np.exp(log_p / n)
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    return np.where(ratio < 1, bleu * np.exp(1 - 1 / np.where(ratio < 1, ratio, 1.0)), bleu)
