"""What eval embeds with: a fit run, an ONNX export, or an open_clip model — one interface for all three.

An export is evaluated through the production runtime (onnxruntime, the export's own tokenizer and preprocessing),
so the figures are those a service built on it would see.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmalign.artifacts.sources import EXPORT, RUN, Source, resolve_source
from cmalign.data.records import Record, load_image
from cmalign.metrics.vectors import l2_normalize


def run_start_model(run: Source) -> tuple[str, str | None] | None:
    """(model, pretrained) a run started from, when those weights are on this machine (else None)."""
    name, pretrained = run.manifest.get("model"), run.manifest.get("pretrained")
    if not name:
        return None
    if pretrained and not Path(pretrained).is_file():
        return None  # a hub tag or a checkpoint that moved: not loadable offline
    return name, pretrained


class TorchEncoder:
    """An open_clip model in torch (fp32, eval mode)."""

    def __init__(self, name: str, pretrained: str | None, label: str, device: str = "auto", batch_size: int = 128,
                 description: dict | None = None):
        import torch

        from cmalign.model.loading import load_model

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.loaded = load_model(name, pretrained, device=device)
        self.loaded.model.eval()
        self.label = label
        self.batch_size = batch_size
        self.description = {"kind": "open_clip", "model": name, "pretrained": pretrained, "device": device,
                            **(description or {})}

    def encode_images(self, records: list[Record]) -> np.ndarray:
        from cmalign.model.encode import encode_images

        if not records:
            return np.zeros((0, self.dim), np.float32)
        return encode_images(self.loaded.model, records, self.loaded.preprocess_val, self.device, self.batch_size)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        from cmalign.model.encode import encode_texts

        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return encode_texts(self.loaded.model, texts, self.loaded.tokenizer, self.device, 4 * self.batch_size)

    @property
    def dim(self) -> int:
        return int(self.loaded.model_cfg["embed_dim"])


class OnnxEncoder:
    """An export directory through onnxruntime."""

    def __init__(self, export_dir: str | Path, label: str, provider: str = "cpu", variant: str = "fp32",
                 batch_size: int = 128):
        from cmalign.export.runtime import load_export

        self.model = load_export(export_dir, provider=provider, variant=variant)
        self.label = label
        self.batch_size = batch_size
        self.description = {"kind": "onnx-export", "path": str(export_dir), "variant": variant,
                            "providers": list(self.model.providers), "fingerprint": self.model.fingerprint,
                            "source": self.model.manifest.get("source")}

    def encode_images(self, records: list[Record]) -> np.ndarray:
        return l2_normalize(self.model.encode_images([load_image(r) for r in records], batch_size=self.batch_size))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return l2_normalize(self.model.encode_texts(texts, batch_size=4 * self.batch_size))


def open_source(path: str, label: str, device: str = "auto", provider: str = "cpu", variant: str = "fp32",
                batch_size: int = 128):
    """An encoder for a run, export or open_clip model directory."""
    source = resolve_source(path)
    if source.kind == EXPORT:
        return OnnxEncoder(str(source.path), label, provider=provider, variant=variant, batch_size=batch_size)
    description = {"source": str(path), "source_kind": source.kind}
    if source.kind == RUN:
        description.update({k: source.manifest.get(k) for k in ("alpha_target", "config_hash", "steps")})
    return TorchEncoder(source.open_clip_name, None, label, device=device, batch_size=batch_size,
                        description=description)
