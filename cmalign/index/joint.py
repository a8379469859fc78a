"""The joint index as loaded for serving: one FAISS index over images and texts, searched with any modality
filter, its hits returned as rows of the id table (modality, pair, image path, caption).

    from cmalign.index import load_index
    index = load_index("idx/corpus")                 # the tuned search knobs are applied on load
    scores, ids = index.search(query_vectors, k=10, modality="image")
    hits = index.hits(scores, ids)

Torch-free (faiss, numpy, pandas). To search with text or images rather than vectors, use
:class:`cmalign.index.searcher.Searcher`, which encodes queries with the export that built the index.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cmalign.corpus.store import EmbeddingsError
from cmalign.errors import ConfigError
from cmalign.index.directory import IDS_FILE, MANIFEST, read_index_manifest, verify_checksums
from cmalign.index.errors import GpuUnavailableError, IndexFormatError
from cmalign.index.faiss_backend import check_gpu, import_faiss, to_gpu, unwrap
from cmalign.index.tuning import get_search_params, search_parameters, set_search_params, widen
from cmalign.index.vectors import clean_vectors

log = logging.getLogger("cmalign.index")

MODALITIES = ("any", "image", "text")
_HIT_COLUMNS = ("modality", "pair_id", "part", "image_path", "caption", "label")  # the id table's columns a Hit reads


@dataclass
class Hit:
    rank: int
    id: int
    score: float
    modality: str
    pair_id: int
    part: int
    image_path: str
    caption: str
    label: str | None

    def to_dict(self) -> dict:
        return asdict(self)


GPU_MAX_K = 2048  # faiss GPU indexes refuse k above this (GPU_MAX_SELECTION_K)


class JointIndex:
    """A loaded index directory: the FAISS index with its tuned knobs, the id table and the manifest."""

    def __init__(self, index_dir: str | Path, gpu: bool = False, threads: int | None = None):
        import pandas as pd

        self.path = Path(index_dir)
        self.manifest = read_index_manifest(self.path)
        faiss = self._faiss = import_faiss(threads)
        file = self.path / self.manifest["files"]["index"]
        if not file.is_file():
            raise IndexFormatError(f"{file}: missing (listed in {self.path / MANIFEST})")
        verify_checksums(self.path, self.manifest)
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if self.manifest.get("on_disk") else 0
        try:
            self.index = faiss.read_index(str(file), flags)
        except RuntimeError as e:  # faiss reports a damaged file as a RuntimeError from its C++ reader
            raise IndexFormatError(f"{file}: not a readable faiss index ({str(e).strip().splitlines()[-1]})") from None
        where = self.path / MANIFEST
        if self.index.d != int(self.manifest["dim"]):
            raise IndexFormatError(f"{where}, field 'dim': {self.manifest['dim']}, but {file.name} holds vectors of "
                                   f"dim {self.index.d}")
        ivf = unwrap(self.index, "ivf")
        nprobe = self.manifest.get("search_params", {}).get("nprobe", 1)
        if ivf is not None and nprobe > ivf.nlist:
            raise IndexFormatError(f"{where}, field 'search_params.nprobe': {nprobe}, but {file.name} has "
                                   f"{ivf.nlist} inverted lists to probe")
        try:
            set_search_params(self.index, self.manifest.get("search_params", {}))
        except RuntimeError as e:  # faiss: a knob this kind of index does not have
            raise IndexFormatError(f"{where}, field 'search_params': {self.manifest['search_params']} do not apply to "
                                   f"a {self.manifest['factory']} index ({str(e).strip().splitlines()[-1]})") from None
        ids_file = self.path / self.manifest["files"]["ids"]
        try:
            self.ids = pd.read_parquet(ids_file)
        except (OSError, ValueError) as e:  # missing, or not parquet (pyarrow's errors derive from these)
            raise IndexFormatError(f"{ids_file}: cannot read the id table ({e})") from None
        missing = [c for c in _HIT_COLUMNS if c not in self.ids.columns]
        if missing:
            raise IndexFormatError(f"{ids_file}: not an id table (columns {', '.join(missing)} missing)")
        if len(self.ids) != self.index.ntotal:
            raise IndexFormatError(f"{self.path}: {len(self.ids)} rows in {IDS_FILE} but {self.index.ntotal} vectors "
                                   f"in {file.name}; the directory was changed after it was written")
        self.dim = int(self.manifest["dim"])
        # a Hit's fields as plain arrays: a pandas row per hit (.iloc) cost ~45 µs, half of a served query's time
        self._hit_columns = {c: self.ids[c].to_numpy() for c in _HIT_COLUMNS}
        self._modality = self._hit_columns["modality"]
        self._bitmaps: dict[str, np.ndarray] = {}
        self.gpu_index = None
        if gpu:
            # The GPU copy (knobs copied by the cloner) serves unfiltered searches; faiss GPU indexes take no
            # IDSelector, so modality-filtered searches stay on the CPU index.
            check_gpu(faiss)
            self.gpu_index = to_gpu(faiss, self.index)
            if self.gpu_index is None:
                raise GpuUnavailableError(f"{self.manifest['factory']} has no faiss GPU version; search it on the CPU")

    @property
    def fingerprint(self) -> str:
        return self.manifest["export"]["fingerprint"]

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def count(self, modality: str = "any") -> int:
        return len(self) if modality == "any" else int((self._modality == modality).sum())

    def _selector(self, modality: str):
        if modality not in self._bitmaps:
            mask = self._modality == modality
            self._bitmaps[modality] = np.packbits(mask, bitorder="little")
        bitmap = self._bitmaps[modality]
        return self._faiss.IDSelectorBitmap(len(self._modality), self._faiss.swig_ptr(bitmap))

    def search(self, queries: np.ndarray, k: int = 10, modality: str = "any") -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k nearest items per query, of one modality or any; -1 ids only when fewer exist.
        A k larger than the index is cut to its size (the arrays are then that wide).

        Filtering runs inside faiss (an IDSelector), so a filtered search still returns k items of that modality.
        Approximate indexes can come back short under a filter (IVF lists or HNSW paths holding few such items):
        then the search widens (nprobe/efSearch doubled) until k are found or the knobs are at their limits, and
        the queries still short are answered by an exact scan over that modality's vectors as the index stores
        them. Fewer than ``min(k, count(modality))`` results come back only for an index that cannot give its
        vectors back (faiss cannot reconstruct it); :meth:`hits` callers see it as a short row.
        """
        if not isinstance(modality, str) or modality not in MODALITIES:
            raise ConfigError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ConfigError(f"k must be an integer, got {k!r}")
        k = int(k)
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        # No more than every item can come back: a larger k would only allocate -1 padding (k = 2**40: terabytes).
        k = min(k, max(len(self), 1))
        try:
            queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"queries must be an array of numbers, shape (n, {self.dim}) ({e})") from None
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ConfigError(f"queries must have shape (n, {self.dim}) (the index's dim), got {queries.shape}")
        try:
            queries, _ = clean_vectors(queries, "query")
        except EmbeddingsError as e:  # its advice (re-embed the shard) is for corpus files, not queries
            raise ConfigError(f"{str(e).split(';')[0]}; a query must be a finite, non-zero vector") from None
        if self.gpu_index is not None and modality == "any" and k <= GPU_MAX_K:
            return self.gpu_index.search(queries, k)  # a larger k goes to the CPU copy below
        available = self.count(modality)
        want = min(k, available)
        selector = self._selector(modality) if modality != "any" else None
        knobs = get_search_params(self.index)
        while True:
            params, _keep = search_parameters(self.index, selector, knobs)
            scores, ids = self.index.search(queries, k, params=params)
            short = (ids[:, :want] < 0).any(axis=1)
            if not short.any() or not widen(self.index, knobs):
                break
        if short.any() and modality != "any":
            exact = self._exact_scan(queries[short], k, modality)
            if exact is not None:
                scores[short], ids[short] = exact
        return scores, ids

    def _exact_scan(self, queries: np.ndarray, k: int, modality: str, block: int = 65536):
        """(scores, ids) of an exact inner-product scan over ``modality``'s stored vectors, in blocks (bounded
        memory); None when this index cannot reconstruct its vectors."""
        members = np.flatnonzero(self._modality == modality).astype(np.int64)
        best_s = np.full((len(queries), k), -np.inf, np.float32)
        best_i = np.full((len(queries), k), -1, np.int64)
        try:
            for start in range(0, len(members), block):
                ids = members[start:start + block]
                vectors = self.vectors(ids)
                s = queries @ vectors.T
                all_s = np.concatenate([best_s, s], 1)
                all_i = np.concatenate([best_i, np.broadcast_to(ids, s.shape)], 1)
                top = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
                best_s, best_i = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_i, top, 1)
        except RuntimeError as e:  # faiss: this index type stores no reconstructable vectors
            log.warning("filtered search came back short and %s cannot reconstruct its vectors (%s)",
                        self.manifest["factory"], str(e).strip().splitlines()[-1])
            return None
        best_i[~np.isfinite(best_s)] = -1
        return best_s, best_i

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` as the index holds them (approximate for PQ); faiss raises RuntimeError
        for an index type that keeps none."""
        ivf = unwrap(self.index, "ivf")
        if ivf is not None and not ivf.direct_map.type:
            ivf.make_direct_map()  # in memory only: lets IVF indexes give vectors back by id
        return self.index.reconstruct_batch(np.asarray(ids, np.int64))

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        """Search results as rows of the id table."""
        c = self._hit_columns
        out = []
        for s_row, i_row in zip(scores, ids, strict=True):
            hits = []
            for rank, (score, i) in enumerate(((s, i) for s, i in zip(s_row, i_row, strict=True) if i >= 0), 1):
                i = int(i)
                label = c["label"][i]
                hits.append(Hit(rank, i, float(score), c["modality"][i], int(c["pair_id"][i]), int(c["part"][i]),
                                c["image_path"][i], c["caption"][i], None if _missing(label) else str(label)))
            out.append(hits)
        return out

    def __repr__(self) -> str:
        return (f"JointIndex({str(self.path)!r}, {self.manifest['factory']!r}, n={len(self)}, "
                f"params={get_search_params(self.index)})")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def load_index(index_dir: str | Path, gpu: bool = False, threads: int | None = None) -> JointIndex:
    """Load an index directory written by `cmalign index` (see :class:`JointIndex`)."""
    return JointIndex(index_dir, gpu=gpu, threads=threads)
