"""A small ClipCap-style prefix decoder: embedding → prefix vectors → causal transformer → words.

It is trained on *text* embeddings of training captions (each reconstructs its own caption) and then fed *image*
embeddings. Where the modalities sit apart, image embeddings are inputs it never saw, and its captions degrade;
that degradation is what the caption-prefix protocol measures. Trained from scratch on word tokens (the
:mod:`cmalign.evaluation.captioning.tokenize` tokenizer), so it needs no downloaded language model and
runs on a CPU in seconds for the default data.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch
from torch import nn

from cmalign.evaluation.captioning.config import DecoderConfig
from cmalign.evaluation.captioning.tokenize import tokenize
from cmalign.evaluation.captioning.training import TrainedDecoder, check_inputs, fit_decoder, teacher_forcing

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


class Vocabulary:
    def __init__(self, words: list[str]):
        self.words = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, captions: list[list[str]], max_size: int) -> Vocabulary:
        counts = Counter(t for c in captions for t in c)
        return cls([w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_size]])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.index.get(t, UNK) for t in tokens]

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(self.words[i])
        return " ".join(out)


class PrefixDecoder(nn.Module):
    def __init__(self, embed_dim: int, vocab_size: int, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        p, w = cfg.prefix_length, cfg.width
        self.embed_scale = math.sqrt(embed_dim)  # unit-norm inputs → unit-scale features
        self.prefix = nn.Sequential(nn.Linear(embed_dim, w * p // 2), nn.Tanh(), nn.Linear(w * p // 2, w * p))
        self.tokens = nn.Embedding(vocab_size, w)
        self.position = nn.Parameter(torch.randn(p + cfg.max_tokens + 1, w) * 0.02)
        layer = nn.TransformerEncoderLayer(w, cfg.heads, 4 * w, dropout=cfg.dropout, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, vocab_size)

    def forward(self, emb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits for the next word at every position of ``tokens`` (which start with <bos>)."""
        b, p = len(emb), self.cfg.prefix_length
        prefix = self.prefix(emb * self.embed_scale).view(b, p, -1)
        h = torch.cat([prefix, self.tokens(tokens)], 1)
        h = h + self.position[: h.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(h.shape[1], device=h.device)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(self.norm(h[:, p:]))


def train_decoder(embeddings: np.ndarray, captions: list[str], cfg: DecoderConfig | None = None,
                  progress=None) -> TrainedDecoder:
    """Fit the decoder to reconstruct ``captions[i]`` from ``embeddings[i]`` (normalised text embeddings).

    With ``cfg.language_model`` (a local Hugging Face causal LM directory), ClipCap proper: the prefix goes in
    front of that model's token embeddings and both are fine-tuned.
    """
    cfg = cfg or DecoderConfig()
    check_inputs(embeddings, captions)
    if cfg.language_model:
        from cmalign.evaluation.captioning.lm_decoder import train_lm_decoder  # needs transformers

        return train_lm_decoder(embeddings, captions, cfg, progress)
    torch.manual_seed(cfg.seed)
    tokens = [tokenize(c)[: cfg.max_tokens] for c in captions]
    vocab = Vocabulary.build(tokens, cfg.max_vocab)
    emb = torch.as_tensor(np.asarray(embeddings, np.float32))
    model = PrefixDecoder(emb.shape[1], len(vocab), cfg).to(cfg.device)
    history = fit_decoder(model, [{"params": model.parameters(), "lr": cfg.lr}], emb,
                          teacher_forcing([vocab.encode(t) for t in tokens], BOS, EOS, PAD), cfg, progress)
    return TrainedDecoder(model, vocab.decode, len(vocab), cfg, history, start=BOS, eos=EOS, pad=PAD)
