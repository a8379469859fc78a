"""Does an exported graph reproduce torch eager? Cosines per batch size, the torch-free pipeline, and R@1.

`export_model` keeps nothing that fails these checks: an export's manifest records the figures, and a user can
trust that the production runtime gives the embeddings the fitted model gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import cmalign.export.manifest as mf
from cmalign.errors import CmalignError
from cmalign.export.preprocess import ImagePreprocessor
from cmalign.export.runtime import default_optimization, make_session
from cmalign.export.tokenizer import ClipTokenizer
from cmalign.metrics.vectors import row_cosines

PARITY_BATCHES = (1, 3, 32)


class ParityError(CmalignError, RuntimeError):
    """An exported graph does not reproduce torch eager closely enough; nothing was written."""


@dataclass
class ParityInputs:
    """Generated validation images and captions, as torch sees them and as the runtime does."""

    pixels: torch.Tensor
    tokens: torch.Tensor
    images: list  # PIL images
    captions: list[str]


def parity_inputs(preprocess_val: Callable, tokenizer: Callable, n: int = max(PARITY_BATCHES)) -> ParityInputs:
    from cmalign.data.synth import synth_split

    records = synth_split("val", n_images=n, captions_per_image=1).records
    images = [r.image.load().convert("RGB") for r in records]
    captions = [r.caption for r in records]
    return ParityInputs(pixels=torch.stack([preprocess_val(im) for im in images]), tokens=tokenizer(captions),
                        images=images, captions=captions)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(row_cosines(a, b).min())


def graph_parity(path: Path, variant: str, x: np.ndarray, reference: np.ndarray) -> dict:
    """Min cosine per batch size of the ORT graph (as the runtime runs it on CPU) against torch eager."""
    session = make_session(path, optimization=default_optimization(variant, "cpu"))
    name = session.get_inputs()[0].name
    out = {}
    for bs in PARITY_BATCHES:
        got = np.concatenate([session.run(None, {name: x[i:i + bs]})[0] for i in range(0, len(x), bs)])
        if got.shape != reference.shape:
            raise ParityError(f"{path.name}: output shape {got.shape} at batch {bs}, expected {reference.shape}")
        out[f"batch_{bs}"] = _min_cosine(got.astype(np.float32), reference)
    out["min_cosine"] = min(out.values())
    out["max_abs_diff"] = float(np.abs(got.astype(np.float32) - reference).max())
    return out


def pipeline_parity(export_dir: Path, inputs: ParityInputs) -> dict:
    """The torch-free preprocessing and tokenizer against open_clip's, on the same inputs."""
    pre = ImagePreprocessor.from_file(export_dir / mf.PREPROCESS).batch(inputs.images)
    tok = ClipTokenizer.from_dir(export_dir / mf.TOKENIZER_DIR)(inputs.captions)
    return {"preprocess_max_abs_diff": float(np.abs(pre - inputs.pixels.numpy()).max()),
            "tokens_equal": bool(np.array_equal(tok, inputs.tokens.numpy()))}


def retrieval_r1(export_dir: Path, variant: str, n_images: int) -> dict:
    """i→t / t→i R@1 of one variant's graphs on the generated validation split (5 captions per image),
    scored exactly as `fit`'s guard scores the torch model."""
    from cmalign.data.pair_set import PairSet
    from cmalign.data.synth import synth_split
    from cmalign.train.guard import recall_at_1

    guard = PairSet.from_records(synth_split("val", n_images=n_images).records, (), max_images=n_images)
    pre = ImagePreprocessor.from_file(export_dir / mf.PREPROCESS)
    tok = ClipTokenizer.from_dir(export_dir / mf.TOKENIZER_DIR)
    emb = {}
    for tower, batches in (("image", [pre.batch([r.image.load() for r in guard.images[i:i + 64]])
                                      for i in range(0, len(guard.images), 64)]),
                           ("text", [tok(guard.captions[i:i + 256]) for i in range(0, len(guard.captions), 256)])):
        session = make_session(export_dir / mf.graph_file(tower, variant),
                               optimization=default_optimization(variant, "cpu"))
        name = session.get_inputs()[0].name
        emb[tower] = np.concatenate([session.run(None, {name: b})[0] for b in batches]).astype(np.float32)
    i2t, t2i = recall_at_1(emb, guard)
    return {"r1_i2t": i2t, "r1_t2i": t2i, "images": len(guard.images), "captions": len(guard.captions)}
