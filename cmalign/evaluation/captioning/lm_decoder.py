"""ClipCap with a pretrained causal language model (GPT-2 or any Hugging Face `AutoModelForCausalLM`) from a
local directory: for real data, where a from-scratch word decoder is too weak a language model.

Weights are never downloaded (``local_files_only``): point ``DecoderConfig.language_model`` at a directory saved
with ``save_pretrained`` (model and tokenizer). Needs the ``lm`` extra (``transformers``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cmalign.errors import ConfigError, MissingDependencyError, MissingInputError
from cmalign.evaluation.captioning.config import DecoderConfig
from cmalign.evaluation.captioning.training import TrainedDecoder, fit_decoder, teacher_forcing


class LanguageModelPrefix(nn.Module):
    """Prefix vectors from the embedding, in front of the LM's token embeddings.

    ``tokens[:, 0]`` is a start marker that is not fed: the last prefix vector predicts the first word, as in
    ClipCap, so ``forward`` has :class:`~cmalign.evaluation.captioning.decoder.PrefixDecoder`'s interface.
    """

    def __init__(self, lm, embed_dim: int, prefix_length: int):
        super().__init__()
        self.lm = lm
        self.prefix_length = prefix_length
        hidden = lm.get_input_embeddings().embedding_dim
        self.embed_scale = math.sqrt(embed_dim)
        self.prefix = nn.Sequential(nn.Linear(embed_dim, hidden * prefix_length // 2), nn.Tanh(),
                                    nn.Linear(hidden * prefix_length // 2, hidden * prefix_length))

    def forward(self, emb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        p = self.prefix_length
        prefix = self.prefix(emb * self.embed_scale).view(len(emb), p, -1)
        h = torch.cat([prefix, self.lm.get_input_embeddings()(tokens[:, 1:])], 1)
        return self.lm(inputs_embeds=h).logits[:, p - 1:]


def load_language_model(path: str):
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise MissingDependencyError(
            "a language-model caption decoder needs transformers: pip install 'cmalign[lm]'") from e
    if not Path(path).is_dir():
        raise MissingInputError(f"language model directory not found: {path} (a local save_pretrained directory; "
                                "nothing is downloaded)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{path}: the tokenizer has no end-of-sequence token")
    return lm, tokenizer


def train_lm_decoder(embeddings: np.ndarray, captions: list[str], cfg: DecoderConfig, progress=None) -> TrainedDecoder:
    torch.manual_seed(cfg.seed)
    lm, tokenizer = load_language_model(cfg.language_model)
    eos = tokenizer.eos_token_id
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"][: cfg.max_tokens] for c in captions]
    emb = torch.as_tensor(np.asarray(embeddings, np.float32))
    model = LanguageModelPrefix(lm, emb.shape[1], cfg.prefix_length).to(cfg.device)
    groups = [{"params": model.prefix.parameters(), "lr": cfg.lr},
              {"params": model.lm.parameters(), "lr": cfg.language_model_lr}]
    history = fit_decoder(model, groups, emb, teacher_forcing(ids, start=eos, eos=eos, pad=eos), cfg, progress)

    def decode(row: list[int]) -> str:
        row = row[: row.index(eos)] if eos in row else row
        return tokenizer.decode(row, skip_special_tokens=True).strip()

    return TrainedDecoder(model, decode, len(tokenizer), cfg, history, start=eos, eos=eos, pad=eos)
