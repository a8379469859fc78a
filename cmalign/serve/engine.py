"""The served indexes: each a joint index, the export that encodes its queries, and a micro-batcher in front of
both. One batch is one onnxruntime call per kind of input (texts, images) and one faiss search per modality."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmalign.serve.batcher import Arrivals, MicroBatcher
from cmalign.serve.config import IndexEntry, ServeConfig
from cmalign.serve.inputs import BadInput
from cmalign.serve.metrics import ServiceMetrics


@dataclass
class Query:
    kind: str  # text | image | vector
    value: object  # str | (3, H, W) float32 pixels | (dim,) float32 unit vector
    k: int
    modality: str
    search: bool = True  # False: /v1/embed, the vector only (batched with the searches all the same)


class UnknownIndex(KeyError):
    def __init__(self, name: str, known: list[str]):
        super().__init__(name)
        self.name, self.known = name, known


class ServedIndex:
    def __init__(self, entry: IndexEntry, cfg: ServeConfig, metrics: ServiceMetrics, arrivals: Arrivals | None = None):
        from cmalign.export.runtime import NO_SPINNING
        from cmalign.index.searcher import Searcher

        self.name, self.metrics = entry.name, metrics
        # the event loop (HTTP, JSON, decoding) shares the cores with inference: no spinning between batches
        searcher = Searcher(entry.path, export=entry.export, provider=cfg.provider, gpu=cfg.gpu,
                            threads=cfg.threads, session_config=NO_SPINNING)
        self.index, self.model = searcher.index, searcher.model
        self.dim = self.index.dim
        self.batcher = MicroBatcher(self._run_batch, cfg.max_batch, cfg.max_wait_ms / 1000, cfg.queue_size,
                                    name=f"index {entry.name}", on_batch=metrics.observe_batch, arrivals=arrivals)

    def describe(self) -> dict:
        m = self.index.manifest
        return {"name": self.name, "path": str(self.index.path), "vectors": len(self.index),
                "images": self.index.count("image"), "texts": self.index.count("text"), "dim": self.dim,
                "factory": m.get("factory"), "export": m["export"].get("path"),
                "fingerprint": self.index.fingerprint, "variant": self.model.variant,
                "providers": self.model.providers}

    # -- the batch: runs in the batcher's worker thread -------------------------------------------------
    def _run_batch(self, queries: list[Query]) -> list:
        t0 = time.perf_counter()
        vectors = np.zeros((len(queries), self.dim), np.float32)
        texts = [i for i, q in enumerate(queries) if q.kind == "text"]
        images = [i for i, q in enumerate(queries) if q.kind == "image"]
        if texts:
            vectors[texts] = self.model.encode_texts([queries[i].value for i in texts])
        if images:
            vectors[images] = self.model.encode_pixels(np.stack([queries[i].value for i in images]))
        for i, q in enumerate(queries):
            if q.kind == "vector":
                vectors[i] = q.value
        t1 = time.perf_counter()
        if texts or images:
            self.metrics.observe_stage("encode", t1 - t0)
        out: list = [None if q.search else vectors[i].copy() for i, q in enumerate(queries)]
        for modality in {q.modality for q in queries if q.search}:
            rows = [i for i, q in enumerate(queries) if q.search and q.modality == modality]
            k = max(queries[i].k for i in rows)
            scores, ids = self.index.search(vectors[rows], k, modality)
            for j, i in enumerate(rows):
                out[i] = (scores[j, :queries[i].k], ids[j, :queries[i].k])
        self.metrics.observe_stage("search", time.perf_counter() - t1)
        return out

    async def search(self, query: Query):
        return await self.batcher.submit(query)

    def hits(self, result) -> list[dict]:
        t0 = time.perf_counter()
        scores, ids = result
        hits = [h.to_dict() for h in self.index.hits(scores[None], ids[None])[0]]
        self.metrics.observe_stage("metadata", time.perf_counter() - t0)
        return hits

    async def embed(self, kind: str, value) -> np.ndarray:
        """A text's or preprocessed image's vector, micro-batched with concurrent queries (and bounded by the
        same queue)."""
        return await self.batcher.submit(Query(kind, value, 0, "any", search=False))

    def vector_of(self, item_id: int, field: str = "id") -> np.ndarray:
        """The stored vector of an item ("more like this"); an index that cannot give vectors back says so."""
        if isinstance(item_id, bool) or not isinstance(item_id, int) or not 0 <= item_id < len(self.index):
            raise BadInput(field, f"expected an id in 0..{len(self.index) - 1}, got {item_id!r}")
        try:
            v = np.asarray(self.index.vectors([item_id])[0], np.float32)
        except RuntimeError:  # faiss: this kind of index keeps no reconstructable vectors
            raise BadInput(field, f"a {self.index.manifest.get('factory')} index cannot give its vectors back; "
                                  "search by text or image instead") from None
        n = float(np.linalg.norm(v))
        return v / n if n > 0 else v

    def row(self, item_id: int) -> dict:
        """An item's id-table row, as a search hit gives it (without rank, score and part)."""
        hit = self.index.hits(np.zeros((1, 1), np.float32), np.array([[item_id]]))[0][0].to_dict()
        return {k: v for k, v in hit.items() if k not in ("rank", "score", "part")}

    def image_path_of(self, item_id: int) -> str:
        """The image recorded for an item (an image row's own, a text row's paired image's)."""
        return str(self.index.ids.iloc[int(item_id)]["image_path"])

    def close(self) -> None:
        self.batcher.close()


class Engine:
    """Every served index, loaded at start; ``ready`` once all are."""

    def __init__(self, cfg: ServeConfig, metrics: ServiceMetrics | None = None):
        self.cfg = cfg
        self.metrics = metrics or ServiceMetrics()
        self.arrivals = Arrivals()  # counted by the app's middleware; the batchers wait only for these
        self.indexes: dict[str, ServedIndex] = {}
        self.ready = False

    def load(self, log=None) -> Engine:
        for entry in self.cfg.indexes:
            t0 = time.perf_counter()
            self.indexes[entry.name] = ServedIndex(entry, self.cfg, self.metrics, self.arrivals)
            if log:
                d = self.indexes[entry.name].describe()
                log(f"index {entry.name}: {d['vectors']:,} vectors ({d['images']:,} images, {d['texts']:,} texts), "
                    f"{d['factory']}, export {Path(str(d['export'])).name} {d['variant']} on {d['providers'][0]} "
                    f"({time.perf_counter() - t0:.1f} s)")
        self.ready = True
        return self

    def get(self, name: str | None) -> ServedIndex:
        if name is None:
            return next(iter(self.indexes.values()))
        if name not in self.indexes:
            raise UnknownIndex(name, list(self.indexes))
        return self.indexes[name]

    def queue_depth(self) -> int:
        return sum(i.batcher.depth for i in self.indexes.values())

    def close(self) -> None:
        self.ready = False
        for i in self.indexes.values():
            i.close()
