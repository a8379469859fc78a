"""CIDEr-D and BLEU-4 through pycocoevalcap's own scorers (pure Python; only its tokenizer needs Java).

pycocoevalcap's `Cider` is CIDEr-D as COCO reports it: n = 1..4, Gaussian length penalty σ = 6, clipped counts,
×10, with IDF taken from the references of the evaluated corpus — so a one-image corpus scores 0.
"""

from __future__ import annotations

import contextlib
import io
import time

from cmalign.errors import ConfigError
from cmalign.evaluation.captioning.tokenize import tokenize_caption


def caption_scores(hypotheses: dict, references: dict) -> dict:
    """``hypotheses[id]`` is one caption, ``references[id]`` a list; raw text, tokenised here."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(hypotheses) != set(references):
        raise ConfigError("hypotheses and references must have the same ids")
    if not hypotheses:
        raise ConfigError("no captions to score")
    for key, refs in references.items():
        if not refs:
            raise ConfigError(f"image {key!r} has no reference caption")
    res = {k: [tokenize_caption(h)] for k, h in hypotheses.items()}
    gts = {k: [tokenize_caption(r) for r in refs] for k, refs in references.items()}
    t0 = time.perf_counter()
    cider, _ = Cider().compute_score(gts, res)
    cider_seconds = time.perf_counter() - t0
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its ratios
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider_d": float(cider), "bleu4": float(bleu[3]), "images": len(res),
            "cider_seconds": round(cider_seconds, 3)}
