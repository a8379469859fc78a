"""`cmalign index`: build one FAISS index over the images *and* texts of an embeddings directory, tuned for a
recall target and written atomically (all files or none; see :mod:`cmalign.index.directory` for the layout).

The steps: choose the factory (:mod:`cmalign.index.choice` for ``auto``), hold a sample of the corpus out as
tuning queries (:class:`cmalign.index.tuning.RecallProbe`), train on other vectors, add the corpus shard by
shard, tune the search knobs on the held-out queries, then add those last. :func:`fill_and_tune` does the
last three for `cmalign index-add` too. ``on_disk`` follows faiss' on-disk recipe instead: one block per
shard, inverted lists merged into IDX/index.ivfdata.

Unlike autofaiss this raises when a build fails (autofaiss logs and returns ``(None, None)``). Torch-free
(faiss, numpy, pandas). A joint index only makes sense when the modality gap is closed: with a gap, text
queries find texts first (see :mod:`cmalign.metrics.mixed`).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import cmalign
from cmalign.artifacts.atomic import atomic_dir, write_json
from cmalign.artifacts.outputs import check_output
from cmalign.corpus.store import EmbeddingsError, read_merged_manifest
from cmalign.errors import ConfigError
from cmalign.index.choice import (
    FLAT_MAX,
    HNSW_EF_CONSTRUCTION,
    HNSW_MAX,
    choose_index,
    estimate_bytes,
    ivf_train_size,
    nlist_for,
    parse_memory,
    pq_m,
)
from cmalign.index.directory import (
    FORMAT_VERSION,
    IDS_FILE,
    INDEX_FILE,
    IVFDATA_FILE,
    KIND,
    MANIFEST,
    checksums,
    counts,
    export_entry,
    part_entry,
    write_ids,
)
from cmalign.index.errors import IndexBuildError, IndexChoiceError
from cmalign.index.faiss_backend import check_gpu, import_faiss, to_gpu, unwrap, versions
from cmalign.index.tuning import RecallProbe, recall_entry, sample_ids, tune
from cmalign.index.vectors import CorpusVectors, in_add_order, read_part

Progress = Callable[[str, int, int], None]  # (stage, done, total)


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


def build_index(cfg: IndexConfig, progress: Progress | None = None) -> IndexResult:
    """Build a joint index from a merged embeddings directory; write IDX atomically (all files or none)."""
    t0 = time.time()
    faiss = import_faiss(cfg.threads)
    emb_dir = Path(cfg.embeddings)
    out = Path(cfg.out)
    check_output(out, KIND, inputs=[emb_dir], overwrite=cfg.overwrite,
                 exists_hint=f", or `cmalign index-add {out} EMB` to add new embeddings to it")
    if not 0 < cfg.recall_target <= 1:
        raise ConfigError(f"recall target must be in (0, 1], got {cfg.recall_target}")
    if cfg.k < 1 or cfg.tune_queries < 1:
        raise ConfigError(f"-k and --tune-queries must be >= 1, got {cfg.k} and {cfg.tune_queries}")
    if cfg.gpu:
        check_gpu(faiss)
    manifest = read_merged_manifest(emb_dir)
    ids, corpus = read_part(emb_dir, manifest)
    n, d = corpus.n, int(manifest["embed_dim"])
    if n == 0:
        raise EmbeddingsError(f"{emb_dir}: holds no embeddings (0 images, 0 texts); nothing to index")
    budget = parse_memory(cfg.max_memory)
    factory, reason = _factory(cfg, n, d, budget)
    index = make_index(faiss, factory, d, cfg.hnsw_ef_construction)
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

    gpu_used = False  # --gpu falls back to the CPU for indexes faiss has no GPU version of (HNSW): say which ran
    with atomic_dir(out) as tmp:
        if cfg.on_disk:
            index, order, tuning = _build_on_disk(faiss, index, corpus, probe, cfg.recall_target, tmp, progress)
        else:
            target = to_gpu(faiss, index) if cfg.gpu else None
            gpu_used = target is not None
            # GPU: add there, then tune and finish on the CPU copy that is saved (the knobs are the CPU index's)
            index, order, tuning = fill_and_tune(target or index, corpus, probe, cfg.recall_target, progress,
                                                 to_cpu=faiss.index_gpu_to_cpu if target is not None else None)
        if index.ntotal != n:
            raise IndexBuildError(f"the index holds {index.ntotal} vectors after adding {n}")
        ids = in_add_order(ids, order, first_id=0)
        if not cfg.on_disk:
            faiss.write_index(index, str(tmp / INDEX_FILE))
        write_ids(tmp / IDS_FILE, ids)
        result_manifest = {
            "kind": KIND, "format_version": FORMAT_VERSION, "cmalign_version": cmalign.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "export": export_entry(manifest),
            "factory": factory, "auto": cfg.factory == "auto", "reason": reason,
            "metric": "inner_product", "normalised": True, "dim": d,
            "ntotal": int(index.ntotal), "counts": counts(ids),
            "memory": {"budget_bytes": budget, "estimate_bytes": estimate_bytes(factory, n, d)},
            "on_disk": cfg.on_disk, "files": {"index": INDEX_FILE, "ids": IDS_FILE} |
                                            ({"ivfdata": IVFDATA_FILE} if cfg.on_disk else {}),
            "search_params": tuning.params if tuning else {}, "recall": recall_entry(tuning, probe),
            "parts": [part_entry(emb_dir, manifest, 0, 0, n)],
            "build": {"seconds": round(time.time() - t0, 2), "train_size": train_size, "gpu": gpu_used,
                      "gpu_requested": cfg.gpu,
                      "threads": faiss.omp_get_max_threads(), "max_norm_deviation": corpus.max_norm_deviation},
            "settings": {k: v for k, v in asdict(cfg).items() if k not in ("embeddings", "out", "overwrite")},
            "versions": versions(faiss),
        }
        result_manifest["checksums"] = checksums(tmp, result_manifest["files"])
        write_json(tmp / MANIFEST, result_manifest)
    return IndexResult(out, result_manifest, time.time() - t0)


def _factory(cfg: IndexConfig, n: int, d: int, budget: int) -> tuple[str, str]:
    """The factory string to build and why (recorded in the manifest)."""
    if cfg.factory == "auto" and cfg.on_disk:
        # the lists live on disk, so the memory budget does not bind; IVF-Flat keeps exact distances
        return f"IVF{nlist_for(n)},Flat", "--on-disk: inverted lists on disk, exact distances"
    if cfg.factory == "auto":
        try:
            choice = choose_index(n, d, budget, flat_max=cfg.flat_max, hnsw_max=cfg.hnsw_max)
        except IndexChoiceError as e:
            raise IndexBuildError(str(e)) from e
        return choice.factory, choice.reason
    return cfg.factory, "given with --factory"


def make_index(faiss, factory: str, d: int, ef_construction: int = HNSW_EF_CONSTRUCTION):
    """An empty inner-product index from a factory string, HNSW graphs built with ``ef_construction``."""
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
    target = to_gpu(faiss, index) if gpu else None
    try:
        (target or index).train(sample)
    except RuntimeError as e:
        raise IndexBuildError(f"training {factory!r} on {len(sample)} vectors failed: {e}") from e
    if target is not None:
        index = faiss.index_gpu_to_cpu(target)
    if not index.is_trained:
        raise IndexBuildError(f"training {factory!r} on {len(sample)} vectors left it untrained")
    return index


def _training_sample(corpus: CorpusVectors, size: int, exclude: np.ndarray, seed: int) -> np.ndarray:
    """``size`` corpus vectors drawn uniformly, none of them a tuning query (those stay held out)."""
    pool = np.setdiff1d(np.arange(corpus.n), exclude)  # never empty: the probe takes at most a fifth
    ids = pool[sample_ids(len(pool), size, seed + 1)]
    return corpus.gather(ids)


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


def _held_out_mask(n: int, held_out: np.ndarray | None) -> np.ndarray:
    keep = np.ones(n, bool)
    if held_out is not None:
        keep[held_out] = False
    return keep


def add_order(n: int, held_out: np.ndarray | None) -> np.ndarray:
    """Corpus positions in the order they are added (= their ids): the corpus in order, the held-out sample last."""
    if held_out is None or not len(held_out):
        return np.arange(n)
    return np.concatenate([np.flatnonzero(_held_out_mask(n, held_out)), np.asarray(held_out)])


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
    keep = _held_out_mask(corpus.n, held)
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
