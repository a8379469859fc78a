"""What eval embeds with: a fit run, an ONNX export, or an open_clip model — one interface for all three.

An export is evaluated through the production runtime (onnxruntime, the export's own tokenizer and preprocessing),
so the figures are those a service built on it would see.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cmalign.artifacts.manifests import read_json_object
from cmalign.data.records import Record, load_image
from cmalign.errors import CmalignError


class SourceError(CmalignError, ValueError):
    """A source directory is not a run, an export or an open_clip model directory."""


def source_kind(path: str | Path) -> str:
    """'run', 'export' or 'model' (an open_clip local-dir)."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{p}: no such directory")
    manifest = p / "manifest.json"
    if manifest.is_file():
        kind = read_json_object(manifest, SourceError).get("kind")
        if kind == "cmalign-run":
            if not (p / "model" / "open_clip_config.json").is_file():
                raise SourceError(f"{p}: a run without a final model (RUN/model); did the fit finish?")
            return "run"
        if kind == "cmalign-export":
            return "export"
    if (p / "open_clip_config.json").is_file():
        return "model"
    raise SourceError(f"{p}: not a cmalign run (manifest.json of kind cmalign-run), an export (kind "
                      "cmalign-export) or an open_clip model directory (open_clip_config.json)")


def run_start_model(run_dir: str | Path) -> tuple[str, str | None] | None:
    """(model, pretrained) a run started from, when those weights are on this machine (else None)."""
    m = json.loads((Path(run_dir) / "manifest.json").read_text())
    name, pretrained = m.get("model"), m.get("pretrained")
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
        import torch

        out = []
        with torch.no_grad():
            for s in range(0, len(records), self.batch_size):
                pix = torch.stack([self.loaded.preprocess_val(load_image(r)) for r in records[s:s + self.batch_size]])
                out.append(self.loaded.model.encode_image(pix.to(self.device), normalize=True).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for s in range(0, len(texts), 4 * self.batch_size):
                tok = self.loaded.tokenizer(texts[s:s + 4 * self.batch_size]).to(self.device)
                out.append(self.loaded.model.encode_text(tok, normalize=True).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

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
        return _normalised(self.model.encode_images([load_image(r) for r in records], batch_size=self.batch_size))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return _normalised(self.model.encode_texts(texts, batch_size=4 * self.batch_size))


def _normalised(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def open_source(path: str, label: str, device: str = "auto", provider: str = "cpu", variant: str = "fp32",
                batch_size: int = 128):
    """An encoder for a run, export or open_clip model directory."""
    kind = source_kind(path)
    if kind == "export":
        return OnnxEncoder(path, label, provider=provider, variant=variant, batch_size=batch_size)
    model_dir = Path(path) / "model" if kind == "run" else Path(path)
    description = {"source": str(path), "source_kind": kind}
    if kind == "run":
        m = json.loads((Path(path) / "manifest.json").read_text())
        description.update({k: m.get(k) for k in ("alpha_target", "config_hash", "steps")})
    return TorchEncoder(f"local-dir:{model_dir}", None, label, device=device, batch_size=batch_size,
                        description=description)
