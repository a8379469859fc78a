"""The caption decoder's settings, apart from the torch code, so the CLI can show their defaults without torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class DecoderConfig:
    prefix_length: int = 4
    width: int = 128
    layers: int = 2
    heads: int = 4
    max_tokens: int = 30  # longer captions are truncated
    max_vocab: int = 10000  # most frequent training words; the rest become <unk>
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    dropout: float = 0.1
    noise_std: float = 0.0  # Gaussian noise on training embeddings (CapDec); 0 keeps the protocol's pure setting
    beam: int = 1  # 1 = greedy
    language_model: str | None = None  # a local Hugging Face causal LM directory (e.g. GPT-2): ClipCap proper
    language_model_lr: float = 5e-5
    seed: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)
