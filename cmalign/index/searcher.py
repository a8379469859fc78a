"""Query a joint index with text or images, encoded by the export that built it (ONNX runtime, no torch).

    from cmalign.index.searcher import Searcher
    searcher = Searcher("idx/corpus")                       # loads the index and its export
    hits = searcher.text("a red circle at the top", k=10, modality="image")[0]
    for h in hits: print(h.rank, h.score, h.modality, h.image_path, h.caption)

An index answers only queries from the model that embedded its corpus: a Searcher built with another
export is refused (fingerprints compared), never a silent garbage result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cmalign.errors import ConfigError, MissingInputError
from cmalign.export.manifest import MANIFEST as EXPORT_MANIFEST
from cmalign.export.runtime import ExportedModel
from cmalign.index.directory import MANIFEST
from cmalign.index.errors import ExportMismatchError
from cmalign.index.joint import Hit, JointIndex


@dataclass
class SearchConfig:
    index: str
    text: list[str] | None = None
    image: list[str] | None = None
    k: int = 10
    modality: str = "any"
    export: str | None = None  # default: the export recorded in the index manifest
    provider: str = "cpu"
    gpu: bool = False


class Searcher:
    """A joint index and the export that encodes its queries, checked to belong together."""

    def __init__(self, index_dir: str | Path, export: str | Path | None = None, provider: str = "cpu",
                 gpu: bool = False, threads: int | None = None, session_config: dict[str, str] | None = None):
        self.index = JointIndex(index_dir, gpu=gpu, threads=threads)
        recorded = self.index.manifest["export"]
        export = Path(export or recorded["path"] or "")
        if not (export / EXPORT_MANIFEST).is_file():
            raise MissingInputError(
                f"the export that built {index_dir} is not at {export} (recorded in "
                f"{self.index.path / MANIFEST}); pass its new location with --export")
        self.model = ExportedModel(export, provider=provider, variant=recorded.get("variant") or "fp32",
                                   threads=threads, session_config=session_config)
        if self.model.fingerprint != self.index.fingerprint:
            raise ExportMismatchError(
                f"export {export} (fingerprint {self.model.fingerprint}) is not the one that embedded the corpus of "
                f"{index_dir} ({recorded['path']}, fingerprint {self.index.fingerprint}): its query vectors would "
                "live in another space. Search with that export, or re-embed and re-index the corpus with this one")

    def vectors(self, vectors, k: int = 10, modality: str = "any") -> list[list[Hit]]:
        return self.index.hits(*self.index.search(vectors, k, modality))

    def text(self, texts: str | list[str], k: int = 10, modality: str = "any") -> list[list[Hit]]:
        return self.vectors(self.model.encode_texts(texts), k, modality)

    def image(self, images, k: int = 10, modality: str = "any") -> list[list[Hit]]:
        """``images``: a path, PIL image or uint8 array, or a list of them."""
        if not isinstance(images, list):
            images = [images]
        return self.vectors(self.model.encode_images(images), k, modality)


def search(cfg: SearchConfig) -> list[dict]:
    """One result block per query: {"query", "kind", "hits": [Hit as dict, ...]} (what `cmalign search` prints)."""
    if not cfg.text and not cfg.image:
        raise ConfigError("give at least one query: --text TEXT or --image PATH")
    searcher = Searcher(cfg.index, export=cfg.export, provider=cfg.provider, gpu=cfg.gpu)
    out = []
    for kind, queries in (("text", cfg.text or []), ("image", cfg.image or [])):
        if not queries:
            continue
        inputs = [_read_image(q) for q in queries] if kind == "image" else list(queries)
        results = getattr(searcher, kind)(inputs, cfg.k, cfg.modality)
        out.extend({"query": q, "kind": kind, "hits": [h.to_dict() for h in hits]}
                   for q, hits in zip(queries, results, strict=True))
    return out


def _read_image(path: str):
    """A query image decoded now, so a bad file is the user's error naming it, not a traceback mid-search."""
    from PIL import Image

    if not Path(path).is_file():
        raise MissingInputError(f"--image {path}: no such file")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL's errors for unreadable files
        raise ConfigError(f"--image {path}: not a readable image ({type(e).__name__}: {e})") from None
