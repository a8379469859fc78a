"""What both caption decoders share: teacher forcing, the training loop, beam search and the trained result.

The word-level prefix decoder (:mod:`.decoder`) and ClipCap on a pretrained language model (:mod:`.lm_decoder`)
differ only in the network and the vocabulary; both train and decode through this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cmalign.errors import ConfigError
from cmalign.evaluation.captioning.config import DecoderConfig


def check_inputs(embeddings, captions) -> None:
    if len(embeddings) != len(captions):
        raise ConfigError(f"{len(embeddings)} embeddings for {len(captions)} captions")
    if len(captions) == 0:
        raise ConfigError("the caption decoder needs training captions")


@dataclass
class TrainedDecoder:
    model: nn.Module  # forward(emb, tokens) -> next-token logits, tokens starting with a start marker
    decode_ids: Callable[[list[int]], str]
    vocabulary_size: int
    cfg: DecoderConfig
    history: list[float]  # mean training loss per epoch
    start: int  # the token that opens every sequence
    eos: int
    pad: int

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


def teacher_forcing(ids: list[list[int]], start: int, eos: int, pad: int):
    """(inputs, targets, lengths): start w1..wn → w1..wn eos, padded; −100 marks padding in the targets."""
    length = max(len(t) for t in ids) + 1
    inp = torch.full((len(ids), length), pad, dtype=torch.long)
    tgt = torch.full((len(ids), length), -100, dtype=torch.long)
    for i, t in enumerate(ids):
        inp[i, : len(t) + 1] = torch.tensor([start] + t)
        tgt[i, : len(t) + 1] = torch.tensor(t + [eos])
    return inp, tgt, torch.tensor([len(t) + 1 for t in ids])


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
