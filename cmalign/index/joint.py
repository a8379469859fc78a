"""The joint image+text FAISS index: one index over both modalities, for mixed-modality search.

    IDX/index.faiss     one FAISS index, inner product over L2-normalised vectors; int64 ids 0..n-1 in the
                        order added: the embeddings in order (per shard its images, then its texts), except
                        the tuning sample, held out while the knobs are tuned and added last
    IDX/index.ivfdata   the inverted lists of an on-disk IVF index (``on_disk=True``), beside index.faiss
    IDX/ids.parquet     id → modality, pair_id, part, shard, row, image_path, caption, label, key, source
    IDX/manifest.json   the export that made the embeddings (fingerprint), the factory and why it was chosen,
                        the tuned search knobs and the recall they measured, the parts, versions

Torch-free (faiss, numpy, pandas). A joint index only makes sense when the modality gap is closed: with a
gap, text queries find texts first (see :mod:`cmalign.metrics.mixed`).

Unlike autofaiss this raises when a build fails (autofaiss logs and returns ``(None, None)``) and
normalises and checks every vector on the way in.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import cmalign
from cmalign.artifacts.atomic import atomic_dir, write_json
from cmalign.artifacts.manifests import read_manifest_file
from cmalign.corpus.store import (
    EmbeddingsError,
    checked_shard_manifests,
    iter_shards,
    read_merged_manifest,
    shard_paths,
)
from cmalign.errors import CmalignError, ConfigError, OutputExistsError
from cmalign.index.choice import (
    FLAT_MAX,
    HNSW_EF_CONSTRUCTION,
    HNSW_MAX,
    IndexChoiceError,
    choose_index,
    estimate_bytes,
    ivf_train_size,
    nlist_for,
    parse_memory,
    pq_m,
)
from cmalign.index.tuning import (
    RecallProbe,
    Tuning,
    get_search_params,
    sample_ids,
    search_parameters,
    set_search_params,
    tune,
    unwrap,
)

log = logging.getLogger(__name__)

KIND = "cmalign-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"
IDS_FILE = "ids.parquet"
MANIFEST = "manifest.json"
MODALITIES = ("any", "image", "text")
ID_COLUMNS = ("id", "modality", "pair_id", "part", "shard", "row", "image_path", "caption", "label", "key", "source")

Progress = Callable[[str, int, int], None]


class IndexBuildError(CmalignError, RuntimeError):
    """Building or extending an index failed; nothing was written in place of the old index."""


class IndexFormatError(CmalignError, ValueError):
    """An index directory is missing, incomplete, or of another kind."""


class ExportMismatchError(CmalignError, ValueError):
    """A query model (export) or new embeddings do not come from the export the index was built with."""


class GpuUnavailableError(CmalignError, RuntimeError):
    """``gpu=True`` but this faiss has no GPU support or sees no GPU."""


@dataclass
class IndexConfig:
    embeddings: str  # a merged `cmalign embed` directory
    out: str = "idx/corpus"
    factory: str = "auto"  # or any faiss index_factory string: "HNSW32", "IVF4096,PQ64", ...
    max_memory: str | None = None  # budget for `auto`, e.g. "8G"; default half the machine's memory
    recall_target: float = 0.95  # recall@k against exact search that the tuned knobs must reach
    k: int = 10
    tune_queries: int = 1000  # corpus vectors used as queries to tune and measure recall
    flat_max: int = FLAT_MAX
    hnsw_max: int = HNSW_MAX
    hnsw_ef_construction: int = HNSW_EF_CONSTRUCTION  # graph quality of HNSW builds (faiss' default is 40)
    on_disk: bool = False  # IVF only: one block per shard, merged into IDX/index.ivfdata (bounded memory)
    gpu: bool = False
    threads: int | None = None  # faiss OpenMP threads (default: all cores)
    seed: int = 0
    overwrite: bool = False


@dataclass
class IndexResult:
    out: Path
    manifest: dict
    seconds: float


# -- reading embeddings ---------------------------------------------------------------------------------

def clean_vectors(a: np.ndarray, where: str, rows: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """float32, L2-normalised; a non-finite or zero row is an error naming the file and row (``rows[i]`` is the
    row in ``where`` of ``a[i]`` when ``a`` holds selected rows).

    Returns the vectors and the largest |‖v‖ − 1| seen before normalising.
    """
    a = np.asarray(a, dtype=np.float32)
    row = (lambda i: int(rows[i])) if rows is not None else int
    finite = np.isfinite(a).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise EmbeddingsError(f"{where}: row {row(bad[0])} holds NaN or inf ({len(bad)} such rows); "
                              "re-embed the shard")
    norms = np.linalg.norm(a.astype(np.float64), axis=1)
    if len(norms) and norms.min() < 1e-6:
        raise EmbeddingsError(f"{where}: row {row(np.argmin(norms))} is a zero vector; it cannot be "
                              "normalised for inner-product search")
    deviation = float(np.abs(norms - 1).max()) if len(norms) else 0.0
    return np.ascontiguousarray(a / norms[:, None].astype(np.float32)), deviation


@dataclass
class _ShardRef:
    part: int  # which embeddings directory (in the order added to the CorpusVectors)
    index: int
    offset: int  # id of the shard's first image
    images: int
    texts: int
    paths: dict


class CorpusVectors:
    """The vectors of one or more embeddings directories, addressed by index id, read shard by shard.

    Keeps only the file list in memory (``blocks()`` reads one shard at a time; ``gather(ids)`` reads given rows
    through memory maps), so on-disk builds stay within a shard's memory.
    """

    def __init__(self):
        self.shards: list[_ShardRef] = []
        self.parts = 0
        self.n = 0
        self.max_norm_deviation = 0.0

    def add_dir(self, out: Path, manifest: dict) -> None:
        for i, rows in enumerate(_shard_rows(out, manifest)):
            self.shards.append(_ShardRef(self.parts, i, self.n, rows[0], rows[1], shard_paths(out, i)))
            self.n += rows[0] + rows[1]
        self.parts += 1

    def _read(self, ref: _ShardRef) -> np.ndarray:
        parts = []
        for kind in ("image", "text"):
            v, dev = clean_vectors(np.load(ref.paths[kind]), str(ref.paths[kind]))
            self.max_norm_deviation = max(self.max_norm_deviation, dev)
            parts.append(v)
        return np.concatenate(parts)

    def blocks(self):
        for ref in self.shards:
            yield ref.offset, self._read(ref)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        offsets = np.array([r.offset for r in self.shards])
        which = np.searchsorted(offsets, ids, side="right") - 1
        out = None
        for s in np.unique(which):
            ref = self.shards[s]
            mask = which == s
            local = ids[mask] - ref.offset
            v = None
            for kind, rows in (("image", local[local < ref.images]), ("text", local[local >= ref.images] - ref.images)):
                if not len(rows):
                    continue
                cleaned, _ = clean_vectors(np.load(ref.paths[kind], mmap_mode="r")[rows], str(ref.paths[kind]), rows)
                v = np.empty((len(local), cleaned.shape[1]), np.float32) if v is None else v
                v[local < ref.images if kind == "image" else local >= ref.images] = cleaned
            out = np.empty((len(ids), v.shape[1]), np.float32) if out is None else out
            out[mask] = v
        return out if out is not None else np.zeros((0, 0), np.float32)


def _shard_rows(out: Path, manifest: dict) -> list[tuple[int, int]]:
    """(images, texts) per shard as the shard manifests record them, checked to come from the merged export."""
    shards = checked_shard_manifests(out, manifest)
    return [(int(shards[i]["rows"]["images"]), int(shards[i]["rows"]["texts"])) for i in sorted(shards)]


def _read_id_table(out: Path, manifest: dict, part: int, first_id: int):
    """The id table of one embeddings directory; checks arrays against metadata (shapes, counts, dims)."""
    import pandas as pd

    frames, next_id = [], first_id
    for shard in iter_shards(out, manifest):
        meta = shard.metadata.copy()
        is_img = (meta["modality"] == "image").to_numpy()
        # metadata rows are image rows then text rows, as the arrays concatenate
        if not (is_img[: len(shard.image)].all() and not is_img[len(shard.image):].any()):
            raise EmbeddingsError(f"{shard.paths['metadata']}: rows are not image rows followed by text rows")
        meta.insert(0, "id", np.arange(next_id, next_id + len(meta), dtype=np.int64))
        meta["part"] = part
        meta["shard"] = shard.index
        frames.append(meta)
        next_id += len(meta)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(ID_COLUMNS))
    for col in ("part", "shard", "row", "pair_id"):
        table[col] = table[col].astype("int64")
    return table[list(ID_COLUMNS)]


def _export_of(manifest: dict) -> dict:
    return {"path": manifest.get("export"), "fingerprint": manifest.get("export_fingerprint"),
            "embed_dim": int(manifest["embed_dim"]), "variant": manifest.get("variant"), "model": manifest.get("model")}


# -- building -------------------------------------------------------------------------------------------

def _faiss(threads: int | None = None):
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)
    return faiss


def _check_gpu(faiss) -> int:
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n < 1:
        build = "with GPU support" if hasattr(faiss, "StandardGpuResources") else "without GPU support (faiss-cpu)"
        raise GpuUnavailableError(f"--gpu: this faiss ({faiss.__version__}) was built {build} and sees no GPU. "
                                  "Install the gpu extra (faiss-gpu, without faiss-cpu) on a CUDA machine, or drop "
                                  "--gpu")
    return n


def _to_gpu(faiss, index):
    """The index on all GPUs for training and adding, or None where faiss has no GPU version of it (HNSW)."""
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as e:  # e.g. HNSW: no GPU implementation
        log.warning("no GPU version of this index (%s); building on the CPU", e)
        return None


def _make_index(faiss, factory: str, d: int, ef_construction: int = HNSW_EF_CONSTRUCTION):
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise IndexBuildError(f"--factory {factory!r} is not a faiss index_factory string faiss accepts for dim {d}: "
                              f"{str(e).strip().splitlines()[-1]}") from e
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexBuildError(f"--factory {factory!r} builds an index that ignores the inner-product metric")
    if (hnsw := unwrap(index, "hnsw")) is not None:
        hnsw.hnsw.efConstruction = ef_construction
    return index


def _train(faiss, index, sample: np.ndarray, factory: str, gpu: bool):
    """The trained index (on a GPU build, the CPU copy of the index trained there)."""
    if index.is_trained:
        return index
    ivf = unwrap(index, "ivf")
    if ivf is not None and len(sample) < ivf.nlist:
        raise IndexBuildError(f"--factory {factory!r}: {ivf.nlist} IVF lists need at least {ivf.nlist} training "
                              f"vectors (39 per list for good centroids), the corpus gives {len(sample)}; use fewer "
                              f"lists (e.g. IVF{nlist_for(len(sample))}) or --factory auto")
    target = _to_gpu(faiss, index) if gpu else None
    try:
        (target or index).train(sample)
    except RuntimeError as e:
        raise IndexBuildError(f"training {factory!r} on {len(sample)} vectors failed: {e}") from e
    if target is not None:
        index = faiss.index_gpu_to_cpu(target)
    if not index.is_trained:
        raise IndexBuildError(f"training {factory!r} on {len(sample)} vectors left it untrained")
    return index


def _add(index, vectors: np.ndarray, first_id: int, progress: Progress | None, done: int, total: int,
         chunk: int = 65536) -> None:
    # Sequential adds: faiss gives every index type the ids ntotal, ntotal+1, ... — the id table's order.
    if index.ntotal != first_id:
        raise IndexBuildError(f"vectors for ids from {first_id} would be added to an index of {index.ntotal}")
    for start in range(0, len(vectors), chunk):
        block = vectors[start:start + chunk]
        try:
            index.add(block)
        except RuntimeError as e:
            raise IndexBuildError(f"adding vectors to the index failed: {e}") from e
        if progress:
            progress("adding", done + start + len(block), total)


def _training_sample(corpus: CorpusVectors, size: int, exclude: np.ndarray, seed: int) -> np.ndarray:
    """``size`` corpus vectors drawn uniformly, none of them a tuning query (those stay held out)."""
    pool = np.setdiff1d(np.arange(corpus.n), exclude)  # never empty: the probe takes at most a fifth
    ids = pool[sample_ids(len(pool), size, seed + 1)]
    return corpus.gather(ids)


def build_index(cfg: IndexConfig, progress: Progress | None = None) -> IndexResult:
    """Build a joint index from a merged embeddings directory; write IDX atomically (all files or none)."""
    t0 = time.time()
    faiss = _faiss(cfg.threads)
    emb_dir = Path(cfg.embeddings)
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it, or `cmalign index-add {out} EMB` to "
                              "add new embeddings to it")
    if not 0 < cfg.recall_target <= 1:
        raise ConfigError(f"recall target must be in (0, 1], got {cfg.recall_target}")
    if cfg.k < 1 or cfg.tune_queries < 1:
        raise ConfigError(f"-k and --tune-queries must be >= 1, got {cfg.k} and {cfg.tune_queries}")
    if cfg.gpu:
        _check_gpu(faiss)
    manifest = read_merged_manifest(emb_dir)
    ids = _read_id_table(emb_dir, manifest, part=0, first_id=0)
    corpus = CorpusVectors()
    corpus.add_dir(emb_dir, manifest)
    n, d = corpus.n, int(manifest["embed_dim"])
    if n == 0:
        raise EmbeddingsError(f"{emb_dir}: holds no embeddings (0 images, 0 texts); nothing to index")
    budget = parse_memory(cfg.max_memory)

    if cfg.factory == "auto" and cfg.on_disk:
        # the lists live on disk, so the memory budget does not bind; IVF-Flat keeps exact distances
        factory, reason = f"IVF{nlist_for(n)},Flat", "--on-disk: inverted lists on disk, exact distances"
    elif cfg.factory == "auto":
        try:
            choice = choose_index(n, d, budget, flat_max=cfg.flat_max, hnsw_max=cfg.hnsw_max)
        except IndexChoiceError as e:
            raise IndexBuildError(str(e)) from e
        factory, reason = choice.factory, choice.reason
    else:
        factory, reason = cfg.factory, "given with --factory"
    index = _make_index(faiss, factory, d, cfg.hnsw_ef_construction)
    if cfg.on_disk and (not isinstance(faiss.downcast_index(index), faiss.IndexIVF)
                        or isinstance(faiss.downcast_index(index), faiss.IndexIVFFastScan)):
        raise IndexBuildError(f"--on-disk needs a plain IVF index (e.g. IVF{nlist_for(n)},Flat or "
                              f"IVF{nlist_for(n)},PQ{pq_m(d)}; no pre-transform, refinement or fast-scan codes), "
                              f"not {factory!r}")

    probe = RecallProbe.held_out(corpus.blocks, corpus.gather, n, k=cfg.k, n_queries=cfg.tune_queries, seed=cfg.seed)
    ivf = unwrap(index, "ivf")
    train_size = 0
    if not index.is_trained:
        train_size = ivf_train_size(n, ivf.nlist) if ivf is not None else min(n, 100_000)
        if progress:
            progress("training", 0, 1)
        held = probe.positions if probe is not None else np.zeros(0, np.int64)
        index = _train(faiss, index, _training_sample(corpus, train_size, held, cfg.seed), factory, cfg.gpu)
        if progress:
            progress("training", 1, 1)

    with atomic_dir(out) as tmp:
        if cfg.on_disk:
            index, order, tuning = _build_on_disk(faiss, index, corpus, probe, cfg.recall_target, tmp, progress)
        else:
            target = _to_gpu(faiss, index) if cfg.gpu else None
            # GPU: add there, then tune and finish on the CPU copy that is saved (the knobs are the CPU index's)
            index, order, tuning = fill_and_tune(target or index, corpus, probe, cfg.recall_target, progress,
                                                 to_cpu=faiss.index_gpu_to_cpu if target is not None else None)
        if index.ntotal != n:
            raise IndexBuildError(f"the index holds {index.ntotal} vectors after adding {n}")
        ids = _reorder(ids, order, first_id=0)
        if not cfg.on_disk:
            faiss.write_index(index, str(tmp / INDEX_FILE))
        _write_ids(tmp / IDS_FILE, ids)
        result_manifest = {
            "kind": KIND, "format_version": FORMAT_VERSION, "cmalign_version": cmalign.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "export": _export_of(manifest),
            "factory": factory, "auto": cfg.factory == "auto", "reason": reason,
            "metric": "inner_product", "normalised": True, "dim": d,
            "ntotal": int(index.ntotal), "counts": _counts(ids),
            "memory": {"budget_bytes": budget, "estimate_bytes": estimate_bytes(factory, n, d)},
            "on_disk": cfg.on_disk, "files": {"index": INDEX_FILE, "ids": IDS_FILE} |
                                            ({"ivfdata": IVFDATA_FILE} if cfg.on_disk else {}),
            "search_params": tuning.params if tuning else {}, "recall": _recall_entry(tuning, probe),
            "parts": [_part(emb_dir, manifest, 0, 0, n)],
            "build": {"seconds": round(time.time() - t0, 2), "train_size": train_size, "gpu": cfg.gpu,
                      "threads": faiss.omp_get_max_threads(), "max_norm_deviation": corpus.max_norm_deviation},
            "settings": {k: v for k, v in asdict(cfg).items() if k not in ("embeddings", "out", "overwrite")},
            "versions": _versions(faiss),
        }
        write_json(tmp / MANIFEST, result_manifest)
    return IndexResult(out, result_manifest, time.time() - t0)


RECALL_PROTOCOL = ("a sample of the corpus held out as queries: kept out of IVF training and out of the index while "
                   "it is tuned, then added last; truth is exact inner-product top-k over the rest; tie-tolerant (a "
                   "hit scores at least the k-th exact score)")


def _recall_entry(tuning: Tuning | None, probe: RecallProbe | None) -> dict:
    if tuning is None or probe is None:
        return {"measured": False, "reason": "corpus too small to hold out tuning queries", "reached": True,
                "protocol": RECALL_PROTOCOL}
    return tuning.to_dict() | {"measured": True, "k": probe.k, "queries": len(probe.positions),
                               "protocol": RECALL_PROTOCOL}


class ArrayVectors:
    """An in-memory corpus with CorpusVectors' interface (for benchmarks and callers holding arrays)."""

    def __init__(self, vectors: np.ndarray, block: int = 100_000):
        self.vectors, self.n, self.block = vectors, len(vectors), block

    def blocks(self):
        for s in range(0, self.n, self.block):
            yield s, self.vectors[s:s + self.block]

    def gather(self, positions: np.ndarray) -> np.ndarray:
        return self.vectors[np.asarray(positions)]


def add_order(n: int, held_out: np.ndarray | None) -> np.ndarray:
    """Corpus positions in the order they are added (= their ids): the corpus in order, the held-out sample last."""
    if held_out is None or not len(held_out):
        return np.arange(n)
    keep = np.ones(n, bool)
    keep[held_out] = False
    return np.concatenate([np.flatnonzero(keep), np.asarray(held_out)])


def fill_and_tune(index, corpus, probe: RecallProbe | None, target: float, progress: Progress | None = None,
                  first_id: int = 0, position_offset: int = 0, gather_old=None, to_cpu=None):
    """Add ``corpus`` to a trained ``index`` (whose next id is ``first_id``), the probe's queries last: the rest
    first, then tune the search knobs on the probe (queries the index has not seen), then add them.

    ``probe.positions`` count from ``position_offset`` (the corpus's place in a larger one). Returns the index
    (``to_cpu(index)`` if given, applied before tuning: a GPU build), the add order (corpus positions, so
    id = first_id + i for order[i]) and the tuning (None without a probe). ``gather_old(ids)`` reads vectors
    of the ids below ``first_id`` (an index being extended).
    """
    held = None if probe is None else probe.positions - position_offset
    order = add_order(corpus.n, held)
    keep = np.ones(corpus.n, bool)
    if held is not None:
        keep[held] = False
    done = 0
    for offset, block in corpus.blocks():
        mask = keep[offset:offset + len(block)]
        _add(index, block[mask], first_id + done, progress, done, corpus.n)
        done += int(mask.sum())
    if to_cpu is not None:
        index = to_cpu(index)
    tuning = None
    if probe is not None:
        if progress:
            progress("tuning", 0, 1)

        def gather(ids):  # index id -> vector: this corpus by its add order, earlier ids through gather_old
            ids = np.asarray(ids, dtype=np.int64)
            new = ids >= first_id
            out = np.empty((len(ids), probe.queries.shape[1]), np.float32)
            if new.any():
                out[new] = corpus.gather(order[ids[new] - first_id])
            if not new.all():
                out[~new] = gather_old(ids[~new])
            return out

        tuning = tune(index, probe, gather, target)
        if progress:
            progress("tuning", 1, 1)
        _add(index, probe.queries, first_id + done, progress, done, corpus.n)
    return index, order, tuning


def _reorder(ids, order: np.ndarray, first_id: int):
    """The id table in add order, with ids first_id, first_id + 1, ..."""
    table = ids.iloc[order].reset_index(drop=True)
    table["id"] = np.arange(first_id, first_id + len(table), dtype=np.int64)
    return table


def _part(emb_dir: Path, manifest: dict, part: int, first_id: int, n: int) -> dict:
    return {"part": part, "embeddings": str(emb_dir.resolve()), "ids": [first_id, first_id + n],
            "rows": manifest.get("rows"), "num_shards": manifest.get("num_shards"),
            "added": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _counts(ids) -> dict:
    return {m: int((ids["modality"] == m).sum()) for m in ("image", "text")}


def _versions(faiss) -> dict:
    return {"faiss": faiss.__version__, "numpy": np.__version__, "cmalign": cmalign.__version__}


def _write_ids(path: Path, ids) -> None:
    ids.to_parquet(path, index=False)


def _build_on_disk(faiss, trained, corpus: CorpusVectors, probe: RecallProbe | None, target: float, tmp: Path,
                   progress: Progress | None):
    """FAISS's on-disk recipe (faiss/contrib/ondisk.py): one block index per shard, then merge the inverted lists
    into IDX/index.ivfdata. Memory holds one shard and the lists being merged, not the corpus. The held-out
    tuning queries get the last ids, as in :func:`fill_and_tune`, but are merged with the rest: tuning
    leaves them out with an IDSelector."""
    from faiss.contrib.ondisk import merge_ondisk

    held = probe.positions if probe is not None else None
    order = add_order(corpus.n, held)
    id_of = np.empty(corpus.n, np.int64)
    id_of[order] = np.arange(corpus.n)
    blocks_dir = tmp / "blocks"
    blocks_dir.mkdir()
    trained_bytes = faiss.serialize_index(trained)
    names, done = [], 0
    try:
        for i, (offset, block) in enumerate(corpus.blocks()):
            ivf = faiss.deserialize_index(trained_bytes)  # already downcast; a second wrapper would not own it
            ivf.add_with_ids(block, id_of[offset:offset + len(block)])
            name = str(blocks_dir / f"block_{i:04d}.index")
            faiss.write_index(ivf, name)
            names.append(name)
            done += len(block)
            if progress:
                progress("adding", done, corpus.n)
        index = faiss.deserialize_index(trained_bytes)
        merge_ondisk(index, names, str(tmp / IVFDATA_FILE))
    except RuntimeError as e:
        raise IndexBuildError(f"building the on-disk index failed: {e}") from e
    shutil.rmtree(blocks_dir)
    tuning = None
    if probe is not None:
        # The merged lists are read-only, so the held-out queries are in them (with the last ids); the tuning
        # searches leave those ids out. IVF centroids were trained without them, so this is the same as adding
        # them last.
        first_held = corpus.n - len(probe.positions)
        outside = faiss.IDSelectorNot(faiss.IDSelectorRange(first_held, corpus.n))
        tuning = tune(index, probe, lambda ids: corpus.gather(order[np.asarray(ids)]), target, selector=outside)
    faiss.write_index(index, str(tmp / INDEX_FILE))
    # Read it back the way search will, so the lists point at IDX/index.ivfdata wherever IDX ends up.
    return faiss.read_index(str(tmp / INDEX_FILE), faiss.IO_FLAG_ONDISK_SAME_DIR), order, tuning


# -- loading and searching ---------------------------------------------------------------------------------

def read_index_manifest(index_dir: str | Path) -> dict:
    d = Path(index_dir)
    path = d / MANIFEST
    if not d.is_dir():
        raise IndexFormatError(f"index directory not found: {d}")
    return read_manifest_file(path, KIND, IndexFormatError, f"is {d} a directory written by `cmalign index`?",
                              FORMAT_VERSION)


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


class JointIndex:
    """A loaded index directory: the FAISS index with its tuned knobs, the id table and the manifest."""

    def __init__(self, index_dir: str | Path, gpu: bool = False, threads: int | None = None):
        import pandas as pd

        self.path = Path(index_dir)
        self.manifest = read_index_manifest(self.path)
        faiss = self._faiss = _faiss(threads)
        file = self.path / self.manifest["files"]["index"]
        if not file.is_file():
            raise IndexFormatError(f"{file}: missing (listed in {self.path / MANIFEST})")
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if self.manifest.get("on_disk") else 0
        self.index = faiss.read_index(str(file), flags)
        set_search_params(self.index, self.manifest.get("search_params", {}))
        self.ids = pd.read_parquet(self.path / self.manifest["files"]["ids"])
        if len(self.ids) != self.index.ntotal:
            raise IndexFormatError(f"{self.path}: {len(self.ids)} rows in {IDS_FILE} but {self.index.ntotal} vectors "
                                   f"in {file.name}; the directory was changed after it was written")
        self.dim = int(self.manifest["dim"])
        self._modality = self.ids["modality"].to_numpy()
        self._bitmaps: dict[str, np.ndarray] = {}
        self.gpu_index = None
        if gpu:
            # The GPU copy (knobs copied by the cloner) serves unfiltered searches; faiss GPU indexes take no
            # IDSelector, so modality-filtered searches stay on the CPU index.
            _check_gpu(faiss)
            self.gpu_index = _to_gpu(faiss, self.index)
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

        Filtering runs inside faiss (an IDSelector), so a filtered search still returns k items of that modality.
        Approximate indexes can come back short under a filter (IVF lists or HNSW paths holding few such items):
        then the search widens (nprobe/efSearch doubled) until k are found or the knobs are at their limits.
        """
        if modality not in MODALITIES:
            raise ConfigError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
        queries, _ = clean_vectors(np.atleast_2d(queries), "query")
        if queries.shape[1] != self.dim:
            raise ConfigError(f"queries have dim {queries.shape[1]}, the index {self.dim}")
        k = int(k)
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        if self.gpu_index is not None and modality == "any":
            return self.gpu_index.search(queries, k)
        available = self.count(modality)
        want = min(k, available)
        selector = self._selector(modality) if modality != "any" else None
        knobs = get_search_params(self.index)
        while True:
            params, _keep = search_parameters(self.index, selector, knobs)
            scores, ids = self.index.search(queries, k, params=params)
            if not (ids[:, :want] < 0).any() or not _widen(self.index, knobs):
                return scores, ids

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        """Search results as rows of the id table."""
        rows = self.ids
        out = []
        for s_row, i_row in zip(scores, ids, strict=True):
            hits = []
            for rank, (score, i) in enumerate(((s, i) for s, i in zip(s_row, i_row, strict=True) if i >= 0), 1):
                r = rows.iloc[int(i)]
                hits.append(Hit(rank, int(i), float(score), r["modality"], int(r["pair_id"]), int(r["part"]),
                                r["image_path"], r["caption"], None if _missing(r["label"]) else str(r["label"])))
            out.append(hits)
        return out

    def __repr__(self) -> str:
        return (f"JointIndex({str(self.path)!r}, {self.manifest['factory']!r}, n={len(self)}, "
                f"params={get_search_params(self.index)})")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _widen(index, knobs: dict) -> bool:
    """Double the search knobs of ``knobs`` (for this search's parameters only; the index is not touched);
    False once nothing can grow."""
    ivf, hnsw = unwrap(index, "ivf"), unwrap(index, "hnsw")
    grown = False
    if ivf is not None and knobs.get("nprobe", ivf.nlist) < ivf.nlist:
        knobs["nprobe"] = min(ivf.nlist, knobs["nprobe"] * 2)
        grown = True
    if hnsw is not None and knobs.get("efSearch", 4096) < 4096:
        knobs["efSearch"] = min(4096, knobs["efSearch"] * 2)
        grown = True
    return grown


def load_index(index_dir: str | Path, gpu: bool = False, threads: int | None = None) -> JointIndex:
    return JointIndex(index_dir, gpu=gpu, threads=threads)


# -- adding -------------------------------------------------------------------------------------------------

def add_to_index(index_dir: str | Path, embeddings: str | Path, retune: bool = True,
                 progress: Progress | None = None) -> IndexResult:
    """Add a merged embeddings directory (new data, same export) to an existing index without rebuilding it.

    The new ids follow the existing ones. The index directory is replaced only once the larger index is
    written, so a failure leaves the old one as it was. With ``retune`` the search knobs are re-tuned on the
    grown corpus (read back from every part's embeddings directory).
    """
    t0 = time.time()
    faiss = _faiss()
    index_dir, emb_dir = Path(index_dir), Path(embeddings)
    manifest = read_index_manifest(index_dir)
    if manifest.get("on_disk"):
        raise IndexBuildError(f"{index_dir} is an on-disk index, whose merged lists are read-only: rebuild it with "
                              "every embeddings shard (`cmalign index ... --on-disk --overwrite`)")
    new_manifest = read_merged_manifest(emb_dir)
    if new_manifest.get("export_fingerprint") != manifest["export"]["fingerprint"]:
        raise ExportMismatchError(
            f"{emb_dir} was embedded with export {new_manifest.get('export')} (fingerprint "
            f"{new_manifest.get('export_fingerprint')}), the index {index_dir} with {manifest['export']['path']} "
            f"({manifest['export']['fingerprint']}); vectors of two models cannot share an index. Re-embed {emb_dir} "
            f"with {manifest['export']['path']}")
    if int(new_manifest["embed_dim"]) != int(manifest["dim"]):
        raise ExportMismatchError(f"{emb_dir}: dim {new_manifest['embed_dim']}, the index {manifest['dim']}")
    resolved = str(emb_dir.resolve())
    if any(p["embeddings"] == resolved for p in manifest["parts"]):
        raise IndexBuildError(f"{emb_dir} is already in {index_dir} (part "
                              f"{next(p['part'] for p in manifest['parts'] if p['embeddings'] == resolved)})")
    loaded = JointIndex(index_dir)
    index, old_ids = loaded.index, loaded.ids
    first = int(index.ntotal)
    part = len(manifest["parts"])
    new_ids = _read_id_table(emb_dir, new_manifest, part=part, first_id=first)
    corpus = CorpusVectors()
    corpus.add_dir(emb_dir, new_manifest)
    if corpus.n == 0:
        raise EmbeddingsError(f"{emb_dir}: holds no embeddings; nothing to add")
    if not index.is_trained:  # pragma: no cover - every written index is trained
        raise IndexBuildError(f"{index_dir}: the index is not trained")

    # Re-tuning needs every earlier part's vectors (truth is exact search over all); the held-out queries are
    # drawn from the new part, which is what an index that grows sees next.
    combined = _all_parts(manifest["parts"], manifest["export"]["fingerprint"]) if retune else None
    probe, gather_old, old_n = None, None, 0
    if combined is not None:
        old_n = combined.n
        combined.add_dir(emb_dir, new_manifest)
        settings = manifest.get("settings", {})
        probe = RecallProbe.held_out(combined.blocks, combined.gather, combined.n, k=settings.get("k", 10),
                                     n_queries=settings.get("tune_queries", 1000), seed=settings.get("seed", 0) + part,
                                     candidates=np.arange(old_n, combined.n))
        position_of_id = _positions(old_ids, combined)
        gather_old = lambda ids: combined.gather(position_of_id[np.asarray(ids)])  # noqa: E731
    target = manifest["recall"].get("target", manifest.get("settings", {}).get("recall_target", 0.95))
    index, order, tuning = fill_and_tune(index, corpus, probe, target, progress,
                                         first_id=first, position_offset=old_n,
                                         gather_old=gather_old)
    if index.ntotal != first + corpus.n:
        raise IndexBuildError(f"the index holds {index.ntotal} vectors after adding {corpus.n} to {first}")

    import pandas as pd

    ids = pd.concat([old_ids, _reorder(new_ids, order, first)], ignore_index=True)
    new = dict(manifest)
    new["parts"] = manifest["parts"] + [_part(emb_dir, new_manifest, part, first, corpus.n)]
    new["ntotal"], new["counts"] = int(index.ntotal), _counts(ids)
    new["memory"] = dict(manifest["memory"], estimate_bytes=estimate_bytes(manifest["factory"], int(index.ntotal),
                                                                             int(manifest["dim"])))
    new["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if tuning is not None:
        new["search_params"] = tuning.params
        new["recall"] = _recall_entry(tuning, probe) | {"after_add": part}
    else:
        why = ("--no-retune" if not retune else
               "an earlier part's embeddings directory is gone or changed" if combined is None else
               "the new part is too small to hold out queries")
        new["recall"] = dict(manifest["recall"], stale=f"not re-measured after adding part {part} ({why})")
    with atomic_dir(index_dir) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        _write_ids(tmp / IDS_FILE, ids)
        write_json(tmp / MANIFEST, new)
    return IndexResult(index_dir, new, time.time() - t0)


def _positions(ids, corpus: CorpusVectors) -> np.ndarray:
    """Corpus position (in ``corpus``, all parts in order) of every id of an id table (whose parts ``corpus``
    holds, first among its parts)."""
    starts = {(ref.part, ref.index): ref.offset for ref in corpus.shards}
    images = {(ref.part, ref.index): ref.images for ref in corpus.shards}
    keys = list(zip(ids["part"].tolist(), ids["shard"].tolist(), strict=True))
    offset = np.array([starts[k] for k in keys], np.int64)
    n_img = np.array([images[k] for k in keys], np.int64)
    row = ids["row"].to_numpy(np.int64)
    is_text = (ids["modality"] == "text").to_numpy()
    return offset + np.where(is_text, n_img + row, row)


def _all_parts(parts: list[dict], fingerprint: str) -> CorpusVectors | None:
    """The vectors of every part, if each embeddings directory is still there as it was indexed (same export,
    same row counts); None otherwise."""
    corpus = CorpusVectors()
    for p in parts:
        d = Path(p["embeddings"])
        try:
            manifest = read_merged_manifest(d)
        except (EmbeddingsError, OSError):
            return None
        if manifest.get("export_fingerprint") != fingerprint or manifest.get("rows") != p.get("rows"):
            return None
        corpus.add_dir(d, manifest)
    return corpus


__all__ = ["IndexConfig", "IndexResult", "JointIndex", "Hit", "build_index", "add_to_index", "load_index",
           "read_index_manifest", "IndexBuildError", "IndexFormatError", "ExportMismatchError", "GpuUnavailableError"]
