"""The adapter: per adapted modality a residual map, initialised at the identity, output L2-normalised.

    a(x) = normalize(x + x·W + b)                      full rank (W: d × d), or
    a(x) = normalize(x + (x·D)·U + b)                  rank r (D: d × r random, U: r × d zero), or
    a(x) = normalize(x + gelu(x·W1 + b1)·W2 + b)       a residual MLP, h hidden units (W1: d × h random, W2 zero)

W, U, W2 and b start at zero, so an untrained adapter returns its input (re-normalised). The MLP's GELU is the tanh
form, which numpy and every ONNX opset compute exactly as torch does (the erf form needs scipy or opset 20). The
adapter has the call signature of an open_clip model, ``(images, texts) -> (image features, text features, logit
scale)``, so the TPC-CMA step of `fit` (:class:`cmalign.objective.step.TPCCMAStep`) trains it unchanged: the two
trainers share one objective.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class ResidualMap(torch.nn.Module):
    def __init__(self, dim: int, rank: int = 0, generator: torch.Generator | None = None, hidden: int = 0):
        super().__init__()
        self.dim, self.rank, self.hidden = dim, (0 if rank >= dim else rank), hidden
        if hidden:
            self.w1 = torch.nn.Parameter(torch.randn(dim, hidden, generator=generator) / math.sqrt(dim))
            self.b1 = torch.nn.Parameter(torch.zeros(hidden))
            self.w2 = torch.nn.Parameter(torch.zeros(hidden, dim))
        elif self.rank:
            self.down = torch.nn.Parameter(torch.randn(dim, self.rank, generator=generator) / math.sqrt(dim))
            self.up = torch.nn.Parameter(torch.zeros(self.rank, dim))
        else:
            self.weight = torch.nn.Parameter(torch.zeros(dim, dim))
        self.bias = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hidden:
            delta = F.gelu(x @ self.w1 + self.b1, approximate="tanh") @ self.w2
        else:
            delta = (x @ self.down) @ self.up if self.rank else x @ self.weight
        return F.normalize(x + delta + self.bias, dim=-1)


class AlignmentAdapter(torch.nn.Module):
    """``kind = "query"`` maps texts only (images pass through); ``"both"`` maps each modality."""

    def __init__(self, dim: int, kind: str = "both", rank: int = 0, logit_scale: float = 100.0, seed: int = 0,
                 hidden: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.kind = kind
        self.text = ResidualMap(dim, rank, g, hidden)
        self.image = ResidualMap(dim, rank, g, hidden) if kind == "both" else None
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(logit_scale)))

    def forward(self, images: torch.Tensor, texts: torch.Tensor):
        fi = self.image(images) if self.image is not None else images
        return fi, self.text(texts), self.logit_scale.exp()

    def towers(self) -> dict[str, ResidualMap]:
        return {"text": self.text} | ({"image": self.image} if self.image is not None else {})
