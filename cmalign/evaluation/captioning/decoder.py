"""A small ClipCap-style prefix decoder: embedding → prefix vectors → causal transformer → words.

It is trained on *text* embeddings of training captions (each reconstructs its own caption) and then fed *image*
embeddings. Where the modalities sit apart, image embeddings are inputs it never saw, and its captions degrade;
that degradation is what the caption-prefix protocol measures. Trained from scratch on word tokens (the
:mod:`cmalign.evaluation.captioning.tokenize` tokenizer), so it needs no downloaded language model and runs on a CPU in seconds
for the default data.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cmalign.errors import ConfigError
from cmalign.evaluation.captioning.config import DecoderConfig
from cmalign.evaluation.captioning.tokenize import tokenize

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


@dataclass
class TrainedDecoder:
    model: nn.Module  # forward(emb, tokens) -> next-token logits, tokens starting with a start marker
    decode_ids: Callable[[list[int]], str]
    vocabulary_size: int
    cfg: DecoderConfig
    history: list[float]  # mean training loss per epoch
    start: int = BOS
    eos: int = EOS
    pad: int = PAD

    @torch.no_grad()
    def generate(self, emb: np.ndarray, batch_size: int = 256) -> list[str]:
        self.model.eval()
        out: list[str] = []
        for s in range(0, len(emb), batch_size):
            x = torch.as_tensor(np.asarray(emb[s:s + batch_size], np.float32), device=self.cfg.device)
            seqs = _beam_search(self.model, x, self.cfg.beam, self.cfg.max_tokens, self.start, self.eos, self.pad)
            out.extend(self.decode_ids(row) for row in seqs.tolist())
        return out


def _beam_search(model: nn.Module, emb: torch.Tensor, beam: int, max_tokens: int, start: int, eos: int,
                 pad: int) -> torch.Tensor:
    """Best sequences (without the start marker); beam = 1 is greedy. Finished hypotheses keep their score."""
    b = len(emb)
    emb = emb.repeat_interleave(beam, 0)
    seq = torch.full((b * beam, 1), start, dtype=torch.long, device=emb.device)
    score = torch.zeros(b, beam, device=emb.device)
    score[:, 1:] = -math.inf  # all beams start identical: expand only the first
    done = torch.zeros(b * beam, dtype=torch.bool, device=emb.device)
    for _ in range(max_tokens):
        logp = torch.log_softmax(model(emb, seq)[:, -1].float(), -1)
        v = logp.shape[-1]
        logp[done] = -math.inf
        logp[done, pad] = 0.0  # a finished hypothesis only pads, at no cost
        total = (score.view(-1, 1) + logp).view(b, beam * v)
        score, flat = total.topk(beam, dim=1)
        origin = (flat // v) + torch.arange(b, device=emb.device)[:, None] * beam
        token = (flat % v).view(-1, 1)
        seq = torch.cat([seq[origin.view(-1)], token], 1)
        done = done[origin.view(-1)] | (token.view(-1) == eos) | (token.view(-1) == pad)
        if bool(done.all()):
            break
    best = score.argmax(1) + torch.arange(b, device=emb.device) * beam
    return seq[best, 1:]


def _teacher_forcing(ids: list[list[int]], start: int = BOS, eos: int = EOS, pad: int = PAD):
    """(inputs, targets, lengths): start w1..wn → w1..wn eos, padded; −100 marks padding in the targets."""
    length = max(len(t) for t in ids) + 1
    inp = torch.full((len(ids), length), pad, dtype=torch.long)
    tgt = torch.full((len(ids), length), -100, dtype=torch.long)
    for i, t in enumerate(ids):
        inp[i, : len(t) + 1] = torch.tensor([start] + t)
        tgt[i, : len(t) + 1] = torch.tensor(t + [eos])
    return inp, tgt, torch.tensor([len(t) + 1 for t in ids])


def _check_inputs(embeddings, captions) -> None:
    if len(embeddings) != len(captions):
        raise ConfigError(f"{len(embeddings)} embeddings for {len(captions)} captions")
    if len(captions) == 0:
        raise ConfigError("the caption decoder needs training captions")


def train_decoder(embeddings: np.ndarray, captions: list[str], cfg: DecoderConfig | None = None,
                  progress=None) -> TrainedDecoder:
    """Fit the decoder to reconstruct ``captions[i]`` from ``embeddings[i]`` (normalised text embeddings).

    With ``cfg.language_model`` (a local Hugging Face causal LM directory), ClipCap proper: the prefix goes in
    front of that model's token embeddings and both are fine-tuned.
    """
    cfg = cfg or DecoderConfig()
    _check_inputs(embeddings, captions)
    if cfg.language_model:
        from cmalign.evaluation.captioning.lm_decoder import train_lm_decoder

        return train_lm_decoder(embeddings, captions, cfg, progress)
    torch.manual_seed(cfg.seed)
    tokens = [tokenize(c)[: cfg.max_tokens] for c in captions]
    vocab = Vocabulary.build(tokens, cfg.max_vocab)
    emb = torch.as_tensor(np.asarray(embeddings, np.float32))
    model = PrefixDecoder(emb.shape[1], len(vocab), cfg).to(cfg.device)
    history = fit_decoder(model, [{"params": model.parameters(), "lr": cfg.lr}], emb,
                          _teacher_forcing([vocab.encode(t) for t in tokens]), cfg, progress)
    return TrainedDecoder(model, vocab.decode, len(vocab), cfg, history)


def fit_decoder(model: nn.Module, groups: list[dict], emb: torch.Tensor, teacher, cfg: DecoderConfig,
                progress=None) -> list[float]:
    """Teacher-forced cross-entropy with AdamW and a one-cycle schedule; the mean loss of each epoch."""
    inputs, targets, lengths = teacher
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(inputs) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups],
                                                total_steps=cfg.epochs * steps_per_epoch, pct_start=0.1)
    params = [p for g in opt.param_groups for p in g["params"]]
    history = []
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.as_tensor(rng.permutation(len(inputs)))
        losses = []
        for s in range(0, len(order), cfg.batch_size):
            batch = order[s:s + cfg.batch_size]
            width = int(lengths[batch].max())
            inp, tgt = inputs[batch, :width], targets[batch, :width]
            x = emb[batch]
            if cfg.noise_std > 0:
                x = x + cfg.noise_std * torch.randn_like(x)
            logits = model(x.to(cfg.device), inp.to(cfg.device))
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.to(cfg.device).view(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
        if progress:
            progress(epoch + 1, cfg.epochs)
    return history
