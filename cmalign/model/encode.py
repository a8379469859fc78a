"""Embedding records and captions with a torch open_clip model: the one loop fit's guard and eval share.

Both need the same thing (batched, without gradients, unit-length float32 numpy rows, optionally under the
run's autocast) and must agree to the last digit, so that a run's guard figures and eval's figures of the
same model are comparable. The model's mode (train/eval) is the caller's business.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from cmalign.data.records import Record, load_image


@torch.no_grad()
def encode_images(model, records: list[Record], preprocess, device, batch_size: int = 256,
                  autocast=nullcontext) -> np.ndarray:
    """(len(records), dim) unit-length float32 image embeddings of non-empty ``records``; ``autocast`` is a
    context-manager factory (the run's AMP), called per batch."""
    out = []
    for s in range(0, len(records), batch_size):
        pix = torch.stack([preprocess(load_image(r)) for r in records[s:s + batch_size]])
        with autocast():
            out.append(model.encode_image(pix.to(device), normalize=True).float().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def encode_texts(model, texts: list[str], tokenizer, device, batch_size: int = 256,
                 autocast=nullcontext) -> np.ndarray:
    """(len(texts), dim) unit-length float32 text embeddings of non-empty ``texts``; ``autocast`` as above."""
    out = []
    for s in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[s:s + batch_size]).to(device)
        with autocast():
            out.append(model.encode_text(tokens, normalize=True).float().cpu().numpy())
    return np.concatenate(out)
